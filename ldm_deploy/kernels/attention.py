"""Fused attention forward in Triton, specialised for Stable Diffusion shapes.

One pass over the keys with an online softmax (Dao et al., FlashAttention): the scores never
reach memory, and each program keeps its query tile, running max, running sum and output
accumulator (fp32) on chip. Shapes it is tuned for:

    SD 1.x 512x512   self  4096x40, 1024x80, 256x160, 64x160 (8 heads)   cross: 77 keys
    SD 2.x 768x768   self  9216x64, 2304x64, 576x64, 144x64              cross: 77 keys

q, k, v are read in place through their strides: diffusers' `AttnProcessor2_0` makes
(B, heads, L, head_dim) views of (B, L, heads * head_dim) projections, and copying them into a
contiguous layout would cost a full read and write of each. Head dims that are not powers of two
(40, 80, 160) are padded to a power-of-two tile `BLOCK_D` and masked; key lengths that are not a
multiple of `BLOCK_N` (77) get one masked tail iteration; query tails are masked on load / store.

`flash_attention` is the launcher; `ldm_deploy.kernels.ops` registers it as a torch op and
`ldm_deploy.kernels.trt_plugin` compiles the same `attn_fwd` kernel ahead of time for TensorRT.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


class AttentionShape(NamedTuple):
    """One attention call of a U-Net: batch (2 with classifier-free guidance), heads, query and
    key lengths, head dim."""

    name: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int

    @property
    def flops(self) -> int:
        """Forward FLOPs: two matmuls (q k^T and p v), 2 FLOPs per multiply-add."""
        return 4 * self.B * self.H * self.Lq * self.Lk * self.D


def sd_shapes(text_tokens: int = 77) -> list[AttentionShape]:
    """The table above: each level's self-attention and its cross-attention over the text."""
    levels = {"sd1": [(4096, 8, 40), (1024, 8, 80), (256, 8, 160), (64, 8, 160)],
              "sd2": [(9216, 5, 64), (2304, 10, 64), (576, 20, 64), (144, 20, 64)]}
    return [AttentionShape(f"{model} {kind} {L}x{D}", 2, H, L,
                           L if kind == "self" else text_tokens, D)
            for model, rows in levels.items() for L, H, D in rows for kind in ("self", "cross")]


#: Largest head dim the kernel takes; BLOCK_D = next power of two >= max(16, head_dim).
MAX_HEAD_DIM = 256



class Tile(NamedTuple):
    """One configuration of attn_fwd: query and key tile sizes (BLOCK_M, BLOCK_N), warps per
    program, pipeline stages of the K / V loads, and whether the next key block's q k^T is
    issued before this block's softmax (PIPELINE, see `_full_blocks_pipelined`)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pipeline: bool = False


#: The tile under TRITON_INTERPRET=1 (no autotuning on the CPU): small, so that test shapes of a
#: few dozen tokens still run several key blocks, a masked key tail and a masked query tail.
INTERPRETER_TILE = Tile(32, 32, 4, 1)


def block_d(head_dim: int) -> int:
    """The power-of-two tile that holds one head; tl.dot needs every tile dim >= 16."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _tile_ptrs(base, off_b, off_h, rows, offs_d, stride_b, stride_h, stride_l, stride_d,
               ALIGN: tl.constexpr):
    # (rows, BLOCK_D) pointers into one head. With ALIGN > 1 the launcher has checked that the
    # batch, head and row strides are multiples of ALIGN elements (16 bytes); `// ALIGN * ALIGN`
    # tells the compiler so. Without it a head stride of 40 (not a multiple of 16, the only
    # divisibility Triton infers for integer arguments) rules out 16-byte loads and async copies.
    if ALIGN > 1:
        stride_b = stride_b // ALIGN * ALIGN
        stride_h = stride_h // ALIGN * ALIGN
        stride_l = stride_l // ALIGN * ALIGN
    return (base + off_b * stride_b + off_h * stride_h
            + rows[:, None] * stride_l + offs_d[None, :] * stride_d)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    # ptrs: (R, BLOCK_D) pointers; rows: (R,) row indices. Masked-out elements read as 0, so padded
    # head-dim columns add nothing to q.k and padded key rows are replaced by -inf scores later.
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM),
                           other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, qk_scale):
    # Online-softmax update of (m_i, l_i, acc) by one key block's scores qk (BLOCK_M, BLOCK_N),
    # fp32, and its values v (BLOCK_N, BLOCK_D).
    # Scores in the log2 domain: exp(s * scale) == exp2(s * scale * log2(e)).
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_ij


