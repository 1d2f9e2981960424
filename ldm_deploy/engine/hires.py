"""AUTOMATIC1111's "Hires. fix": draw at the model's size, then enlarge and redraw at the large size.

A model asked for 1024 px directly repeats its subject (it was trained at 512); drawn at 512 and
enlarged, the composition holds and img2img at the large size adds the detail. As AUTOMATIC1111
with an image upscaler ("Lanczos"): the first pass's 8-bit image is resized with Lanczos, encoded
by the VAE, noised to `strength` and denoised with the same prompt, seed and sampler; that is,
diffusers' StableDiffusionImg2ImgPipeline on the resized image (the tests check exactly that).
AUTOMATIC1111's default upscaler, "Latent", resizes latents instead: not done here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ldm_deploy.errors import InvalidRequest

UPSCALER = "Lanczos"


@dataclass(frozen=True)
class Hires:
    scale: float  # AUTOMATIC1111's "Upscale by"
    steps: int | None  # the second pass's steps; None: the first pass's
    strength: float  # its denoising strength


def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's size: each side times `scale`, down to the engine's size multiple."""
    return tuple(int(v * scale) // multiple * multiple for v in (width, height))


def check(h: Hires, img2img: bool, width: int, height: int, steps: int, manifest) -> tuple[int, int]:
    """The target size, or an InvalidRequest saying what to change."""
    if img2img:
        raise InvalidRequest("hires fix enlarges a txt2img result; with an init image, ask for the size you "
                             "want instead (img2img resizes the init image to it)")
    if isinstance(h.scale, bool) or not isinstance(h.scale, (int, float)) or not math.isfinite(h.scale) \
            or h.scale <= 1:
        raise InvalidRequest(f"hires_scale must be a number above 1 (2 doubles each side), got {h.scale!r}")
    if h.steps is not None and (isinstance(h.steps, bool) or not isinstance(h.steps, int) or h.steps < 1):
        raise InvalidRequest(f"hires_steps must be a whole number of at least 1 (or none: as steps), got {h.steps!r}")
    if not 0 < h.strength <= 1:
        raise InvalidRequest(f"hires_strength must be in (0, 1], got {h.strength!r} (AUTOMATIC1111's default: 0.7)")
    steps = h.steps or steps
    if int(steps * h.strength) < 1:  # img2img runs the last int(steps * strength) steps
        raise InvalidRequest(f"hires fix with strength {h.strength} in {steps} steps runs no denoising step; "
                             f"give it at least {math.ceil(1 / h.strength)} hires steps")
    if "vae_encoder" not in manifest.files:
        raise InvalidRequest("hires fix redraws through img2img, and this engine was exported without the VAE "
                             "encoder (--no-img2img); re-export it without that flag")
    w, h2 = target_size(width, height, h.scale, manifest.size_multiple)
    s = manifest.model.vae_scale
    hi_w, hi_h = manifest.dims["latent_width"].max * s, manifest.dims["latent_height"].max * s
    if w > hi_w or h2 > hi_h:
        raise InvalidRequest(f"hires fix at {h.scale}x makes {w}x{h2}, beyond this engine's largest size "
                             f"{hi_w}x{hi_h}; lower hires_scale, or re-export with a larger --max-size")
    return w, h2


def fields(h: Hires) -> dict:
    """AUTOMATIC1111's infotext fields for a hires-fixed image (no steps: as the first pass's)."""
    return {"Denoising strength": h.strength, "Hires upscale": h.scale,
            **({"Hires steps": h.steps} if h.steps else {}), "Hires upscaler": UPSCALER}
