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

import logging
import re
from dataclasses import replace

import numpy as np

from ldm_deploy.engine import images
from ldm_deploy.engine.infotext import model_name
from ldm_deploy.engine.request import Request, check_history, check_request
from ldm_deploy.engine.samplers import cutoff, plan, rows_above
from ldm_deploy.errors import InvalidRequest

log = logging.getLogger(__name__)
SWITCH_AT = 0.8  # AUTOMATIC1111's default "Switch at", and diffusers' example


def switch(pipe, refiner, at, denoising_start, denoising_end):
    """-> (the refiner, the base's denoising_end): the refiner checked against the base's model,
    switching at `at` (None: 0.8; 0: it draws all, 1: never, as in AUTOMATIC1111). No refiner
    given, or the base's own model (AUTOMATIC1111 then does not switch): (None, denoising_end)."""
    if refiner is None:
        if at is not None:
            raise InvalidRequest("refiner_switch_at is where a refiner takes over: give the refiner too")
        return None, denoising_end
    if not callable(refiner) or not hasattr(refiner, "manifest"):
        raise InvalidRequest(f"refiner must be a loaded Pipeline (Pipeline.load(engine_dir)), got "
                             f"{type(refiner).__name__}")
    if denoising_start is not None or denoising_end is not None:
        raise InvalidRequest("a refiner sets where the walk is cut (refiner_switch_at); leave denoising_start and "
                             "denoising_end out")
    at = SWITCH_AT if at is None else at
    if isinstance(at, bool) or not isinstance(at, (int, float, np.integer, np.floating)) or not 0 <= at <= 1:
        raise InvalidRequest(f"refiner_switch_at must be a fraction of the walk from 0 (the refiner draws it all) "
                             f"to 1 (it draws nothing), got {at!r}")
    a, b = pipe.manifest.model, refiner.manifest.model
    if a.weights_sha256 == b.weights_sha256:  # the same model (said once per pipeline)
        if "own refiner" not in pipe.warned:
            pipe.warned.add("own refiner")
            log.warning("the refiner given is this engine's own model (the same weights), which AUTOMATIC1111 does "
                        "not switch to either: the engine draws alone, with no refiner")
        return None, None
    if a.tiling != b.tiling:
        raise InvalidRequest(f"{'this engine' if a.tiling else 'the refiner'} tiles (ldm-export --tiling) and "
                             f"{'the refiner' if a.tiling else 'this engine'} does not; the refiner's steps would "
                             "draw seams: give both the same tiling")
    if (a.latent_channels, a.vae_scale, a.vae_scaling_factor) != (b.latent_channels, b.vae_scale, b.vae_scaling_factor):
        raise InvalidRequest(f"the refiner ({model_name(b.source)}, {b.family}) draws in another latent space than "
                             f"this engine's model ({a.family}); give a refiner of the model's family")
    if b.inpainting or a.inpainting:
        raise InvalidRequest(f"{'the refiner' if b.inpainting else 'this engine'} is an inpainting model, which "
                             "does not take part in a refiner's switch here; give text-to-image models")
    if timesteps(a.noise_schedule) != timesteps(b.noise_schedule):
        raise InvalidRequest(f"the refiner ({model_name(b.source)}) walks another noise schedule than this "
                             "engine's model (its scheduler config), so it cannot take over its latents")
    return refiner, float(at)


def timesteps(schedule) -> dict:
    """What places a walk's steps: the scheduler config but what the model predicts."""
    return {k: v for k, v in schedule.to_dict().items() if k != "prediction_type"}


def parts(req: Request, m) -> str:
    """Who draws a request cut at req.denoising_end: "both", or where the cut leaves one of them
    no step (img2img at a low strength, a few steps), "base" or "refiner" alone, as AUTOMATIC1111
    then never switches, or switches before the first step."""
    rows = plan(req.sampler, m.noise_schedule, req.steps, req.guidance, req.strength).rows
    above = rows_above(rows, cutoff(m.noise_schedule, req.denoising_end))
    return "refiner" if above == 0 else "base" if above == len(rows) else "both"


def settle(refiner, req: Request, m, img2img: bool) -> tuple:
    """-> (refiner, request, whether the refiner draws alone), where the switch leaves one model no
    step (parts()): the base alone has no refiner and no cut. What the refiner cannot draw of the
    request (sizes, clip skip, the sampler's history) is found here, before the base draws."""
    drawn = parts(req, m)
    if drawn == "base":  # (said where a switch was asked for: the image, and its PNG, come without the refiner)
        if req.denoising_end < 1:
            log.warning("the refiner draws no step: a switch at %g leaves it none of this %d-step %s walk (the last "
                        "step's timestep is above the switch's), so the base draws alone, as AUTOMATIC1111 then "
                        "does; lower the switch (--refiner-switch-at, refiner_switch_at) to let it draw",
                        req.denoising_end, req.steps, req.sampler)
        return None, replace(req, denoising_end=None), False
    try:
        check_request(req, refiner.manifest, img2img)
    except InvalidRequest as e:  # (its sizes, steps, ...: said as the refiner's, not this engine's)
        raise InvalidRequest(f"the refiner: {str(e).replace('this engine', 'its engine')}") from None
    check_history(refiner.manifest, req.sampler, req.steps, 1.0)
    warn_embeddings(m, refiner, req)
    return refiner, req, drawn == "refiner"


