"""Fused attention microbenchmark: ldm_deploy::attention vs every torch SDPA backend, on every
Stable Diffusion attention shape, on one CUDA GPU.

    python -m benchmarks.attention [--dtype fp16] [--json results.json] [--unet]

For each shape: a correctness check of every contender against an fp32 reference first (a
contender that misses the tolerance is reported, and its time is not counted as a win), then
timing. q, k, v are random (randn, not zeros: the GPU's power draw, and so its clock, depends on
the data) and laid out as the U-Net makes them: (B, H, L, D) views of (B, L, H * D) projections.

Timing: each contender is warmed up (for ours, that includes autotuning), then `--calls` calls,
rotating over `--input-sets` input sets (so that small shapes are not timed on one L2-hot
buffer), are captured in one CUDA graph, and the graph is replayed `--repeats` times, each
replay timed with CUDA events; the reported time per call is the median replay over `--calls`.
The graph removes Python and launch overhead from both sides, as in the engine, which replays
the whole denoising loop as one graph.

    FLOPs (forward) = 4 * B * H * Lq * Lk * D      (two matmuls, 2 FLOPs per multiply-add;
                                                    softmax's exp and sums not counted)
    TFLOP/s         = FLOPs / seconds per call / 1e12
    speedup         = (time of the fastest SDPA backend) / (our time); > 1: ours is faster

`--unet` also times one step of an SD 1.5-size U-Net (random weights, batch 2, 64x64 latents,
77 text tokens) with diffusers' AttnProcessor2_0 vs our processor; needs diffusers.
Exits with status 0 and a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from typing import TYPE_CHECKING

from benchmarks.stats import ratio, summarize

if TYPE_CHECKING:  # imported in main(), after the CUDA check: it needs triton
    from ldm_deploy.kernels.attention import AttentionShape

log = logging.getLogger("benchmarks.attention")

TEXT_TOKENS = 77


def make_inputs(s: AttentionShape, dtype: torch.dtype, seed: int = 0):
    """(B, H, L, D) views of (B, L, H * D) projections, as diffusers' AttnProcessor2_0 makes."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def view(L):
        x = torch.randn(s.B, L, s.H * s.D, device="cuda", generator=g, dtype=dtype)
        return x.view(s.B, L, s.H, s.D).transpose(1, 2)

    return view(s.Lq), view(s.Lk), view(s.Lk)


def contenders() -> dict:
    """name -> callable(q, k, v, scale). SDPA pinned to one backend each via sdpa_kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import ldm_deploy.kernels.ops  # noqa: F401  (registers torch.ops.ldm_deploy.attention)

    def sdpa(backend):
        def run(q, k, v, scale):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return run

    return {
        "ours": lambda q, k, v, scale: torch.ops.ldm_deploy.attention(q, k, v, scale),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "math": sdpa(SDPBackend.MATH),
    }


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference value."""
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def time_per_call(fns, calls: int, repeats: int, warmup: int) -> list[float]:
    """Seconds per call: `calls` calls, cycling through the zero-argument callables `fns`,
    captured in one CUDA graph; each replay timed with CUDA events."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fns[0]()  # one call on the capture stream before capture, as torch's docs ask
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return samples


def tile_timings(autotuner) -> list[dict]:
    """The autotuner's own timing of every config for the shape it tuned last (Triton's
    do_bench, not a CUDA graph: for ranking tiles, not for the table), fastest first."""
    from ldm_deploy.kernels.attention import Tile

    rows = []
    for config, timing in getattr(autotuner, "configs_timings", {}).items():
        kw = config.kwargs
        tile = Tile(kw["BLOCK_M"], kw["BLOCK_N"], config.num_warps, config.num_stages,
                    bool(kw["PIPELINE"]))
        ms = timing[0] if isinstance(timing, (list, tuple)) else timing  # [median, p20, p80]
        rows.append({"tile": tile._asdict(), "ms": ms})
    return sorted(rows, key=lambda r: r["ms"])


def tile_contenders(tiles: list[dict]) -> dict:
    """ours:plain and ours:pipelined: our kernel fixed to the fastest tile of each kind, so that
    the table shows what issuing the next q k^T before the softmax (PIPELINE) is worth."""
    from ldm_deploy.kernels.attention import Tile, flash_attention

    picks = {}
    for row in tiles:  # fastest first
        tile = Tile(**row["tile"])
        name = "ours:pipelined" if tile.pipeline else "ours:plain"
        if name not in picks and row["ms"] != float("inf"):
            picks[name] = tile
    return {name: (lambda q, k, v, scale, tile=tile: flash_attention(q, k, v, scale, tile=tile))
            for name, tile in sorted(picks.items())}


def bench_shape(s: AttentionShape, dtype: torch.dtype, args) -> dict:
    from ldm_deploy.kernels.attention import attn_fwd_tuned

    # Several input sets, so that shapes whose inputs fit in L2 are not timed on one hot buffer.
    sets = [make_inputs(s, dtype, seed) for seed in range(args.input_sets)]
    q, k, v = sets[0]
    scale = s.D ** -0.5
    ref = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1) @ v.float()
    row = {"shape": s._asdict(), "flops": s.flops, "results": {}}
    todo = list(contenders().items())
    while todo:
        name, fn = todo.pop(0)
        result = {}
        try:
            err = rel_error(fn(q, k, v, scale), ref)
            if name == "ours":
                row["config"] = str(attn_fwd_tuned.best_config)  # the autotuner's pick
                row["tiles"] = tile_timings(attn_fwd_tuned)
                todo[:0] = tile_contenders(row["tiles"]).items()  # timed next to ours
            result["rel_error"] = err
            result["correct"] = err < args.tolerance
            calls = [lambda qkv=qkv: fn(*qkv, scale) for qkv in sets]
            stat = summarize(time_per_call(calls, args.calls, args.repeats, args.warmup))
            result |= {"seconds": stat.to_dict(), "tflops": s.flops / stat.median / 1e12}
        except RuntimeError as e:  # a backend that does not take this shape / dtype
            result["error"] = str(e).splitlines()[0][:200]
        row["results"][name] = result
    timed = {n: r["seconds"]["median"] for n, r in row["results"].items()
             if "seconds" in r and r["correct"] and not n.startswith("ours")}
    if timed and row["results"]["ours"].get("correct"):
        best = min(timed, key=timed.get)
        row["fastest_sdpa"] = best
        row["speedup"] = ratio(timed[best], row["results"]["ours"]["seconds"]["median"])
    return row


def bench_unet(dtype: torch.dtype, args) -> dict:
    """One SD 1.5-size U-Net step (batch 2, 64x64 latents): stock SDPA processor vs ours."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm_deploy.kernels.processor import use_fused_attention

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(  # the SD 1.5 U-Net's config
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).to(dtype).eval()
    latents = torch.randn(2, 4, 64, 64, device="cuda", dtype=dtype)
    t = torch.tensor([500, 500], device="cuda")
    text = torch.randn(2, TEXT_TOKENS, 768, device="cuda", dtype=dtype)
    out = {}
    with torch.no_grad():
        for name, install in (("sdpa", lambda: unet.set_attn_processor(AttnProcessor2_0())),
                              ("ours", lambda: use_fused_attention(unet))):
            install()
            sample = unet(latents, t, text).sample.float()
            out.setdefault("reference", sample)
            samples = time_per_call([lambda: unet(latents, t, text)], 1, args.repeats, 3)
            out[name] = {"seconds": summarize(samples).to_dict(),
                         "rel_error_vs_sdpa": rel_error(sample, out["reference"])}
    out.pop("reference")
    out["speedup"] = ratio(out["sdpa"]["seconds"]["median"], out["ours"]["seconds"]["median"])
    return out


