"""Ahead-of-time compilation of `attn_fwd` for one fixed layout: what the TensorRT plugin builds.

The layout is the ONNX node's: q (B, Lq, H, D), k and v (B, Lk, H, D), out (B, Lq, H, D), all
contiguous. Heads, head dim, scale and tile are compile-time constants; the batch strides and
the two lengths stay runtime arguments, so one kernel serves every batch size and resolution.
Pure apart from `triton.compile`, so it can be checked on a machine without a GPU by compiling
for an explicit target (`triton.backends.compiler.GPUTarget("cuda", 90, 32)`).
"""

from __future__ import annotations

import triton

from ldm_deploy.kernels.attention import AUTOTUNE_TILES, Tile, attn_fwd, block_d

#: The kernel's runtime parameters, in attn_fwd's order: 3 input pointers, then the scalar
#: arguments (whose values `runtime_args` describes), then the output pointer.
RUNTIME_SCALARS = ("stride_qb", "stride_kb", "stride_vb", "stride_ob", "Lq", "Lk")
#: Shared memory a tile may plan for: K and V stages plus the q tile (H100: 227 KiB per block).
SMEM_BUDGET = 160 * 1024


def shared_bytes(tile: Tile, head_dim: int) -> int:
    """Shared memory Triton plans for a 16-bit attn_fwd (matches the sm_90 builds): the q tile,
    num_stages K and V tiles each, and one more K tile when pipelined."""
    rows = tile.block_m + 2 * tile.num_stages * tile.block_n + tile.pipeline * tile.block_n
    return 2 * block_d(head_dim) * rows


def tiles_for(head_dim: int) -> list[Tile]:
    """Autotune tiles that fit SMEM_BUDGET for this head dim. The JIT autotuner skips a config
    that fails to compile; an ahead-of-time build cannot, so prune up front."""
    return [t for t in AUTOTUNE_TILES if shared_bytes(t, head_dim) <= SMEM_BUDGET]


def source(dtype: str, heads: int, head_dim: int, scale: float,
           tile: Tile) -> tuple[triton.compiler.ASTSource, dict]:
    """(ASTSource, compile options) for `triton.compile`; dtype is "fp16" or "bf16"."""
    block_m, block_n, num_warps, num_stages, pipeline = Tile(*tile)
    ptr = "*" + dtype
    row = heads * head_dim
    constants = {"sm_scale": scale, "H": heads, "HEAD_DIM": head_dim,
                 "BLOCK_D": block_d(head_dim), "ALIGN": 1,
                 "BLOCK_M": block_m, "BLOCK_N": block_n, "PIPELINE": pipeline}
    for t, seq in (("q", "m"), ("k", "n"), ("v", "n"), ("o", "m")):
        constants |= {f"stride_{t}h": head_dim, f"stride_{t}{seq}": row, f"stride_{t}d": 1}
    runtime = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr} | {n: "i32" for n in RUNTIME_SCALARS}
    signature = {name: runtime.get(name, "constexpr") for name in attn_fwd.arg_names}
    # Device buffers are 16-byte aligned; batch strides are multiples of 16 elements when a
    # row (heads * head_dim) is. With these hints the loads become 16-byte vector / async copies.
    aligned = ["Q", "K", "V", "Out"] + (["stride_qb", "stride_kb", "stride_vb", "stride_ob"]
                                        if row % 16 == 0 else [])
    attrs = {(attn_fwd.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=attn_fwd, signature=signature, constexprs=constants,
                                    attrs=attrs)
    return src, {"num_warps": num_warps, "num_stages": num_stages}


def runtime_args(batch, len_q, len_k, heads: int, head_dim: int) -> list:
    """Values of RUNTIME_SCALARS, in order; ints or TensorRT shape expressions alike."""
    row = heads * head_dim
    return [len_q * row, len_k * row, len_k * row, len_q * row, len_q, len_k]
