"""GPU checks of the torch backend (issue 5), on an exported CUDA engine and its source model:

1. fp16 images against diffusers fp16 (and both against diffusers fp32), same initial latents,
   deterministic sampler: max abs error and PSNR on [0, 1].
2. The denoising loop issues no host synchronisation: after one call has captured its CUDA
   graph, a second call's loop runs under torch's sync debug mode "error" and is profiled,
   counting cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize calls.

    python -m benchmarks.torch_backend_check --engine E --model M --json out.json [--compile]

The JSON is rewritten after each check, and each progress line gives the seconds since start:
a run cut short by its time limit still says what it measured and where the time went.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(ours, ref) -> dict:
    return {"max_abs": float(np.abs(ours - ref).max()), "psnr_db": psnr(ours, ref)}


def diffusers_images(model, dtype, prompt, latents, steps, size):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from ldm_deploy.export.source import is_xl_folder

    if is_xl_folder(Path(model)):  # its VAE in fp32 where its config says so, as ours
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype,
                                                         add_watermarker=False).to("cuda")
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to("cuda")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
                   latents=torch.from_numpy(latents).to("cuda", dtype), output_type="np").images
    del pipe
    torch.cuda.empty_cache()
    return out


def sync_check(pipe, prompt, size, steps) -> dict:
    """Count host syncs inside `run_steps` on a call whose graph is already captured."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    kw = dict(steps=steps, width=size, height=size, seed=0, sampler="euler", output_type="np", progress=False)
    pipe(prompt, **kw)  # captures the graph for this key
    backend = pipe.backend
    real = backend.run_steps
    seen = {}

    def checked(component, runs, key, on_step):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                real(component, runs, key, on_step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        names = [e.name for e in prof.events()]
        seen["syncs"] = sum("Synchronize" in n for n in names)
        seen["graph_launches"] = sum("cudaGraphLaunch" in n for n in names)
        seen["kernel_launches"] = sum(n in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC") for n in names)
        seen["captured"] = any(v is not None for v in backend.graphs.items.values())

    backend.run_steps = checked
    try:
        pipe(prompt, **kw)
    finally:
        backend.run_steps = real
    return seen


def timing(pipe, prompt, size, steps, repeats=3) -> dict:
    import torch

    kw = dict(steps=steps, width=size, height=size, seed=0, sampler="euler", output_type="np", progress=False)
    pipe(prompt, **kw)  # warm-up and capture
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(prompt, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"end_to_end_s_median": float(np.median(times)), "steps": steps, "size": size, "runs": times}


START = time.perf_counter()


def step(what: str) -> None:
    """A progress line, flushed: if the process dies (a crash in native code), the log says where."""
    print(f"torch_backend_check: [{time.perf_counter() - START:.0f} s] {what}", file=sys.stderr, flush=True)


def save(report: dict, path: str | None) -> None:
    """Rewritten after every check: a run cut short by its time limit keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile of exported programs on or off (default: the backend's, on for CUDA)")
    args = p.parse_args(argv)
    import torch

    from ldm_deploy import Pipeline

    if not torch.cuda.is_available():
        print("torch_backend_check: no CUDA device; these checks are for CUDA engines", file=sys.stderr)
        return
    prompt = "a photo of an astronaut riding a horse on mars"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    step("loading the engine")
    pipe = Pipeline.load(args.engine, compile=args.compile)
    report["load"] = {"manifest_build": pipe.manifest.build, "precision": pipe.manifest.precision,
                      "compile": args.compile}
    latents = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32)
    step("our image")
    ours = pipe(prompt, steps=args.steps, width=args.size, height=args.size, latents=latents, sampler="euler",
                output_type="np", progress=False)
    step("diffusers fp16 and fp32 images")
    ref16 = diffusers_images(args.model, torch.float16, prompt, latents, args.steps, args.size)
    # The fp32 reference without TF32; then the flags go back, since torch.compile guards on them
    # (a changed flag recompiles every compiled component on its next call).
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref32 = diffusers_images(args.model, torch.float32, prompt, latents, args.steps, args.size)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    report["images"] = {
        "ours_fp16_vs_diffusers_fp16": compare(ours, ref16),
        "ours_fp16_vs_diffusers_fp32": compare(ours, ref32),
        "diffusers_fp16_vs_diffusers_fp32": compare(ref16, ref32),
        "image_std": float(ours.std()),
    }
    save(report, args.json)
    step("host syncs inside the loop")
    report["sync"] = sync_check(pipe, prompt, args.size, args.steps)
    save(report, args.json)
    step("timing, 50 steps")
    report["timing_50_steps"] = timing(pipe, prompt, args.size, 50)
    save(report, args.json)
    step("done")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
