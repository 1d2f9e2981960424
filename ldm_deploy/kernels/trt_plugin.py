"""TensorRT plugin for the `ldm_deploy::FusedAttention` ONNX node (see `onnx_export`).

UNVERIFIED: written against the documented `tensorrt.plugin` API of TensorRT 10.x (Python-based
"quickly deployable" plugins with an ahead-of-time implementation, TensorRT >= 10.9) without a
TensorRT install to run it; nothing in this file has been built or run until it runs on a machine
with TensorRT. What is checked without TensorRT: `ldm_deploy.kernels.aot`, which this file calls,
compiles the kernel for sm_90 on the CPU (tests/kernels_test). Known risks: the kernel parameter
order TensorRT launches with (inputs, extra scalar arguments, outputs, as in NVIDIA's sample), and
whether it passes the scratch pointers Triton >= 3.3 appends to every compiled kernel.

Ahead-of-time: at engine build time TensorRT calls `fused_attention_aot`, which compiles
`ldm_deploy.kernels.attention.attn_fwd` to PTX for the tactic being timed; the engine stores the
PTX and launch parameters, so running it needs neither Python nor Triton.

    import ldm_deploy.kernels.trt_plugin  # registers the plugin; then parse the ONNX file

Head dim and heads must be static (they are in every Stable Diffusion U-Net); batch and lengths
may be dynamic. Importing this module imports tensorrt; nothing else in ldm_deploy imports it.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp
import triton

from ldm_deploy.kernels import aot

PLUGIN = "ldm_deploy::FusedAttention"
_TRITON_TYPES = {trt.float16: "fp16", trt.bfloat16: "bf16"}


def _static(expr, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"{PLUGIN}: {what} must be static to build the plugin")
    return int(expr.constant_value())


@trtp.register(PLUGIN)
def fused_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                         scale: float) -> trtp.TensorDesc:
    """q (B, Lq, H, D), k and v (B, Lk, H, D) -> out (B, Lq, H, D), like q."""
    return q.like()


@trtp.autotune(PLUGIN)
def fused_attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                             scale: float, outputs: Tuple[trtp.TensorDesc]
                             ) -> List[trtp.AutoTuneCombination]:
    """All four tensors fp16, or all bf16; linear layout; one tactic per tile (1-based)."""
    tiles = aot.tiles_for(_static(q.shape_expr[3], "head dim"))
    return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, FP16|BF16", "LINEAR",
                                     list(range(1, len(tiles) + 1)))]


@trtp.aot_impl(PLUGIN)
def fused_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                        scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int
                        ) -> Tuple[Union[str, bytes], Union[str, bytes],
                                   trtp.KernelLaunchParams, trtp.SymExprs]:
    """Compile attn_fwd for this dtype, heads, head dim and tile; return (kernel name, PTX,
    launch parameters, the kernel's runtime scalar arguments as shape expressions)."""
    heads = _static(q.shape_expr[2], "number of heads")
    head_dim = _static(q.shape_expr[3], "head dim")
    tile = aot.tiles_for(head_dim)[max(tactic, 1) - 1]
    src, options = aot.source(_TRITON_TYPES[q.dtype], heads, head_dim, scale, tile)
    compiled = triton.compile(src, options=options)

    batch, len_q, len_k = q.shape_expr[0], q.shape_expr[1], k.shape_expr[1]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(len_q, tile.block_m)  # query tiles
    launch.grid_y = batch * heads
    launch.block_x = options["num_warps"] * 32
    launch.shared_mem = compiled.metadata.shared

    values = aot.runtime_args(batch, len_q, len_k, heads, head_dim)
    extra = trtp.SymIntExprs(len(values))
    for i, value in enumerate(values):
        extra[i] = trtp.SymInt32(value)
    return compiled.metadata.name, compiled.asm["ptx"], launch, extra
