"""One call of each attention contender inside an NVTX range, for Nsight Compute to profile.

    ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight --section WarpStateStats ... \
        python -m benchmarks.attention_profile [--only "sd1 self 4096x40"] [--tile 64,64,4,3,1 ...]

The microbenchmark (benchmarks.attention) says how fast each contender is; this says why: for
each chosen shape it runs our kernel on each `--tile` (BLOCK_M, BLOCK_N, warps, stages,
pipeline), then cuDNN's and flash's SDPA, each warmed up (compiled) outside the range and then
called once inside a range named "profile", so that only those calls are profiled. The GPU
suite's `profile` stage runs it under ncu. Exits with status 0 and a message without CUDA.
"""

from __future__ import annotations

import argparse
import sys

import torch

#: Our plain and pipelined tiles that sm_90 builds fit best for head dims 40 and 80 (registers
#: without spills, several programs per SM); the microbenchmark's ours:plain / ours:pipelined
#: columns say which tile wins on a given machine.
DEFAULT_TILES = ("128,64,8,3,0", "64,64,4,3,1")


def contenders(tiles):
    """name -> callable(q, k, v, scale): ours on each tile, then two SDPA backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm_deploy.kernels.attention import flash_attention

    def sdpa(backend):
        def run(q, k, v, scale):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        return run

    named = {f"ours {','.join(map(str, t))}":
             (lambda q, k, v, scale, t=t: flash_attention(q, k, v, scale, tile=t)) for t in tiles}
    return named | {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                    "flash": sdpa(SDPBackend.FLASH_ATTENTION)}


def parse_tile(text: str):
    from ldm_deploy.kernels.attention import Tile

    m, n, warps, stages, pipeline = (int(x) for x in text.split(","))
    return Tile(m, n, warps, stages, bool(pipeline))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="sd1 self 4096x40",
                        help="shapes whose name contains this text (default: %(default)s)")
    parser.add_argument("--tile", action="append", metavar="M,N,WARPS,STAGES,PIPELINE",
                        help=f"a tile of ours to profile; repeatable (default: {DEFAULT_TILES})")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.attention_profile: no CUDA device; nothing to profile", file=sys.stderr)
        return 0
    from benchmarks.attention import make_inputs
    from ldm_deploy.kernels.attention import sd_shapes

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    tiles = [parse_tile(t) for t in args.tile or DEFAULT_TILES]
    for shape in (s for s in sd_shapes() if args.only in s.name):
        q, k, v = make_inputs(shape, dtype)
        for name, fn in contenders(tiles).items():
            try:
                fn(q, k, v, shape.D ** -0.5)  # compile, autotune nothing, load the module
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  (a tile over the shared memory, a backend
                # that declines the shape: say so and go on with the others)
                print(f"{shape.name} {name}: skipped ({str(e).splitlines()[0][:120]})",
                      file=sys.stderr)
                continue
            torch.cuda.nvtx.range_push("profile")
            fn(q, k, v, shape.D ** -0.5)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            print(f"{shape.name} {name}: profiled", file=sys.stderr)  # beside ncu's own lines
    return 0


if __name__ == "__main__":
    sys.exit(main())
