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

import math
from typing import Callable

import numpy as np

from ldm_deploy.errors import InvalidRequest

OVERLAP = 0.25  # diffusers' tile_overlap_factor
SHIFT = 256.0  # the second encoder run's sample noise: std * 256 stands well clear of float32's rounding of mean


def tile_of(tile_size: int | None, model, multiple: int = 8) -> int:
    """The tile's latent side for a tile of `tile_size` px (None: the model's, diffusers' default;
    engines written before it was recorded: the U-Net's sample size); an InvalidRequest where that
    is not a multiple of 4 latent pixels and of the engine's size multiple, or for an engine whose
    VAE pads circularly."""
    if model.tiling:
        raise InvalidRequest("this engine's VAE pads circularly (ldm-export --tiling), so that its images tile "
                             "seamlessly: on tiles it would wrap each tile onto itself; run it without VAE tiling")
    if tile_size is None:
        return model.vae_tile or model.sample_size
    s = math.lcm(4 * model.vae_scale, multiple)  # (tiles of the image start every 3/4 of one, at whole latents)
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < s or tile_size % s:
        raise InvalidRequest(f"the VAE tile size must be a whole number of pixels, a multiple of {s}, got "
                             f"{tile_size!r}")
    return int(tile_size) // model.vae_scale


def tiles(side: int, tile: int) -> list[int]:
    """Where tiles start along a side: every int(tile * 3/4) from 0, as diffusers' loops."""
    return list(range(0, side, int(tile * (1 - OVERLAP))))


def whole(sides, tile: int | None) -> bool:
    """Whether latents of these (h, w) sides run whole: no tiling, or no side over a tile
    (diffusers' test, the encoder's in pixels alike)."""
    return tile is None or max(sides) <= tile


def sides(side: int, tile: int) -> set[int]:
    """The lengths of the tiles along a side of `side` (in the tiles' units)."""
    return {min(tile, side - start) for start in tiles(side, tile)} if side > tile else {side}


def check_shapes(manifest, backend: str, tile: int, sizes) -> None:
    """An InvalidRequest, before anything is drawn, where a backend that runs only the latent
    sides its engine was built for (TensorRT's profiles, torch's exported ranges) would be handed
    a tile outside them: the last tiles of a row or column are often short (a 1280 px SD image
    in 512 px tiles ends in one of 128). sizes: the images' (width, height), in px."""
    if backend in ("onnxruntime", "openvino"):  # any size
        return
    s = manifest.model.vae_scale
    step = max(manifest.size_multiple // s, 1)
    for width, height in sizes:
        if whole((height // s, width // s), tile):
            continue
        for name, side, dim in (("wide", width // s, "latent_width"), ("tall", height // s, "latent_height")):
            lo, hi = manifest.dims[dim].min, manifest.dims[dim].max
            bad = sorted(n for n in sides(side, tile) if not lo <= n <= hi or n % step)
            if bad:
                raise InvalidRequest(
                    f"with VAE tiling in {tile * s} px tiles, a {width}x{height} image has tiles {bad[0] * s} px "
                    f"{name}, which this {backend} engine cannot run (its sides: {lo * s} to {hi * s} px, in "
                    f"multiples of {step * s}); choose another size or tile size (--vae-tile-size), or turn "
                    "VAE tiling off")


def tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, out_tile: int,
          on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """run (B, _, th, tw) -> (B, _, th * f, tw * f), f = out_tile / tile, over `x` in tile x tile
    pieces (the last ones of a row or column shorter), blended and laid side by side as
    AutoencoderKL's tiled_decode and _tiled_encode do; on_tile: called after each run."""
    blend = int(out_tile * OVERLAP)
    keep = out_tile - blend
    starts = [(i, j) for i in tiles(x.shape[2], tile) for j in tiles(x.shape[3], tile)]
    done = {}
    # run grouped by shape (whole tiles, then the edges'): a backend compiled for one shape at a
    # time (OpenVINO --static-shapes) compiles each shape once
    for i, j in sorted(starts, key=lambda ij: (min(tile, x.shape[2] - ij[0]), min(tile, x.shape[3] - ij[1])),
                       reverse=True):
        done[i, j] = run(np.ascontiguousarray(x[:, :, i:i + tile, j:j + tile]))
        if on_tile is not None:
            on_tile()
    rows = [[done[i, j] for j in tiles(x.shape[3], tile)] for i in tiles(x.shape[2], tile)]
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


def encode(sampled: Callable[[np.ndarray, np.ndarray], np.ndarray], pixels: np.ndarray, tile: int, model,
           on_tile: Callable[[], None] | None = None) -> np.ndarray:
    """(B, 3, H, W) images in [-1, 1] -> (B, 2C, H / s, W / s): the encoder's mean and
    log-variance, found a tile (of `tile` px) at a time and blended as diffusers blends them
    (before sampling). sampled: our encoder graph, (images, sample_noise) -> scaling * (mean +
    std * sample_noise), run twice a tile (`moments`); model: the manifest's ModelInfo."""
    s = model.vae_scale

    def moments_of(t: np.ndarray) -> np.ndarray:
        shape = (t.shape[0], model.latent_channels, t.shape[2] // s, t.shape[3] // s)
        runs = [sampled(t, np.full(shape, n, np.float32)) for n in (0.0, SHIFT)]
        return moments(*runs, SHIFT, model.vae_scaling_factor)

    return tiled(moments_of, pixels, tile, tile // s, on_tile)


def moments(mean_run: np.ndarray, shifted_run: np.ndarray, shift: float, scaling: float) -> np.ndarray:
    """(B, 2C, h, w) mean and log-variance of the encoder's distribution from two runs of our
    encoder graph (which returns scaling * (mean + std * sample_noise)): one with sample_noise 0,
    one with `shift` (large, so that std survives the subtraction in float32)."""
    std = (shifted_run - mean_run) / np.float32(scaling * shift)
    # (the graph's std is exp(logvar / 2) of a logvar clamped to [-30, 20], as diffusers clamps it;
    # one flushed to 0, or a hair below, in fp16 is taken as the least)
    logvar = np.clip(2 * np.log(np.maximum(std, np.float32(1e-38))), -30, 20)
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
