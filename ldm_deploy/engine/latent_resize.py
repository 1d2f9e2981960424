"""Latents resized as torch.nn.functional.interpolate resizes them (align_corners=False), in numpy:
AUTOMATIC1111's "Latent" hires upscalers call interpolate, and the runtime has no torch.

Each axis is a (out, in) matrix of weights, the rows as PyTorch's CPU kernels compute them, and
the resize is one product per axis. Index arithmetic is float32, as PyTorch's for float32
inputs, so that "nearest" picks the same pixels where a product lands on a whole number.
"""

from __future__ import annotations

import numpy as np

# AUTOMATIC1111's names -> interpolate's (mode, antialias).
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
CUBIC_A = -0.75  # interpolate's bicubic (Keys' a); its antialiased filter uses -0.5, as PIL


def resize(x: np.ndarray, height: int, width: int, mode: str, antialias: bool = False) -> np.ndarray:
    """(B, C, h, w) -> (B, C, height, width) float32."""
    rows = weights(x.shape[2], height, mode, antialias)  # (height, h)
    cols = weights(x.shape[3], width, mode, antialias)  # (width, w)
    return (rows @ x.astype(np.float64) @ cols.T).astype(np.float32)  # (H, h) @ (B, C, h, w) @ (w, W)


def weights(n_in: int, n_out: int, mode: str, antialias: bool = False) -> np.ndarray:
    """(n_out, n_in) float64: row o holds the weights output pixel o gives each input pixel."""
    out = np.zeros((n_out, n_in))
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    rows = np.arange(n_out)
    if mode in ("nearest", "nearest-exact"):
        src = dst * scale if mode == "nearest" else (dst + np.float32(0.5)) * scale
        out[rows, np.minimum(np.floor(src).astype(np.int64), n_in - 1)] = 1.0
    elif antialias and mode in ("bilinear", "bicubic"):
        for o in rows:
            out[o] = antialiased_row(o, n_in, float(scale), mode)
    elif mode == "bilinear":
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float64)
        np.add.at(out, (rows, i0), 1 - frac)
        np.add.at(out, (rows, i1), frac)
    elif mode == "bicubic":
        src = (dst + np.float32(0.5)) * scale - np.float32(0.5)  # not clamped: the taps are
        i = np.floor(src).astype(np.int64)
        t = (src - i).astype(np.float64)
        taps = [far(t + 1), near(t), near(1 - t), far(2 - t)]  # input pixels i-1 .. i+2
        for k, w in enumerate(taps):
            np.add.at(out, (rows, np.clip(i - 1 + k, 0, n_in - 1)), w)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return out


def near(x, a: float = CUBIC_A):
    """Keys' cubic convolution kernel for |x| <= 1."""
    return ((a + 2) * x - (a + 3)) * x * x + 1


def far(x, a: float = CUBIC_A):
    """Keys' cubic convolution kernel for 1 < |x| < 2."""
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def antialiased_row(o: int, n_in: int, scale: float, mode: str) -> np.ndarray:
    """interpolate(antialias=True)'s weights for output pixel o: the filter stretched by the
    scale when shrinking, its window clipped to the image, the weights normalised."""
    size = 2 if mode == "bilinear" else 4  # taps of the unstretched filter
    support = size / 2 * scale if scale >= 1 else size / 2
    inv = 1 / scale if scale >= 1 else 1.0
    center = scale * (o + 0.5)
    lo = max(int(center - support + 0.5), 0)  # int(): towards zero, as the C++ cast
    hi = min(int(center + support + 0.5), n_in)
    x = np.abs((np.arange(lo, hi) - center + 0.5) * inv)
    if mode == "bilinear":
        w = np.maximum(1 - x, 0)
    else:
        w = np.where(x < 1, near(x, -0.5), np.where(x < 2, far(x, -0.5), 0))
    row = np.zeros(n_in)
    total = w.sum()
    row[lo:hi] = w / total if total else w
    return row