@triton.jit
def _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, Lk, offs_n, offs_d, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr):
    # One key block: scores (BLOCK_M, BLOCK_N) in fp32, then the softmax update.
    rows = start_n + offs_n
    k = _load_rows(k_ptrs, rows, Lk, offs_d, HEAD_DIM, BLOCK_D, MASK_N)  # (BLOCK_N, BLOCK_D)
    qk = tl.dot(q, tl.trans(k))
    if MASK_N:
        qk = tl.where(rows[None, :] < Lk, qk, float("-inf"))
    v = _load_rows(v_ptrs, rows, Lk, offs_d, HEAD_DIM, BLOCK_D, MASK_N)  # (BLOCK_N, BLOCK_D)
    return _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)


@triton.jit
def _full_blocks_pipelined(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full, stride_kn, stride_vn, Lk,
                           offs_n, offs_d, qk_scale, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # The full key blocks with the next block's q k^T issued before this block's softmax (as in
    # FlashAttention-3's intra-warpgroup pipelining): on Hopper that product is an asynchronous
    # wgmma, and ptxas schedules this block's exponentials while the tensor cores run it
    # (checked in the sm_90 SASS: most of the block's MUFU.EX2 sit between the HGMMAs and
    # their wait). Costs a second (BLOCK_M, BLOCK_N) fp32 score tile in registers.
    if n_full > 0:
        k = _load_rows(k_ptrs, offs_n, Lk, offs_d, HEAD_DIM, BLOCK_D, False)
        qk = tl.dot(q, tl.trans(k))
        for start_n in range(BLOCK_N, n_full, BLOCK_N):
            k = _load_rows(k_ptrs + start_n * stride_kn, offs_n, Lk, offs_d, HEAD_DIM, BLOCK_D,
                           False)
            qk_next = tl.dot(q, tl.trans(k))
            v = _load_rows(v_ptrs + (start_n - BLOCK_N) * stride_vn, offs_n, Lk, offs_d,
                           HEAD_DIM, BLOCK_D, False)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
            qk = qk_next
        v = _load_rows(v_ptrs + (n_full - BLOCK_N) * stride_vn, offs_n, Lk, offs_d, HEAD_DIM,
                       BLOCK_D, False)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
    return acc, l_i, m_i


@triton.jit
def attn_fwd(Q, K, V, sm_scale,
             stride_qb, stride_qh, stride_qm, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             stride_ob, stride_oh, stride_om, stride_od,
             H, Lq, Lk,
             Out,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr):
    """Out[b, h] = softmax(Q[b, h] @ K[b, h]^T * sm_scale) @ V[b, h] for one BLOCK_M query tile.

    Grid: (cdiv(Lq, BLOCK_M), B * H); the query-tile index varies fastest, so programs that read
    the same K, V run together and share them through L2. Pointer arguments come first, then
    scalars, then the output: the order TensorRT's ahead-of-time plugins launch with.
    """
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = _tile_ptrs(Q, off_b, off_h, offs_m, offs_d,
                        stride_qb, stride_qh, stride_qm, stride_qd, ALIGN)
    k_ptrs = _tile_ptrs(K, off_b, off_h, offs_n, offs_d,
                        stride_kb, stride_kh, stride_kn, stride_kd, ALIGN)
    v_ptrs = _tile_ptrs(V, off_b, off_h, offs_n, offs_d,
                        stride_vb, stride_vh, stride_vn, stride_vd, ALIGN)

    # q stays in registers for the whole loop: (BLOCK_M, BLOCK_D).
    q = _load_rows(q_ptrs, offs_m, Lq, offs_d, HEAD_DIM, BLOCK_D, True)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # fp32 whatever the caller passed (Inductor passes Python floats as fp64).
    qk_scale = tl.cast(sm_scale * 1.4426950408889634, tl.float32)  # log2(e)

    # Full key blocks without masks, then at most one masked tail (77 = 64 + 13).
    n_full = Lk - Lk % BLOCK_N
    if PIPELINE:
        acc, l_i, m_i = _full_blocks_pipelined(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full,
                                               stride_kn, stride_vn, Lk, offs_n, offs_d,
                                               qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N)
    else:
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q,
                                        k_ptrs + start_n * stride_kn,
                                        v_ptrs + start_n * stride_vn,
                                        start_n, Lk, offs_n, offs_d, qk_scale,
                                        HEAD_DIM, BLOCK_D, False)
    if n_full < Lk:
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q,
                                    k_ptrs + n_full * stride_kn, v_ptrs + n_full * stride_vn,
                                    n_full, Lk, offs_n, offs_d, qk_scale,
                                    HEAD_DIM, BLOCK_D, True)

    acc = acc / l_i[:, None]
    o_ptrs = _tile_ptrs(Out, off_b, off_h, offs_m, offs_d,
                        stride_ob, stride_oh, stride_om, stride_od, ALIGN)
    if HEAD_DIM == BLOCK_D:
        o_mask = offs_m[:, None] < Lq
    else:
        o_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=o_mask)


