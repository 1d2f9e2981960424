"""The U-Net's linear layers written as 2-D matrix products, for ONNX Runtime on the CPU.

diffusers applies nn.Linear to (batch, tokens, channels) activations, which exports as MatMul
followed by a separate Add for the bias: one more pass over every output. On a 2-D input the
exporter writes Gemm, whose bias ONNX Runtime adds inside the matrix product. GEGLU's single
projection to 2 x inner channels, split in half afterwards (two Slice copies), becomes two
projections of inner channels each. The same multiplications, fewer passes over memory:
together with the Winograd convolutions, 0.95x the U-Net step time (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_deploy.export.rewrite import replace_module


class FlatLinear(nn.Linear):
    """nn.Linear that runs (..., in) inputs as one (rows, in) matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SplitGEGLU(nn.Module):
    """diffusers' GEGLU, value * gelu(gate), with value and gate as two projections."""

    def __init__(self, geglu: nn.Module):
        super().__init__()
        proj = geglu.proj
        inner = proj.out_features // 2
        self.value, self.gate = (flat_copy(proj, part) for part in (slice(0, inner), slice(inner, None)))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.value(x) * F.gelu(self.gate(x))


def flat_copy(proj: nn.Linear, rows: slice) -> FlatLinear:
    weight = proj.weight.detach()[rows]
    out = FlatLinear(weight.shape[1], weight.shape[0], bias=proj.bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if proj.bias is not None:
            out.bias.copy_(proj.bias.detach()[rows])
    return out


def use_gemm(model: nn.Module) -> int:
    """Rewrite `model`'s linear layers and GEGLUs in place (same weights, same results);
    returns how many modules changed."""
    from diffusers.models.activations import GEGLU

    geglus = [name for name, module in model.named_modules() if isinstance(module, GEGLU)]
    for name in geglus:
        replace_module(model, name, SplitGEGLU(model.get_submodule(name)))
    linears = [module for module in model.modules() if type(module) is nn.Linear]
    for module in linears:
        module.__class__ = FlatLinear  # same parameters; only forward differs
    return len(geglus) + len(linears)
