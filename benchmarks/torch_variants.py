"""Which torch-engine options make a whole call faster on this machine: the measurements behind
the torch backend's defaults (issue 5 asks for measured defaults).

    python -m benchmarks.torch_variants --model M --work DIR --json out.json \
        [--variants default,eager,no-channels-last,eager+no-channels-last,...] [--device cuda]

Each variant changes one thing from the default engine (exported programs, `--no-aoti`, static
shapes at --size, inside one CUDA graph; on CUDA channels-last and compiled by torch.compile, the
defaults these measurements chose, on the CPU neither): an export option (its own engine, exported
into DIR) or a load option (the default engine, loaded differently); "a+b" makes both
changes. The engines are exported first, --export-jobs at a time (an export is mostly one core
of tracing and writing; the GPU machine has 16), then each variant is timed in a process of its
own: one warm-up call (compiles, captures the graph), then --repeats calls, prompt
to image, with the device synchronised at both ends; the median and the ratio to the default's go
into the JSON, with the image's max abs difference and PSNR against the default's (same seed,
Euler). The JSON is rewritten after every variant, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.torch_backend_check import psnr

# name -> (ldm-export flags, Pipeline.load options); "a+b" combines two of them
VARIANTS = {
    "default": ((), {}),
    "eager": ((), {"compile": False}),
    "compiled": ((), {"compile": True}),
    "no-graph": ((), {"cuda_graph": False}),
    "channels-last": (("--channels-last",), {}),
    "no-channels-last": (("--no-channels-last",), {}),
    "fuse-qkv": (("--fuse-qkv",), {}),
    "triton-attention": (("--attention", "triton"), {}),
}
# Most telling first: a call cut short keeps those.
DEFAULT = "default,eager,no-channels-last,eager+no-channels-last,triton-attention,fuse-qkv,no-graph"

CHILD = """
import json, sys, time, numpy as np
from ldm_deploy import Pipeline
engine, options, size, steps, repeats, image = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6]), sys.argv[6]
pipe = Pipeline.load(engine, **options)
sync = getattr(getattr(pipe.backend, "torch", None), "cuda", None)
sync = sync.synchronize if sync is not None and sync.is_available() else (lambda: None)
kw = dict(steps=steps, width=size, height=size, seed=0, sampler="euler", output_type="np", progress=False)
t = time.perf_counter()
np.save(image, pipe("a photo of an astronaut riding a horse on mars", **kw))
first = time.perf_counter() - t
times = []
for _ in range(repeats):
    sync()
    t = time.perf_counter()
    pipe("a photo of an astronaut riding a horse on mars", **kw)
    sync()
    times.append(time.perf_counter() - t)
print(json.dumps({"first_call_s": first, "seconds": times}))
"""


def variant(name: str) -> tuple[tuple[str, ...], dict]:
    """The export flags and load options of a variant name such as "compiled+channels-last"."""
    flags, options = (), {}
    for part in name.split("+"):
        more_flags, more_options = VARIANTS[part]
        flags, options = flags + more_flags, {**options, **more_options}
    return flags, options


def engine_name(flags: tuple[str, ...]) -> str:
    """The engine directory's name for these export flags: "engine", "engine--channels-last"..."""
    return "-".join(("engine",) + tuple(f.strip("-") for f in flags)).replace(" ", "")


def export_command(model: str, out: Path, flags: tuple[str, ...], device: str, size: int) -> list[str]:
    return [sys.executable, "-m", "ldm_deploy.cli.export", "--model", model, "--out", str(out),
            "--backend", "torch", "--device", device, "--no-img2img", "--static-shapes", "--no-aoti",
            "--min-size", str(min(size, 256)), "--opt-size", str(size), "--force", *flags]