# Big query tiles for the long self-attentions, small ones so that 64..256-token layers still
# fill the GPU, and a 32-key tile for the 77-token text. The pipelined tiles hold two score tiles
# in registers, so they come with 8 warps or 64-query tiles (sm_90 builds without spills: 157 to
# 244 registers for head dims 40 and 80). Configs that exceed shared memory for the widest heads
# fail to compile and the autotuner skips them.
AUTOTUNE_TILES = (
    Tile(128, 64, 4, 3),
    Tile(128, 64, 8, 3),
    Tile(128, 128, 8, 3),
    Tile(128, 32, 4, 4),
    Tile(64, 64, 4, 3),
    Tile(64, 64, 8, 2),
    Tile(64, 32, 4, 3),
    Tile(32, 64, 4, 3),
    Tile(128, 64, 8, 3, pipeline=True),
    Tile(64, 64, 4, 3, pipeline=True),
    Tile(64, 64, 4, 2, pipeline=True),
    Tile(64, 32, 4, 3, pipeline=True),
)


def is_interpreter() -> bool:
    """True when the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 was set
    when this module was imported): it then runs on CPU tensors, without autotuning."""
    return not isinstance(attn_fwd, triton.runtime.jit.JITFunction)


attn_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "PIPELINE": t.pipeline},
                           num_warps=t.num_warps, num_stages=t.num_stages)
             for t in AUTOTUNE_TILES],
    key=["Lq", "Lk", "H", "HEAD_DIM"],  # the autotuner adds the tensors' dtypes itself
)(attn_fwd)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes the kernel is written for: q (B, H, Lq, D), k and v (B, H, Lk, D), one dtype."""
    assert q.dim() == k.dim() == v.dim() == 4, "q, k, v must be (B, heads, L, head_dim)"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share one dtype"
    assert q.device == k.device == v.device, "q, k, v must be on one device"
    B, H, _, D = q.shape
    assert k.shape[:2] == v.shape[:2] == (B, H), "batch and heads of q, k, v must match"
    assert k.shape[2] == v.shape[2] >= 1, "k and v must have the same (non-zero) length"
    assert k.shape[3] == v.shape[3] == D, "q, k, v must share one head dim"
    assert D <= MAX_HEAD_DIM, f"head dim {D} > {MAX_HEAD_DIM}"


def new_output(q: torch.Tensor) -> torch.Tensor:
    """A (B, H, Lq, D) tensor laid out as (B, Lq, H, D) in memory: the layout the U-Net's output
    projection reads, so `out.transpose(1, 2).reshape(B, Lq, H * D)` is a view, not a copy."""
    B, H, Lq, D = q.shape
    return q.new_empty((B, Lq, H, D)).transpose(1, 2)


def alignment(*tensors: torch.Tensor) -> int:
    """ALIGN for attn_fwd: elements per 16 bytes when every tensor has unit stride along the head
    dim and all its other strides are multiples of that, else 1 (no hint)."""
    align = 16 // tensors[0].element_size()
    ok = all(t.stride(-1) == 1 and all(s % align == 0 for s in t.stride()[:-1]) for t in tensors)
    return align if ok else 1


def grid(B: int, H: int, Lq: int):
    """Launch grid as a function of the chosen config: (query tiles, batch * heads)."""
    return lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, tile: Tile | None = None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v with the Triton kernel; any strides, no copies.

    q: (B, H, Lq, D), k, v: (B, H, Lk, D) on a CUDA device (or the CPU under TRITON_INTERPRET=1),
    D <= 256. Writes into `out` when given (any strides, shape of q), else into `new_output(q)`.
    Autotuned on (Lq, Lk, H, head dim, dtype) unless `tile` fixes the config (in the interpreter
    its warps and stages mean nothing); INTERPRETER_TILE in the interpreter.
    """
    check_inputs(q, k, v)
    if out is None:
        out = new_output(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    args = (q, k, v, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Lq, Lk, out)
    meta = {"HEAD_DIM": D, "BLOCK_D": block_d(D), "ALIGN": alignment(q, k, v, out)}
    if tile is None and is_interpreter():
        tile = INTERPRETER_TILE
    if tile is None:
        # wrap_triton lets torch.compile / torch.export / AOTInductor see the kernel itself
        # (when called inside the torch op); outside tracing it launches directly.
        wrap_triton(attn_fwd_tuned)[grid(B, H, Lq)](*args, **meta)
        return out
    tile = Tile(*tile)
    config = {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "PIPELINE": tile.pipeline}
    if is_interpreter():
        attn_fwd[grid(B, H, Lq)(config)](*args, **meta, **config)
    else:
        wrap_triton(attn_fwd)[grid(B, H, Lq)](*args, **meta, **config,
                                              num_warps=tile.num_warps,
                                              num_stages=tile.num_stages)
    return out
