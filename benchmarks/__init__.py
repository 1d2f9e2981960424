"""ldm-bench: latency, throughput and memory of an engine against its peers, side by side.

The console script `ldm-bench` (ldm_deploy/cli/bench.py) parses arguments and calls `bench.run`.
Each contender — our engine, diffusers eager, diffusers with torch.compile — runs in its own
subprocess (`child.py`) so that peak memory, thread pools and imports never mix; the parent
collects their JSON, computes ratios against the named baseline measured in the same run, and
writes the table (`report.py`), JSON and chart (`chart.py`).

This folder lives beside the package, not inside it: `ldm-bench` finds it from an editable
install or a source checkout. Never give a file here the name of a top-level package
(`torch.py`, `diffusers.py`, `kernels.py`, ...): scripts run from this folder put it first on
sys.path.
"""
