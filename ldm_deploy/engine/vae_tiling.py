"""diffusers' VAE tiling (`pipe.enable_vae_tiling()`, AutoencoderKL.tiled_decode) for the decoder:
the final latents decoded in overlapping tiles, so that the decoder's memory (its mid-block
attention is quadratic in the latent's area: a 2048 px SD image's would hold 65536^2 scores)
stays that of one tile, whatever the image's size.

Latents of sides over `tile` (latent px; diffusers': the VAE's sample_size / its scale, 64 for
SD 1.x) are cut into tile x tile squares every int(tile * 3/4) (those at the far edges shorter);
each is decoded alone, and each decoded tile is blended into the one above and the one to its left
over blend = int(tile * scale / 4) pixels (linear ramps: row y of the overlap is (1 - y/blend)
the neighbour's last rows plus y/blend its own), then cut to its first tile * scale - blend rows
and columns, and the cuts are laid side by side. As in diffusers, each tile is blended into its
neighbours after they were blended into theirs (in place, row by row).

The decoder here gives images in [0, 1], clamped: tiles are blended after the clamp, diffusers
blends before it. The two are the same wherever the decoder's output lies within range, as a
trained VAE's does nearly everywhere (tests/engine/test_vae_tiling.py checks both).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ldm_deploy.errors import InvalidRequest

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def tile_of(tile_size: int | None, model) -> int:
    """The tile's latent side for a tile of `tile_size` px (None: the model's, diffusers' default;
    engines written before it was recorded: the U-Net's sample size); an InvalidRequest where that
    is no whole number of latent pixels, or under 4 of them."""
    if tile_size is None:
        return model.vae_tile or model.sample_size
    s = model.vae_scale
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 4 * s or tile_size % s:
        raise InvalidRequest(f"the VAE tile size must be a whole number of pixels, a multiple of {s} and at least "
                             f"{4 * s}, got {tile_size!r}")
    return int(tile_size) // s


def tiles(side: int, tile: int) -> list[int]:
    """Where tiles start along a latent side: every int(tile * 3/4) from 0, as diffusers' loop."""
    return list(range(0, side, int(tile * (1 - OVERLAP))))


def decode(decode_tile: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tile: int, scale: int,
           on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """(B, C, h, w) latents -> (B, 3, h * scale, w * scale) images, one decoder run a tile.

    decode_tile: (B, C, th, tw) -> (B, 3, th * scale, tw * scale); on_tile: called after each."""
    blend = int(tile * scale * OVERLAP)
    keep = tile * scale - blend
    rows = []
    for i in tiles(latents.shape[2], tile):
        row = []
        for j in tiles(latents.shape[3], tile):
            row.append(decode_tile(np.ascontiguousarray(latents[:, :, i:i + tile, j:j + tile])))
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
