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


@symbolic_helper.parse_args("v", "v", "v", "f")
def _ort_symbolic(g, q, k, v, scale):
    # ONNX Runtime's fused com.microsoft::MultiHeadAttention (CPU and CUDA kernels): it never
    # writes the (B, H, Lq, Lk) scores to memory, which at 4096 tokens is 1 GiB per call in fp32.
    # The heads fold into its batch (num_heads 1), so the node needs no static head count:
    # (B, H, L, D) -> (B*H, L, D) -> MultiHeadAttention -> (B*H, Lq, D) -> (B, H, Lq, D).
    def shape(x, lo, hi):
        return g.op("Slice", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([lo])),
                    g.op("Constant", value_t=torch.tensor([hi])))

    minus_one = g.op("Constant", value_t=torch.tensor([-1]))

    def fold(x):
        return g.op("Reshape", x, g.op("Concat", minus_one, shape(x, 2, 4), axis_i=0))

    out = g.op("com.microsoft::MultiHeadAttention", fold(q), fold(k), fold(v), num_heads_i=1, scale_f=scale)
    return g.op("Reshape", out, g.op("Concat", shape(q, 0, 3), shape(q, 3, 4), axis_i=0))


_SYMBOLICS = {"plain": _plain_symbolic, "fused": _fused_symbolic, "ort": _ort_symbolic}


def _register(mode) -> None:
    mode = {False: "plain", True: "fused"}.get(mode, mode)
    register_custom_op_symbolic(OP_NAME, _SYMBOLICS[mode], MIN_OPSET)


@contextlib.contextmanager
def onnx_attention(fused: bool | str = False) -> Iterator[None]:
    """Within this context the TorchScript exporter writes each `ldm_deploy::attention` as
    MatMul/Softmax/MatMul (`fused=False` or "plain"), as one `ldm_deploy::FusedAttention` node
    (`fused=True` or "fused"; pass `custom_opsets={"ldm_deploy": 1}` to torch.onnx.export), or
    as ONNX Runtime's `com.microsoft::MultiHeadAttention` ("ort";
    `custom_opsets={"com.microsoft": 1}`). Nests."""
    _active.append(fused)
    _register(fused)
    try:
        yield
    finally:
        _active.pop()
        unregister_custom_op_symbolic(OP_NAME, MIN_OPSET)
        if _active:
            _register(_active[-1])
