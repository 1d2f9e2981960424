"""diffusers' VAE tiling (`pipe.enable_vae_tiling()`: AutoencoderKL.tiled_decode, _tiled_encode):
the VAE run on overlapping tiles, so that its memory (its mid-block attention is quadratic in the
latent's area: a 2048 px SD image's would hold 65536^2 scores) stays that of one tile, whatever the
image's size.

Decoding: latents with a side over `tile` (latent px; diffusers': the VAE's sample_size / its
scale, 64 for SD 1.x) are cut into tile x tile squares every int(tile * 3/4) (those at the far
edges shorter); each is decoded alone, and each decoded tile is blended into the one above and the
one to its left over blend = int(tile * scale / 4) pixels (linear ramps: row y of the overlap is
(1 - y/blend) the neighbour's last rows plus y/blend its own), then cut to its first
tile * scale - blend rows and columns, and the cuts are laid side by side. As in diffusers, each
tile is blended into its neighbours after they were blended into theirs (in place, row by row).
Encoding cuts the image alike (tiles of tile * scale px) and blends the encoder's distribution,
its mean and log-variance, before the latents are sampled from it.

The decoder here gives images in [0, 1], clamped: tiles are blended after the clamp, diffusers
blends before it. The two are the same wherever the decoder's output lies within range, as a
trained VAE's does nearly everywhere (tests/engine/test_vae_tiling.py checks both). Our encoder
graph returns sampled latents, not the distribution: `moments` recovers it from two runs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ldm_deploy.errors import InvalidRequest

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def tile_of(tile_size: int | None, model) -> int:
    """The tile's latent side for a tile of `tile_size` px (None: the model's, diffusers' default;
    engines written before it was recorded: the U-Net's sample size); an InvalidRequest where that
    is not a multiple of 4 latent pixels."""
    if tile_size is None:
        return model.vae_tile or model.sample_size
    s = 4 * model.vae_scale  # (so that tiles of the image start every 3/4 of one at whole latent pixels)
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < s or tile_size % s:
        raise InvalidRequest(f"the VAE tile size must be a whole number of pixels, a multiple of {s}, got "
                             f"{tile_size!r}")
    return int(tile_size) // model.vae_scale


def tiles(side: int, tile: int) -> list[int]:
    """Where tiles start along a side: every int(tile * 3/4) from 0, as diffusers' loops."""
    return list(range(0, side, int(tile * (1 - OVERLAP))))


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, out_tile: int,
          on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """run (B, _, th, tw) -> (B, _, th * f, tw * f), f = out_tile / tile, over `x` in tile x tile
    pieces (the last ones of a row or column shorter), blended and laid side by side as
    AutoencoderKL's tiled_decode and _tiled_encode do; on_tile: called after each run."""
    blend = int(out_tile * OVERLAP)
    keep = out_tile - blend
    rows = []
    for i in tiles(x.shape[2], tile):
        row = []
        for j in tiles(x.shape[3], tile):
            row.append(run(np.ascontiguousarray(x[:, :, i:i + tile, j:j + tile])))
            if on_tile is not None:
                on_tile()
        rows.append(row)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if i > 0:
                blend_rows(rows[i - 1][j], t, blend)
            if j > 0:
                blend_columns(row[j - 1], t, blend)
    return np.concatenate([np.concatenate([t[:, :, :keep, :keep] for t in row], axis=3) for row in rows], axis=2)


def decode(decode_tile: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tile: int, scale: int,
           on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """(B, C, h, w) latents -> (B, 3, h * scale, w * scale) images, one decoder run a tile (of
    `tile` latent px). decode_tile: (B, C, th, tw) -> (B, 3, th * scale, tw * scale)."""
    return tiled(decode_tile, latents, tile, tile * scale, on_tile)


def encode(moments_of: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, tile: int, scale: int,
           on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """(B, 3, H, W) images -> (B, 2C, H / scale, W / scale): the encoder's mean and log-variance,
    one run a tile (of `tile` px), blended as diffusers blends them (before sampling).
    moments_of: (B, 3, th, tw) -> (B, 2C, th / scale, tw / scale)."""
    return tiled(moments_of, pixels, tile, tile // scale, on_tile)


def moments(mean_run: np.ndarray, shifted_run: np.ndarray, shift: float, scaling: float) -> np.ndarray:
    """(B, 2C, h, w) mean and log-variance of the encoder's distribution from two runs of our
    encoder graph (which returns scaling * (mean + std * sample_noise)): one with sample_noise 0,
    one with `shift` (large, so that std survives the subtraction in float32)."""
    std = (shifted_run - mean_run) / np.float32(scaling * shift)
    logvar = 2 * np.log(np.maximum(std, np.float32(1e-30)))
    return np.concatenate([mean_run / np.float32(scaling), logvar], axis=1)


def sample(moments_: np.ndarray, sample_noise: np.ndarray, scaling: float) -> np.ndarray:
    """scaling * (mean + std * sample_noise), std = exp(logvar / 2), logvar clamped to [-30, 20]:
    diffusers' DiagonalGaussianDistribution.sample, scaled as our encoder graph scales it."""
    mean, logvar = np.split(moments_, 2, axis=1)
    std = np.exp(np.float32(0.5) * np.clip(logvar, -30, 20))
    return np.float32(scaling) * (mean + std * sample_noise)


def ramp(n: int) -> np.ndarray:
    """(n,) weights y / n of the lower (or right) tile's own rows in an overlap of n."""
    return (np.arange(n) / n).astype(np.float32)


def blend_rows(above: np.ndarray, tile: np.ndarray, blend: int) -> None:
    """Fade `tile`'s first rows in over the last rows of the tile above it (in place)."""
    n = min(above.shape[2], tile.shape[2], blend)
    w = ramp(n)[:, None]
    tile[:, :, :n] = above[:, :, above.shape[2] - n:] * (1 - w) + tile[:, :, :n] * w


def blend_columns(left: np.ndarray, tile: np.ndarray, blend: int) -> None:
    """Fade `tile`'s first columns in over the last columns of the tile to its left (in place)."""
    n = min(left.shape[3], tile.shape[3], blend)
    w = ramp(n)
    tile[:, :, :, :n] = left[:, :, :, left.shape[3] - n:] * (1 - w) + tile[:, :, :, :n] * w
