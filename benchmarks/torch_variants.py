"""Which torch-engine options make a whole call faster on this machine: the measurements behind
the torch backend's defaults (issue 5 asks for measured defaults).

    python -m benchmarks.torch_variants --model M --work DIR --json out.json \
        [--variants default,compiled,no-graph,channels-last,fuse-qkv,triton-attention] [--device cuda]

Each variant changes one thing from the default engine (exported programs, `--no-aoti`, static
shapes at --size, run eagerly inside one CUDA graph): an export option (its own engine, exported
once into DIR) or a load option (the default engine, loaded differently). Each is timed in a
process of its own: one warm-up call (compiles, captures the graph), then --repeats calls, prompt
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

# name -> (ldm-export flags, Pipeline.load options)
VARIANTS = {
    "default": ((), {}),
    "compiled": ((), {"compile": True}),
    "no-graph": ((), {"cuda_graph": False}),
    "channels-last": (("--channels-last",), {}),
    "fuse-qkv": (("--fuse-qkv",), {}),
    "triton-attention": (("--attention", "triton"), {}),
}

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


def engine_name(flags: tuple[str, ...]) -> str:
    """The engine directory's name for these export flags: "engine", "engine--channels-last"..."""
    return "-".join(("engine",) + tuple(f.strip("-") for f in flags)).replace(" ", "")


def export(model: str, work: Path, flags: tuple[str, ...], device: str, size: int, timeout: float) -> Path:
    out = work / engine_name(flags)
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "ldm_deploy.cli.export", "--model", model, "--out", str(out),
                        "--backend", "torch", "--device", device, "--no-img2img", "--static-shapes", "--no-aoti",
                        "--min-size", str(min(size, 256)), "--opt-size", str(size), "--force", *flags],
                       check=True, timeout=timeout)
    return out


def measure(name: str, args, report: dict) -> dict:
    flags, options = VARIANTS[name]
    t = time.perf_counter()
    engine = export(args.model, args.work, flags, args.device, args.size, args.timeout)
    export_s = time.perf_counter() - t
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
    p.add_argument("--work", required=True, type=Path, help="folder for the engines and images (reused)")
    p.add_argument("--json", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600, help="seconds per export and per timed process")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "default" in names:  # the baseline every ratio divides by goes first
        names.remove("default")
    names.insert(0, "default")
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "size": args.size, "steps": args.steps, "variants": {}}
    for name in names:
        print(f"torch_variants: {name}", file=sys.stderr, flush=True)
        try:
            report["variants"][name] = measure(name, args, report)
        except (subprocess.SubprocessError, OSError) as e:
            report["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"torch_variants: {name}: {json.dumps(report['variants'][name])}", file=sys.stderr, flush=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all("error" not in v for v in report["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
