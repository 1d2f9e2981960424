"""AUTOMATIC1111's "Refiner", SDXL's ensemble of expert denoisers as diffusers runs it: one engine
draws the start of the walk, a second (an SDXL refiner) the rest, from the first one's latents.

    base(denoising_end=switch) -> latents -> refiner(init latents, denoising_start=switch) -> images

The walk is cut by timestep (samplers.plan): the base runs the steps whose timestep is at or
above round(1000 * (1 - switch)), the refiner the others, its multistep history started afresh
as diffusers' refiner pipeline starts it (AUTOMATIC1111 carries the sampler's state across the
switch, so its DPM++ 2M images differ slightly). Each image's generator goes on from one call to
the next, as one diffusers generator passed to both pipelines does.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine import images
from ldm_deploy.engine.infotext import model_name
from ldm_deploy.engine.request import Request
from ldm_deploy.errors import InvalidRequest

SWITCH_AT = 0.8  # AUTOMATIC1111's default "Switch at", and diffusers' example


def switch(pipe, refiner, at, denoising_start, denoising_end) -> float | None:
    """The base's denoising_end for a refiner switching at `at` (None: the default); the
    refiner checked against the base's model. None where no refiner is given."""
    if refiner is None:
        if at is not None:
            raise InvalidRequest("refiner_switch_at is where a refiner takes over: give the refiner too")
        return denoising_end
    if not callable(refiner) or not hasattr(refiner, "manifest"):
        raise InvalidRequest(f"refiner must be a loaded Pipeline (Pipeline.load(engine_dir)), got "
                             f"{type(refiner).__name__}")
    if denoising_start is not None or denoising_end is not None:
        raise InvalidRequest("a refiner sets where the walk is cut (refiner_switch_at); leave denoising_start and "
                             "denoising_end out")
    a, b = pipe.manifest.model, refiner.manifest.model
    if (a.latent_channels, a.vae_scale, a.vae_scaling_factor) != (b.latent_channels, b.vae_scale, b.vae_scaling_factor):
        raise InvalidRequest(f"the refiner ({model_name(b.source)}, {b.family}) draws in another latent space than "
                             f"this engine's model ({a.family}); give a refiner of the model's family")
    sa, sb = a.noise_schedule, b.noise_schedule
    if (sa.num_train_timesteps, sa.beta_start, sa.beta_end, sa.beta_schedule) != \
            (sb.num_train_timesteps, sb.beta_start, sb.beta_end, sb.beta_schedule):
        raise InvalidRequest(f"the refiner ({model_name(b.source)}) was trained on another noise schedule than this "
                             "engine's model, so it cannot take over its latents")
    return SWITCH_AT if at is None else at


def scores(m, refiner, score, negative) -> dict:
    """The Request's aesthetic scores, checked: an SDXL refiner's (m: the engine's ModelInfo); with a
    refiner given they are the refiner's, which its call takes (none here)."""
    out = {}
    for name, value in (("aesthetic_score", score), ("negative_aesthetic_score", negative)):
        if value is None:
            continue
        if not (refiner.manifest.model if refiner is not None else m).aesthetic:
            raise InvalidRequest(f"aesthetic_score and negative_aesthetic_score condition SDXL refiners; this "
                                 f"{'refiner' if refiner is not None else 'engine'}'s model takes none: leave them out")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise InvalidRequest(f"{name} must be a number (the refiner's defaults: 6.0 and 2.5), got {value!r}")
        out[name] = float(value)
    return {} if refiner is not None else out


def cut(start, end, init, mask, hires_scale, control) -> dict:
    """The Request's part of the walk (denoising_start / denoising_end), refused with what it
    cannot go with here."""
    if start is None and end is None:
        return {}
    if start is not None and init is None:
        raise InvalidRequest("denoising_start continues a walk from its latents: give them as init_image "
                             "(the first model's output_type=\"latent\")")
    if mask is not None or hires_scale is not None or control.first_image is not None:
        raise InvalidRequest("denoising_start / denoising_end (a refiner's switch) do not go with masks, the hires "
                             "fix or ControlNets here; leave one out")
    return {"denoising_start": start, "denoising_end": end}


def finish(refiner, req: Request, latents, generator, progress, output_type: str, aesthetic_score,
           negative_aesthetic_score):
    """The refiner's part of each image: (B, C, h, w) latents from the base's walk, cut at
    req.denoising_end -> (B, H, W, 3) images in [0, 1], or output_type "latent": its latents.
    Same prompts, seeds, steps, sampler and guidance; the aesthetic scores are the refiner's
    (None: its defaults; scores() refused them for a refiner that takes none)."""
    return refiner(
        list(req.prompts), negative_prompt=None if req.zero_negative else list(req.negative_prompts),
        steps=req.steps, guidance=req.guidance, seed=list(req.seeds), sampler=req.sampler,
        init_image=images.InitLatents(latents), denoising_start=req.denoising_end, clip_skip=req.clip_skip,
        prompt_weighting=req.prompt_weighting, generator=generator, progress=progress,
        output_type="latent" if output_type == "latent" else "np", aesthetic_score=aesthetic_score,
        negative_aesthetic_score=negative_aesthetic_score)


def fields(refiner, req: Request) -> dict:
    """AUTOMATIC1111's infotext fields for it: "Refiner: name [hash]", "Refiner switch at"."""
    b = refiner.manifest.model
    return {"Refiner": f"{model_name(b.source)} [{b.weights_sha256[:10]}]", "Refiner switch at": req.denoising_end}
