"""How the TorchScript ONNX exporter writes `ldm_deploy::attention`: plain ops or one custom node.

Use it around `torch.onnx.export(..., dynamo=False)` of a U-Net that runs `FusedAttnProcessor`
(`ldm_deploy.kernels.processor.use_fused_attention`):

    with onnx_attention(fused=False):   # default: MatMul, Softmax, MatMul, as the stock
        torch.onnx.export(...)          # processor exports; TensorRT / ORT fuse it themselves
    with onnx_attention(fused=True):    # one ldm_deploy::FusedAttention node per attention,
        torch.onnx.export(..., custom_opsets={DOMAIN: 1})  # for the TensorRT plugin

The custom node, `ldm_deploy::FusedAttention(q, k, v) -> out`, attributes `scale` (float) and
`plugin_namespace` ("ldm_deploy", which TensorRT's ONNX parser uses to find the plugin):
q (B, Lq, H, D), k and v (B, Lk, H, D), out (B, Lq, H, D). That is the layout of the U-Net's
projections, so the Transposes this symbolic adds cancel against the processor's own
(B, L, H, D) -> (B, H, L, D) transposes in the exporter's peephole pass, and the node reads the
projection outputs with no copy in between. `ldm_deploy.kernels.trt_plugin` implements it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch.onnx import register_custom_op_symbolic, symbolic_helper, unregister_custom_op_symbolic

import ldm_deploy.kernels.ops  # noqa: F401  (registers the op the symbolic is for)

OP_NAME = "ldm_deploy::attention"
DOMAIN = "ldm_deploy"
NODE_TYPE = "FusedAttention"
#: Registered for this opset and every later one (Softmax's last-axis semantics date from 13).
MIN_OPSET = 13

_TORCHSCRIPT_DTYPES = {"Float": torch.float32, "Half": torch.float16,
                       "BFloat16": torch.bfloat16, "Double": torch.float64}
_active: list[bool] = []  # the `fused` flag of each open onnx_attention(), innermost last


def _to_blhd(g, x):
    # (B, H, L, D) <-> (B, L, H, D); the permutation is its own inverse.
    return g.op("Transpose", x, perm_i=[0, 2, 1, 3])


@symbolic_helper.parse_args("v", "v", "v", "f")
def _fused_symbolic(g, q, k, v, scale):
    out = g.op(f"{DOMAIN}::{NODE_TYPE}", _to_blhd(g, q), _to_blhd(g, k), _to_blhd(g, v),
               scale_f=scale, plugin_namespace_s=DOMAIN)
    sizes = q.type().varyingSizes()  # (B, H, Lq, D), None where dynamic
    if sizes is not None and len(sizes) == 4:
        # ONNX cannot infer a custom node's output; give it (B, Lq, H, D) of q's dtype.
        out.setType(q.type().with_sizes([sizes[0], sizes[2], sizes[1], sizes[3]]))
    return _to_blhd(g, out)


@symbolic_helper.parse_args("v", "v", "v", "f")
def _plain_symbolic(g, q, k, v, scale):
    # As the exporter writes SDPA: q and k^T each scaled by sqrt(scale) (keeps fp16 scores in
    # range), MatMul, Softmax over keys, MatMul with v. Result (B, H, Lq, D).
    dtype = _TORCHSCRIPT_DTYPES.get(q.type().scalarType(), torch.float32)
    root = g.op("Constant", value_t=torch.tensor(math.sqrt(scale), dtype=dtype))
    k_t = g.op("Transpose", k, perm_i=[0, 1, 3, 2])
    scores = g.op("MatMul", g.op("Mul", q, root), g.op("Mul", k_t, root))
    return g.op("MatMul", g.op("Softmax", scores, axis_i=-1), v)


def _register(fused: bool) -> None:
    register_custom_op_symbolic(OP_NAME, _fused_symbolic if fused else _plain_symbolic, MIN_OPSET)


@contextlib.contextmanager
def onnx_attention(fused: bool = False) -> Iterator[None]:
    """Within this context the TorchScript exporter writes each `ldm_deploy::attention` as
    MatMul/Softmax/MatMul (`fused=False`) or as one `ldm_deploy::FusedAttention` node
    (`fused=True`; pass `custom_opsets={"ldm_deploy": 1}` to torch.onnx.export). Nests."""
    _active.append(fused)
    _register(fused)
    try:
        yield
    finally:
        _active.pop()
        unregister_custom_op_symbolic(OP_NAME, MIN_OPSET)
        if _active:
            _register(_active[-1])
