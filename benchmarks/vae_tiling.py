"""The VAE decoder (or encoder) whole and in tiles (engine/vae_tiling.py): time and peak memory
on this machine.

    python -m benchmarks.vae_tiling [--sides 64 128 192] [--component vae_encoder] [--out DIR]

The SD 1.5-architecture VAE (random weights: neither time nor memory depends on them) is
exported once as an engine exports it (ONNX, ONNX Runtime's fused attention), then each
(latent side, whole | tiled) runs in a fresh process, so that its peak resident memory
(ru_maxrss) is that run's alone: the session, its weights and the arrays of one image.
Tiles are diffusers' default for SD 1.x (64 latent px: 512 px, overlap 1/4); the encoder's
run twice a tile, as Pipeline.run_encoder runs them. Prints a Markdown table for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

TILE = 64  # latent px: SD 1.x's VAE sample_size 512 / 8


def export(out: Path, component: str) -> Path:
    """The SD 1.5 VAE's decoder or encoder graph, as ldm-export writes it."""
    import torch
    from diffusers import AutoencoderKL

    from ldm_deploy.engine.spec import ModelFacts, component_specs
    from ldm_deploy.export.components import WRAPPERS, example_inputs
    from ldm_deploy.export.onnx_export import export_onnx
    from ldm_deploy.export.random_model import vae_config
    from ldm_deploy.kernels.onnx_export import onnx_attention
    from ldm_deploy.kernels.processor import use_fused_attention

    path = out / f"{component}.onnx"
    if path.exists():
        return path
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = use_fused_attention(AutoencoderKL(**vae_config("sd15")).eval())
    module = WRAPPERS[component](SimpleNamespace(vae=vae), torch.float32).eval()
    spec = component_specs(ModelFacts(4, 77, 768))[component]
    example = example_inputs(spec, {"batch": 1, "latent_height": 33, "latent_width": 33})
    with onnx_attention("ort"):
        export_onnx(module, spec, example, path, {"com.microsoft": 1})
    return path


def child(path: str, side: int, tiled: bool) -> dict:
    """One run of the graph at `path` on one image of latent side `side` in this process: seconds
    and peak RSS (MB)."""
    import resource
    from types import SimpleNamespace

    import numpy as np
    import onnxruntime as ort

    from ldm_deploy.engine import vae_tiling

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if path.endswith("vae_decoder.onnx"):
        latents = rng.standard_normal((1, 4, side, side)).astype(np.float32)
        run = lambda z: session.run(None, {"latents": z})[0]  # noqa: E731
        out = vae_tiling.decode(run, latents, TILE, 8) if tiled else run(latents)
    else:
        pixels = rng.uniform(-1, 1, (1, 3, side * 8, side * 8)).astype(np.float32)
        coeffs = np.array([1.0, 0.0], np.float32)

        def sampled(t, noise):
            return session.run(None, {"images": t, "sample_noise": noise, "start_noise": np.zeros_like(noise),
                                      "start_coeffs": coeffs})[0]

        model = SimpleNamespace(vae_scale=8, latent_channels=4, vae_scaling_factor=0.18215)
        noise = rng.standard_normal((1, 4, side, side)).astype(np.float32)
        out = vae_tiling.sample(vae_tiling.encode(sampled, pixels, TILE * 8, model), noise, 0.18215) if tiled \
            else sampled(pixels, noise)
    seconds = time.perf_counter() - start
    assert out.shape[0] == 1 and out.shape[2] in (side, side * 8)
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[64, 128, 192], help="latent sides (x8: pixels)")
    p.add_argument("--component", default="vae_decoder", choices=("vae_decoder", "vae_encoder"))
    p.add_argument("--out", type=Path, default=Path("/tmp/ldm-vae-tiling"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2] == "tiled")))
        return
    path = export(args.out, args.component)
    print("| image | whole: time | whole: peak RSS | tiled: time | tiled: peak RSS | tiles |")
    print("|---|---|---|---|---|---|")
    for side in args.sides:
        got = {}
        for how in ("whole", "tiled"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.vae_tiling", "--child", str(path), str(side), how],
                                  capture_output=True, text=True)
            got[how] = json.loads(done.stdout) if done.returncode == 0 else \
                {"failed": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
        from ldm_deploy.engine.vae_tiling import tiles

        cells = [f"{g['seconds']:.1f} s | {g['peak_mb'] / 1024:.2f} GB" if "seconds" in g else f"failed: {g['failed']} |"
                 for g in (got["whole"], got["tiled"])]
        print(f"| {side * 8} px | {cells[0]} | {cells[1]} | {len(tiles(side, TILE)) ** 2} |", flush=True)


if __name__ == "__main__":
    main()