def export_all(names: list[str], args) -> dict[tuple, dict]:
    """Export each engine the variants need, --export-jobs at a time (always afresh: an engine
    left in DIR may predate the defaults it would be timed as); returns export flags ->
    {"export_s": seconds} or {"error": why}."""
    waiting = list(dict.fromkeys(variant(name)[0] for name in names))
    done: dict[tuple, dict] = {}
    running: dict[tuple, tuple] = {}  # flags -> (process, start, log file)
    try:
        while waiting or running:
            while waiting and len(running) < args.export_jobs:
                flags = waiting.pop(0)
                log = open(args.work / f"{engine_name(flags)}.log", "w")  # noqa: SIM115 (closed below)
                cmd = export_command(args.model, args.work / engine_name(flags), flags, args.device, args.size)
                running[flags] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                                  time.perf_counter(), log)
                print(f"torch_variants: exporting {engine_name(flags)}", file=sys.stderr, flush=True)
            time.sleep(0.5)
            for flags, (proc, start, log) in list(running.items()):
                took = time.perf_counter() - start
                if proc.poll() is None and took < args.timeout:
                    continue
                del running[flags]
                done[flags] = finish(proc, log, took, args.timeout)
                print(f"torch_variants: exported {engine_name(flags)}: {done[flags]}", file=sys.stderr, flush=True)
    finally:  # Ctrl-C or a failed start: no export outlives us
        for proc, _, log in running.values():
            proc.kill()
            proc.wait()
            log.close()
    return done


def finish(proc, log, took: float, timeout: float) -> dict:
    """The outcome of one export process, stopped first if it ran out of time."""
    timed_out = proc.poll() is None
    if timed_out:
        proc.kill()
    proc.wait()
    log.close()
    if timed_out:
        return {"error": f"export did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = Path(log.name).read_text().strip().splitlines() or [f"exit {proc.returncode}"]
        return {"error": f"export failed: {tail[-1][:300]}"}
    return {"export_s": round(took, 1)}


def measure(name: str, args, report: dict, exports: dict) -> dict:
    flags, options = variant(name)
    if "error" in exports[flags]:
        return dict(exports[flags])
    export_s = exports[flags]["export_s"]
    engine = args.work / engine_name(flags)
    image = args.work / f"{name}.npy"
    p = subprocess.run([sys.executable, "-c", CHILD, str(engine), json.dumps(options), str(args.size),
                        str(args.steps), str(args.repeats), str(image)],
                       capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    result = {"export_flags": list(flags), "load_options": options, "export_s": round(export_s, 1),
              "first_call_s": out["first_call_s"], "seconds": out["seconds"],
              "median_s": float(np.median(out["seconds"]))}
    base = report["variants"].get("default", {})
    if "median_s" in base:
        result["vs_default"] = result["median_s"] / base["median_s"]
        ours, ref = np.load(image), np.load(args.work / "default.npy")
        result["image_vs_default"] = {"max_abs": float(np.abs(ours - ref).max()), "psnr_db": psnr(ours, ref)}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="diffusers folder")
    p.add_argument("--work", required=True, type=Path, help="folder for the engines, their logs and images")
    p.add_argument("--json", required=True)
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from {', '.join(VARIANTS)}, or "
                   "two joined by '+' (default: %(default)s)")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--export-jobs", type=int, default=4, help="exports at a time")
    p.add_argument("--timeout", type=float, default=600, help="seconds per export and per timed process")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if any(part not in VARIANTS for part in n.split("+"))]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}, "
                "or join two with '+'")
    if "default" in names:  # the baseline every ratio divides by goes first
        names.remove("default")
    names.insert(0, "default")
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "size": args.size, "steps": args.steps, "variants": {}}
    exports = export_all(names, args)
    for name in names:
        print(f"torch_variants: {name}", file=sys.stderr, flush=True)
        try:
            report["variants"][name] = measure(name, args, report, exports)
        except (subprocess.SubprocessError, OSError) as e:
            report["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"torch_variants: {name}: {json.dumps(report['variants'][name])}", file=sys.stderr, flush=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all("error" not in v for v in report["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
