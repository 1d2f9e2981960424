"""AUTOMATIC1111's "Hires. fix": draw at the model's size, then enlarge and redraw at the large size.

A model asked for 1024 px directly repeats its subject (it was trained at 512); drawn at 512 and
enlarged, the composition holds and img2img at the large size adds the detail. As AUTOMATIC1111
with an image upscaler ("Lanczos"): the first pass's 8-bit image is resized with Lanczos, encoded
by the VAE, noised to `strength` and denoised with the same prompt, seed and sampler, in
exactly the hires steps (AUTOMATIC1111's count: see img2img_steps); that is, diffusers'
StableDiffusionImg2ImgPipeline on the resized image (the tests check exactly that). The second
pass draws its noise afresh from the image's seed (AUTOMATIC1111 goes on with the first pass's
random stream), so its images are not AUTOMATIC1111's bit for bit; no sampler here is anyway.
AUTOMATIC1111's "Latent" upscalers (its default is "Latent") resize the first pass's latents
instead, with torch's interpolate (latent_resize.py), and redraw them without decoding and
encoding them: diffusers' img2img given those latents as its image. They need a strength of
about 0.5 or more; below it the redraw stays blurred, as in AUTOMATIC1111.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldm_deploy.engine import images, upscale
from ldm_deploy.engine.latent_resize import LATENT_UPSCALERS, resize
from ldm_deploy.engine.samplers import DISPLAY_NAMES, EVALUATIONS_PER_STEP, SAMPLERS
from ldm_deploy.errors import InvalidRequest

UPSCALER = "Lanczos"  # the default: an image upscaler, as diffusers' img2img of the resized image
UPSCALERS = (UPSCALER, *LATENT_UPSCALERS)  # AUTOMATIC1111's names


MAX_SCALE = 8  # AUTOMATIC1111's slider stops at 4; a bound keeps int(side * scale) finite


@dataclass(frozen=True)
class Hires:
    scale: float  # AUTOMATIC1111's "Upscale by"
    steps: int  # the second pass's steps, run exactly; 0: as many as the first pass
    strength: float  # its denoising strength
    upscaler: str = UPSCALER  # one of UPSCALERS
    # AUTOMATIC1111's "Hires prompt", "Hires negative prompt", "Hires sampler" (None: the first pass's)
    prompt: str | None = None
    negative_prompt: str | None = None
    sampler: str | None = None

    @property
    def latent(self) -> bool:
        """Whether the upscaler resizes latents (no VAE decode and encode between the passes)."""
        return self.upscaler in LATENT_UPSCALERS


def of(scale, steps, strength, upscaler, prompt=None, negative_prompt=None, sampler=None) -> Hires | None:
    """The Pipeline's hires_* keywords -> the hires fix asked for (None: none), defaults filled."""
    if scale is None:
        given = [k for k, v in (("hires_steps", steps), ("hires_strength", strength), ("hires_upscaler", upscaler),
                                ("hires_prompt", prompt), ("hires_negative_prompt", negative_prompt),
                                ("hires_sampler", sampler)) if v is not None]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise InvalidRequest(f"{', '.join(given)} ({flags}) set the hires fix's second pass; give hires_scale too "
                                 "(--hires-scale, e.g. 2), or leave them out")
        return None
    for name, value in (("hires_prompt", prompt), ("hires_negative_prompt", negative_prompt)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{name} must be text (None: the first pass's), got {type(value).__name__}")
    if sampler is not None and sampler not in SAMPLERS:
        raise InvalidRequest(f"unknown hires_sampler {sampler!r}; choose one of {', '.join(SAMPLERS)} (None: the "
                             "first pass's)")
    return Hires(scale, 0 if steps is None else steps, 0.7 if strength is None else strength,
                 upscaler_name(upscaler or UPSCALER), prompt, negative_prompt, sampler)


def number(name: str, value, whole: bool = False) -> float:
    """A finite int or float (numpy's too), not a bool or a string; an InvalidRequest otherwise."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value) and (not whole or int(value) == value)
    if not ok:
        kind = "a whole number" if whole else "a number"
        raise InvalidRequest(f"{name} must be {kind}, got {value!r}")
    return int(value) if whole else float(value)


def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's size: each side times `scale`, down to the engine's size multiple."""
    return tuple(int(v * scale) // multiple * multiple for v in (width, height))


def img2img_steps(h: Hires, steps: int) -> tuple[int, float]:
    """(steps, strength) of the img2img call that runs exactly the hires steps, as AUTOMATIC1111
    counts them: a schedule of int(n / strength) steps (strength at most 0.999), of which the
    last n run. img2img runs the last int(steps * strength) of its schedule; (n + 0.5) / total
    makes that exactly n whatever the rounding."""
    n = h.steps or steps
    total = int(n / min(h.strength, 0.999))
    return total, min((n + 0.5) / total, 1.0)


def check(h: Hires, img2img: bool, width: int, height: int, manifest) -> tuple[int, int]:
    """The target size, or an InvalidRequest saying what to change."""
    if img2img:
        raise InvalidRequest("hires fix enlarges a txt2img result; with an init image, ask for the size you "
                             "want instead (img2img resizes the init image to it)")
    if not 1 < number("hires_scale", h.scale) <= MAX_SCALE:
        raise InvalidRequest(f"hires_scale must be above 1 and at most {MAX_SCALE} (2 doubles each side), "
                             f"got {h.scale!r}")
    if number("hires_steps", h.steps, whole=True) < 0:
        raise InvalidRequest(f"hires_steps must be 0 (as many as steps) or more, got {h.steps!r}")
    if not 0 < number("hires_strength", h.strength) <= 1:
        raise InvalidRequest(f"hires_strength must be in (0, 1], got {h.strength!r} (AUTOMATIC1111's default: 0.7)")
    if not isinstance(h.upscaler, str) or h.upscaler not in UPSCALERS and h.upscaler not in manifest.upscalers:
        raise InvalidRequest(f"unknown hires upscaler {h.upscaler!r}; choose one of "
                             f"{', '.join((*UPSCALERS, *manifest.upscalers))}"
                             + ("" if manifest.upscalers else " (upscale models such as ESRGAN's: export them into the "
                                "engine with ldm-export --upscaler FILE)"))
    if "vae_encoder" not in manifest.files and not h.latent:
        raise InvalidRequest("hires fix redraws through img2img, and this engine was exported without the VAE "
                             "encoder (--no-img2img); re-export it without that flag, or use a Latent upscaler")
    w, h2 = target_size(width, height, h.scale, manifest.size_multiple)
    s = manifest.model.vae_scale
    hi_w, hi_h = manifest.dims["latent_width"].max * s, manifest.dims["latent_height"].max * s
    if w > hi_w or h2 > hi_h:
        raise InvalidRequest(f"hires fix at {h.scale}x makes {w}x{h2}, beyond this engine's largest size "
                             f"{hi_w}x{hi_h}; lower hires_scale, or re-export with a larger --max-size")
    return w, h2


def upscaler_name(name: str) -> str:
    """AUTOMATIC1111's spelling of an upscaler named in any letter case (the name unchanged if
    it is none of them, for check to refuse)."""
    return next((u for u in UPSCALERS if u.lower() == str(name).lower()), name)


def fields(h: Hires, req, i: int) -> dict:
    """AUTOMATIC1111's infotext fields for hires-fixed image i of a request (no steps: as the
    first pass's; the prompts and sampler where they are not the first pass's)."""
    out = {"Denoising strength": h.strength, "Hires upscale": h.scale,
           **({"Hires steps": h.steps} if h.steps else {}), "Hires upscaler": h.upscaler}
    if h.sampler is not None and h.sampler != req.sampler:
        from ldm_deploy.engine.infotext import SCHEDULE_LABELS, sampler_fields

        out.update(sampler_fields(DISPLAY_NAMES[h.sampler], "Hires sampler", "Hires schedule type"))
        # a name without its schedule would be read with the first pass's "Schedule type" (SGM Uniform)
        if "Hires schedule type" not in out and "Schedule type" in sampler_fields(DISPLAY_NAMES[req.sampler]) \
                and not out["Hires sampler"].endswith(tuple(f" {label}" for label in SCHEDULE_LABELS)):
            out["Hires schedule type"] = "Uniform"
    for key, mine, first in (("Hires prompt", h.prompt, req.prompts[i]),
                             ("Hires negative prompt", h.negative_prompt, req.negative_prompts[i])):
        if mine is not None and mine != first:
            out[key] = quote(mine)
    return out


def quote(text: str) -> str:
    """An infotext value as AUTOMATIC1111 quotes one: JSON where it holds a comma, colon or line break
    (and where it starts with a quote or a space, which its reader would otherwise lose)."""
    quoted = any(c in text for c in ',:\n') or text.startswith('"') or text != text.strip()
    return json.dumps(text, ensure_ascii=False) if quoted else text


def upscale_model(pipe, name: str) -> upscale.Upscaler:
    """The engine's upscale model `name`, loaded on first use and kept by the pipeline."""
    if name not in pipe.upscalers:
        pipe.upscalers[name] = upscale.Upscaler(pipe.engine_dir, name, pipe.manifest.upscalers[name],
                                                getattr(pipe.backend, "threads", None))
    return pipe.upscalers[name]


def second_pass(pipe, req, first: np.ndarray, fix: Hires, generator, progress, output_type: str = "np",
                control=None) -> np.ndarray:
    """The second pass of each image: its 8-bit first pass, resized (a Latent upscaler: its
    latents, resized), redrawn as img2img with its own seed (a generator given: the rest of
    its draws, as diffusers' img2img would make). ControlNets steer it too, their images
    resized to the new size, as in AUTOMATIC1111."""
    controls = {}
    if control is not None and control.pictures:
        controls = dict(control_image=list(control.pictures), control_scale=list(control.scales),
                        control_start=list(control.starts), control_end=list(control.ends))
    w, h = target_size(req.width, req.height, fix.scale, pipe.manifest.size_multiple)
    steps, strength = img2img_steps(fix, req.steps)
    if fix.latent:  # (B, C, h, w) -> one (1, C, H/8, W/8) each
        s = pipe.manifest.model.vae_scale
        mode, antialias = LATENT_UPSCALERS[fix.upscaler]
        inits = [images.InitLatents(x[None]) for x in resize(first, h // s, w // s, mode, antialias)]
    elif fix.upscaler in pipe.manifest.upscalers:  # a model (ESRGAN, ...), as AUTOMATIC1111 runs one
        model = upscale_model(pipe, fix.upscaler)
        inits = [upscale.resize(image, w, h, model, progress=progress) for image in images.to_pil(first)]
    else:
        inits = [image.resize((w, h), resample=Image.LANCZOS) for image in images.to_pil(first)]
    out = []
    for i, init in enumerate(inits):
        gen = [generator[i]] if isinstance(generator, (list, tuple)) else generator
        negative = fix.negative_prompt if fix.negative_prompt is not None else \
            None if req.zero_negative else req.negative_prompts[i]
        out.append(pipe(
            req.prompts[i] if fix.prompt is None else fix.prompt, negative_prompt=negative, steps=steps,
            guidance=req.guidance, seed=req.seeds[i], width=w, height=h, sampler=fix.sampler or req.sampler,
            init_image=init, strength=strength, clip_skip=req.clip_skip,
            prompt_weighting=req.prompt_weighting, generator=gen, output_type=output_type, progress=progress,
            _hires_pass=(req.steps * EVALUATIONS_PER_STEP.get(req.sampler, 1), fix.steps or req.steps), **req.variation(i), **controls,
        ))
    return np.concatenate(out)
