"""Winograd convolution, F(m x m, 3 x 3), written as plain tensor ops for the ONNX export.

A 3x3 convolution at stride 1 turns, tile by tile, into a small elementwise product in a
transformed space (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015):

    Y = A^T [ (G g G^T) * (B^T d B) ] A     per m x m output tile, from an a x a input tile (a = m + 2)

Summed over input channels, the elementwise product becomes a^2 matrix products of
(tiles, C) x (C, K), which do (a / m)^2 / 9 of the multiplications of the direct convolution:
0.44 for F(2, 3), 0.25 for F(4, 3). The transforms are cheap (B, A hold small integers) but move
memory, so they pay off where there are many channels per pixel of transform. ONNX Runtime's CPU
convolution already runs at its matrix-product peak (benchmarks/RESULTS.md), so only doing
fewer multiplications makes it faster. The weights grow to (a / 3)^2 times their size:
1.8x for F(2, 3), 4x for F(4, 3); `choose` keeps that to the convolutions that pay for it.

Everything is computed in float32 at run time; the kernel transform G g G^T is done once in
float64. F(4, 3) rounds ~20x more than a direct convolution (~2e-5 on unit-scale activations,
tests/export/test_winograd.py), far inside the engines' tolerance against diffusers.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ldm_deploy.export.rewrite import replace_module

log = logging.getLogger(__name__)

# (B^T, G, A^T) for F(m, 3): the standard points 0, +-1 (m = 2) and 0, +-1, +-2 (m = 4).
MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

# Which convolutions get which tile, from measurements on ONNX Runtime, 2 threads
# (benchmarks/RESULTS.md). Alone, F(4, 3) took 0.59x the direct time at 32x32 x 320 channels and
# 0.58x at 64x64 x 512; F(2, 3) 0.81x at 16x16 x 640; both lost at 8x8 x 1280 (1.4x, 2.5x: too
# few tiles for the weights they stream) and with 128 channels (the transforms dominate). Inside
# the SD 1.5 U-Net (256 px), where the data comes from memory rather than cache, F(2, 3) at
# 16x16 was a loss (1.03-1.10x per layer), so only F(4, 3) at 32 px and more is used.
MIN_CHANNELS = 256  # min(in, out) channels
MIN_SIDE = {4: 32}  # tile m -> the least input side (at the engine's smallest image) it is used for


def applies(conv: nn.Module) -> bool:
    """A plain 3x3 convolution: stride 1, padding 1 (zeros, or circular: tiling.py), no dilation,
    one group."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode in ("zeros", "circular"))


def choose(channels: int, side: int) -> int | None:
    """The tile m for a convolution with min(in, out) `channels` whose input's smaller side is
    `side` at the smallest image the engine takes, or None to keep it direct."""
    if channels < MIN_CHANNELS:
        return None
    return next((m for m, least in sorted(MIN_SIDE.items(), reverse=True) if side >= least), None)


class WinogradConv2d(nn.Module):
    """Drop-in for a 3x3 `nn.Conv2d` (see `applies`); any input size, odd ones included."""

    def __init__(self, conv: nn.Conv2d, m: int):
        super().__init__()
        if not applies(conv):
            raise ValueError(f"Winograd F({m},3) computes plain 3x3 convolutions (stride 1, padding 1), not {conv}")
        bt, g, at = (torch.tensor(x, dtype=torch.float64) for x in MATRICES[m])
        self.m, self.a = m, m + 2
        w = conv.weight.detach().double()  # (K, C, 3, 3)
        # (a, a, C, K) in (column, row) order, to match the input transform below.
        u = torch.einsum("ar,kcrs,bs->back", g, w, g)
        self.register_buffer("u", u.reshape(self.a**2, w.shape[1], w.shape[0]).float().contiguous())
        self.register_buffer("bt", bt.float())  # (a, a)
        self.register_buffer("at", at.float())  # (m, a)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0])
        self.register_buffer("bias", bias.float().clone())
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.circular = conv.padding_mode == "circular"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, a = self.m, self.a
        th, tw = (h + m - 1) // m, (w + m - 1) // m  # tiles down and across
        # Channels last, zero-padded so that every tile's a x a window lies inside: one pixel of
        # the convolution's padding on the top/left, and up to a whole tile on the bottom/right.
        if self.circular:  # the convolution's own pixel wrapped round, then the tiles' zeros
            x = F.pad(F.pad(x, (1, 1, 1, 1), mode="circular"), (0, tw * m - w, 0, th * m - h))
        else:
            x = F.pad(x, (1, tw * m - w + 1, 1, th * m - h + 1))
        x = x.permute(0, 2, 3, 1)  # (n, th*m+2, tw*m+2, c)
        wp = x.shape[2]
        offsets = torch.arange(a).unsqueeze(1)  # (a, 1): row r of tile i is pixel row m*i + r
        rows = (offsets + m * torch.arange(th).unsqueeze(0)).reshape(-1)  # (a * th,)
        cols = (offsets + m * torch.arange(tw).unsqueeze(0)).reshape(-1)  # (a * tw,)
        # B^T d B, one side at a time, each a matrix product over a gathered tile axis.
        d = torch.index_select(x, 1, rows).reshape(n, a, -1)  # (n, a rows, th*wp*c)
        d = (self.bt @ d).reshape(n, a, th, wp, c)
        d = torch.index_select(d, 3, cols).reshape(n, a, th, a, tw * c)  # (n, a, th, a cols, tw*c)
        d = d.permute(3, 1, 0, 2, 4).reshape(a, -1)  # (a cols, a rows * n*th*tw*c)
        v = (self.bt @ d).reshape(a * a, n * th * tw, c)  # (a^2, tiles, c)
        y = v @ self.u  # (a^2, tiles, k)
        k = y.shape[-1]
        # A^T M A: over the column axis (first), then over the rows, batched over the columns.
        y = (self.at @ y.reshape(a, -1)).reshape(m, a, -1)  # (m cols, a rows, tiles*k)
        y = (self.at @ y).reshape(m, m, n, th, tw, k)  # (col s, row r, n, th, tw, k)
        y = y.permute(2, 3, 1, 4, 0, 5).reshape(n, th * m, tw * m, k)[:, :h, :w]
        return y.permute(0, 3, 1, 2) + self.bias.reshape(1, -1, 1, 1)


def use_winograd(model: nn.Module, probe) -> Counter:
    """Swap `model`'s eligible convolutions for Winograd ones, in place; `probe()` must run the
    model once at the smallest size the engine takes (it measures each convolution's input).
    Returns how many got each tile, e.g. Counter({"F(4,3)": 11, "direct": 38}) (SD 1.5 from 256 px).
    The model is changed in place: the exporters trace the source model's own modules."""
    sides: dict[str, int] = {}

    def measure(name):
        def hook(module, args):  # returns None: the input goes on unchanged
            sides.setdefault(name, min(args[0].shape[-2:]))
        return hook

    hooks = [conv.register_forward_pre_hook(measure(name)) for name, conv in model.named_modules() if applies(conv)]
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in hooks:
            h.remove()
    counts = Counter()
    for name, side in sides.items():
        conv = model.get_submodule(name)
        m = choose(min(conv.in_channels, conv.out_channels), side)
        counts[f"F({m},3)" if m else "direct"] += 1
        if m:
            replace_module(model, name, WinogradConv2d(conv, m))
    log.info("winograd convolutions: %s", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return counts
