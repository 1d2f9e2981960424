"""One contender in its own process, so that peak memory, thread pools and imports never mix.

    python -m benchmarks.child SPEC.json RESULT.json

SPEC is what `bench.contender_spec` writes; RESULT gets the contender's raw samples plus this
process's peak resident set (getrusage: the high-water mark of the whole process, imports and
loading included) and the versions it ran with.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import logging
import os
import resource
import sys
import warnings
from pathlib import Path

from ldm_deploy.errors import UserError

MODULES = {"ours": "benchmarks.ours", "diffusers": "benchmarks.peers"}
VERSIONS = ("onnxruntime", "torch", "diffusers", "transformers", "triton")


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    logging.basicConfig(level=logging.INFO, format=f"[{spec['name']}] %(message)s", stream=sys.stderr)
    # Libraries' deprecation notes and loading progress bars are noise in a benchmark log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        result = importlib.import_module(MODULES[spec["kind"]]).run(spec)
    except UserError as e:  # a damaged engine, a missing model: one line, no traceback
        print(f"{spec['name']}: {e}", file=sys.stderr)
        return 2
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result["versions"] = versions()
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