def warn_embeddings(m, refiner, req: Request) -> None:
    """Say once where the prompts use this engine's embeddings (ldm-export --embedding) that the
    refiner does not hold: it reads their words as plain text."""
    theirs = {e["word"] for e in refiner.manifest.model.embeddings}
    texts = req.prompts + req.negative_prompts
    missing = [e["word"] for e in m.embeddings if e["word"] not in theirs
               and any(re.search(rf"(?<![\w-]){re.escape(e['word'])}(?![\w-])", t) for t in texts)]
    if missing and "refiner embeddings" not in refiner.warned:
        refiner.warned.add("refiner embeddings")
        log.warning("the refiner does not hold the embedding%s %s (this engine's: ldm-export --embedding), so it reads "
                    "%s as plain words", "s" if len(missing) > 1 else "", ", ".join(missing),
                    "them" if len(missing) > 1 else "it")


def scores(m, refiner, score, negative) -> dict:
    """The Request's aesthetic scores, checked: an SDXL refiner's (m: the engine's ModelInfo); with a
    refiner given they are the refiner's, which its call takes (none here)."""
    out = {}
    for name, value in (("aesthetic_score", score), ("negative_aesthetic_score", negative)):
        if value is None:
            continue
        if not (refiner.manifest.model if refiner is not None else m).aesthetic:
            raise InvalidRequest(f"aesthetic_score and negative_aesthetic_score (--aesthetic-score, "
                                 f"--negative-aesthetic-score) condition SDXL refiners; this "
                                 f"{'refiner' if refiner is not None else 'engine'}'s model takes none: leave them out")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise InvalidRequest(f"{name} must be a number (the refiner's defaults: 6.0 and 2.5), got {value!r}")
        out[name] = float(value)
    return {} if refiner is not None else out


def cut(m, start, end, init, mask, hires_scale, control, latents, refining: bool) -> dict:
    """The Request's part of the walk (denoising_start / denoising_end), refused with what it
    cannot go with here (refining: the cut is a refiner's switch)."""
    if start is None and end is None:
        return {}
    what = "a refiner" if refining else "denoising_start / denoising_end"
    if mask is not None or hires_scale is not None or control.first_image is not None:
        raise InvalidRequest(f"{what} does not go with masks, the hires fix or ControlNets here; leave one out")
    if m.inpainting:
        raise InvalidRequest(f"{what} does not go with inpainting models here")
    if start is not None:
        if init is None:
            raise InvalidRequest("denoising_start continues a walk from its latents: give them as init_image "
                                 "(the first model's output_type=\"latent\")")
        if latents is not None:
            raise InvalidRequest("denoising_start continues from init_image's latents as they are: no noise is "
                                 "added, so leave latents out")
        if end is not None and start >= end:
            raise InvalidRequest(f"denoising_start ({start}) must be less than denoising_end ({end})")
    return {"denoising_start": start, "denoising_end": end}


def finish(refiner, m, req: Request, latents, generator, progress, output_type: str, *scores):
    """The refiner's part of each image: (B, C, h, w) latents from the base's walk, cut at
    req.denoising_end -> (B, H, W, 3) images in [0, 1], or output_type "latent": its latents.
    m: the base's ModelInfo, whose steps drawn prompt editing counts on from (AUTOMATIC1111's step
    counter)."""
    drawn = plan(req.sampler, m.noise_schedule, req.steps, req.guidance, req.strength, None, req.denoising_end).steps
    return draw(refiner, req, generator, progress, output_type, scores, init_image=images.InitLatents(latents),
                denoising_start=req.denoising_end, _first_step=drawn)


def alone(refiner, req: Request, init, latents, generator, progress, output_type, *scores):
    """A walk switched before its first step: the refiner draws the request alone -> (B, H, W, 3)
    images in [0, 1] (output_type "latent": its latents), which the base writes its PNGs of."""
    return draw(refiner, req, generator, progress, output_type, scores, width=req.width, height=req.height,
                init_image=init, strength=req.strength if init is not None else None, latents=latents,
                noise_multiplier=req.noise_multiplier)


def draw(refiner, req: Request, generator, progress, output_type, scores, **call):
    """The refiner called with the request's prompts, seeds, steps, sampler and guidance, and the
    aesthetic scores given (None: its defaults; scores() refused them for a refiner that takes none)."""
    return refiner(
        list(req.prompts), negative_prompt=None if req.zero_negative else list(req.negative_prompts),
        steps=req.steps, guidance=req.guidance, seed=list(req.seeds), sampler=req.sampler, clip_skip=req.clip_skip,
        prompt_weighting=req.prompt_weighting, generator=generator, progress=progress,
        output_type="latent" if output_type == "latent" else "np", aesthetic_score=scores[0],
        negative_aesthetic_score=scores[1], **req.variation(), **call)


def fields(refiner, req: Request) -> dict:
    """AUTOMATIC1111's infotext fields for it: "Refiner: name [hash]", "Refiner switch at"."""
    b = refiner.manifest.model
    return {"Refiner": f"{model_name(b.source)} [{b.model_hash}]", "Refiner switch at": req.denoising_end}
