"""The VAE's components run on a backend: the decoder (latents -> images) and the encoder
(images -> sampled latents), each whole, or with VAE tiling (Pipeline.enable_vae_tiling) and a
side over a tile, one tile at a time (vae_tiling.py does the cutting and blending on the host)."""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine import progress as progress_, vae_tiling
from ldm_deploy.engine.backends import Run


def decode(be, decoder, x, shape: tuple, scale: int, tile: int | None, progress=False) -> np.ndarray:
    """Device latents `shape` (B, C, h, w) -> (B, 3, h * scale, w * scale) images in [0, 1] on the
    host (a bar over the tiles with progress True)."""

    def run(latents, size: tuple) -> np.ndarray:  # size: the latents' (B, C, h, w)
        out = be.empty((size[0], 3, size[2] * scale, size[3] * scale))
        be.run(decoder, Run({"latents": latents}, {"images": out}))
        return be.download(out)

    if vae_tiling.whole(shape[2:], tile):
        return run(x, shape)
    with tile_bar(shape[2:], tile, "decoding", progress) as done:
        return vae_tiling.decode(lambda t: run(be.upload(t), t.shape), be.download(x), tile, scale, done)


def encode(be, encoder, model, pixels: np.ndarray, sample_noise: np.ndarray, start_noise: np.ndarray, start,
           repeat: int = 1, tile: int | None = None, progress=False):
    """(B, 3, H, W) host images in [-1, 1] (each repeated `repeat` times) -> device latents
    start[0] * scaling * (mean + std * sample_noise) + start[1] * start_noise, (B * repeat, C, H/s,
    W/s), as the encoder graph computes them. Tiled (`tile` latent px), the distribution is found
    a tile at a time (two runs each, vae_tiling.encode) and sampled here."""
    coeffs = np.array(start, np.float32)

    def run(images, noise, start_noise, coeffs):
        out = be.empty(noise.shape)
        inputs = {"images": be.upload(images), "sample_noise": be.upload(noise),
                  "start_noise": be.upload(start_noise), "start_coeffs": be.upload(coeffs)}
        be.run(encoder, Run(inputs, {"latents": out}))
        return out

    if vae_tiling.whole([side // model.vae_scale for side in pixels.shape[2:]], tile):
        return run(np.repeat(pixels, repeat, axis=0).astype(np.float32), sample_noise, start_noise, coeffs)

    def sampled(t: np.ndarray, noise: np.ndarray) -> np.ndarray:  # scaling * (mean + std * noise)
        return be.download(run(t, noise, np.zeros_like(noise), np.array([1.0, 0.0], np.float32)))

    px = tile * model.vae_scale
    with tile_bar(pixels.shape[2:], px, "encoding", progress) as done:
        found = vae_tiling.encode(sampled, pixels.astype(np.float32), px, model, done)
    z = vae_tiling.sample(np.repeat(found, repeat, axis=0), sample_noise, model.vae_scaling_factor)
    return be.upload(coeffs[0] * z + coeffs[1] * start_noise)


def tile_bar(sides, tile: int, desc: str, progress):
    """progress.tile_bar over the tiles of a (h, w) side pair."""
    total = len(vae_tiling.tiles(sides[0], tile)) * len(vae_tiling.tiles(sides[1], tile))
    return progress_.tile_bar(total, desc, progress)