def print_table(rows: list[dict], unet: dict | None) -> None:
    names = list(dict.fromkeys(n for row in rows for n in row["results"]))
    head = f"{'shape':<22}{'GFLOP':>8}" + "".join(f"{n + ' us':>14}{'TF/s':>6}" for n in names)
    print(head + f"{'fastest':>10}{'speedup':>9}")
    for row in rows:
        line = f"{row['shape']['name']:<22}{row['flops'] / 1e9:>8.2f}"
        for n in names:
            r = row["results"].get(n, {})
            if "seconds" in r:
                mark = "" if r["correct"] else "!"
                line += f"{r['seconds']['median'] * 1e6:>13.1f}{mark:1}{r['tflops']:>6.0f}"
            else:
                line += f"{'n/a':>14}{'':>6}"
        speedup = row.get("speedup")
        if speedup:
            line += f"{row['fastest_sdpa']:>10}{speedup:>8.2f}x"
        else:
            line += f"{'-':>10}{'-':>9}"
        print(line)
    print("us: median time per call in a CUDA graph; TF/s = 4*B*H*Lq*Lk*D / time; "
          "! = failed the correctness check; speedup = fastest SDPA time / our time")
    print("ours = autotuned; ours:plain / ours:pipelined = the fastest tile without / with the "
          "next q k^T issued before the softmax")
    if unet:
        print(f"SD 1.5-size U-Net step, batch 2, 64x64: SDPA "
              f"{unet['sdpa']['seconds']['median'] * 1e3:.2f} ms, ours "
              f"{unet['ours']['seconds']['median'] * 1e3:.2f} ms, speedup {unet['speedup']:.2f}x "
              f"(output vs SDPA rel. error {unet['ours']['rel_error_vs_sdpa']:.1e})")


def write_json(path: str | None, data: dict) -> None:
    """Whole or not at all: a run cut while writing keeps the previous file."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--only", metavar="TEXT", help="only shapes whose name contains TEXT")
    parser.add_argument("--calls", type=int, default=20, help="calls captured per graph")
    parser.add_argument("--repeats", type=int, default=25, help="timed graph replays")
    parser.add_argument("--warmup", type=int, default=5, help="eager calls before capture")
    parser.add_argument("--input-sets", type=int, default=4,
                        help="input sets the timed calls rotate over")
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help="largest error relative to the fp32 reference's largest value")
    parser.add_argument("--unet", action="store_true", help="also time an SD 1.5-size U-Net step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    if not torch.cuda.is_available():
        print("benchmarks.attention: no CUDA device; nothing to measure", file=sys.stderr)
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    import triton

    from ldm_deploy.kernels.attention import sd_shapes

    shapes = [s for s in sd_shapes() if not args.only or args.only in s.name]
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "dtype": args.dtype}
    rows = []
    for s in shapes:
        row = bench_shape(s, dtype, args)
        rows.append(row)
        log.info("%s: %s; speedup %s (%s), ours %s", s.name,
                 {n: round(r["seconds"]["median"] * 1e6, 1) if "seconds" in r else r.get("error")
                  for n, r in row["results"].items()},
                 row.get("speedup"), row.get("fastest_sdpa"), row.get("config"))
        write_json(args.json, head | {"rows": rows, "unet": None})  # a cut run keeps its rows
    unet = bench_unet(dtype, args) if args.unet else None
    write_json(args.json, head | {"rows": rows, "unet": unet})
    print(f"{head['device']}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}")
    print_table(rows, unet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
