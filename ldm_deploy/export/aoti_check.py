"""Run a freshly compiled AOTInductor package once, in a process of its own, before an engine
ships it.

The first torch engines built on a GPU (H200, torch 2.11) died with SIGSEGV when loaded or
first called, and nothing said which component or where. A segfault cannot be caught in the
process it happens in, so the exporter loads each package in a fresh interpreter (as the
backend will: the single-threaded runner on CUDA), calls it on the trace's example inputs and
compares with the exported program run eagerly. Whatever goes wrong (a signal, an exception,
a wrong or non-finite result) comes back as one sentence, and the exporter falls back to the
uncompiled program for that component, saying so.

    python -m ldm_deploy.export.aoti_check PACKAGE CASE.pt DEVICE SINGLE_THREADED TOLERANCE

(the child side; CASE.pt holds the inputs and the expected outputs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = {"loading": "loading it", "calling": "running it", "checking": "comparing its outputs"}


def check_package(path: Path, example: tuple, expected: list, device: str, tolerance: float,
                  timeout: float = 900) -> str | None:
    """None if the package at `path` loads and reproduces `expected` (to `tolerance`, relative to
    each output's largest magnitude) in a fresh process; otherwise what went wrong."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.pt"
        torch.save({"inputs": [t.detach().cpu() for t in example],
                    "expected": [t.detach().float().cpu() for t in expected]}, case)
        # AOTInductor then checks dtypes, sizes and strides of the inputs itself (an error, not
        # a crash, if ours were wrong).
        env = os.environ | {"AOTI_RUNTIME_CHECK_INPUTS": "1"}
        cmd = [sys.executable, "-X", "faulthandler", "-m", __name__, str(path), str(case), device,
               "1" if device == "cuda" else "0", str(tolerance)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return f"did not finish its test run in {timeout:.0f} s"
    if p.returncode == -signal.SIGINT:  # Ctrl-C reached the child too: the user's, not the package's
        raise KeyboardInterrupt
    return describe(p.returncode, p.stdout, p.stderr)


def describe(returncode: int, stdout: str, stderr: str) -> str | None:
    """The child's outcome as a sentence: None for success."""
    said = stdout.split()
    phase = next((PHASES[w] for w in reversed(said) if w in PHASES), "starting")
    if returncode == 0:
        return None
    if "ok" in said:
        phase = "exiting, after a correct run"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name}) while {phase}"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    return f"failed while {phase}: {last[:300]}" if last else f"failed while {phase} (exit {returncode})"


def main(argv: list[str]) -> int:
    path, case, device, single, tolerance = argv
    import torch

    print("loading", flush=True)
    runner = torch._inductor.aoti_load_package(path, run_single_threaded=single == "1")
    data = torch.load(case)
    inputs = [t.to(device) for t in data["inputs"]]
    print("calling", flush=True)
    with torch.inference_mode():
        outs = runner(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    print("checking", flush=True)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    if len(outs) != len(data["expected"]):
        print(f"{len(outs)} outputs, expected {len(data['expected'])}", file=sys.stderr)
        return 3
    for i, (got, want) in enumerate(zip(outs, data["expected"], strict=True)):
        got = got.float().cpu()
        if not torch.isfinite(want).all():
            print(f"output {i}: the eager program itself gives non-finite values", file=sys.stderr)
            return 3
        if got.shape != want.shape or not torch.isfinite(got).all():
            print(f"output {i}: shape {tuple(got.shape)} (expected {tuple(want.shape)}), "
                  f"finite: {bool(torch.isfinite(got).all())}", file=sys.stderr)
            return 3
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        if not error <= float(tolerance):
            print(f"output {i} differs from the eager program by {error:.2e} (relative; allowed {tolerance})",
                  file=sys.stderr)
            return 3
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
