"""The U-Net step's text inputs for a request: the texts of each evaluation (prompt editing),
their token ids in 77-token chunks, the text encoder run once a chunk, and, for SDXL, the pooled
text and the six sizes.

    prompts -> per-step texts -> ids (tokenizer.py) -> text encoder -> {"text_embeddings", ...}
"""

from __future__ import annotations

import logging

import numpy as np

from ldm_deploy.engine import extra_networks, prompt_schedule
from ldm_deploy.engine.backends import Run
from ldm_deploy.engine.request import Request
from ldm_deploy.engine.samplers import EVALUATIONS_PER_STEP
from ldm_deploy.errors import InvalidRequest

log = logging.getLogger(__name__)


def step_inputs(pipe, req: Request, evaluations: int, offset: int = 0) -> list[dict]:
    """The text inputs of each of `evaluations` U-Net evaluations: the same buffers for all but
    where the prompt is edited, each distinct set of texts encoded once. offset: evaluations of
    the walk before the first (a refiner's part of it), which prompt editing counts."""
    be, m, b = pipe.backend, pipe.manifest.model, req.batch
    # (2, B) [uncond, cond] with guidance, (1, B) [cond] without (half the U-Net work).
    texts = list(req.negative_prompts) + list(req.prompts) if req.guided else list(req.prompts)
    if req.prompt_weighting:  # AUTOMATIC1111's syntax: its <lora:...> tags are not words (in the
        # prompt: as there, a negative prompt's are read as text)
        texts = texts[: len(texts) - b] + [without_tags(pipe, t) for t in texts[len(texts) - b:]]
    per_step = step_texts(texts, req, evaluations, offset)
    distinct = list(dict.fromkeys(per_step))
    emb = dict(zip(distinct, encode(pipe, distinct, len(texts) // b, req)))
    if m.pooled_width:
        sizes = be.upload(time_ids(m, req))
        emb = {t: {**e, "time_ids": sizes} for t, e in emb.items()}
    return [emb[t] for t in per_step]


def time_ids(m, req: Request) -> np.ndarray:
    """SDXL's size conditioning, as diffusers' _get_add_time_ids gives it: (B, 6) original
    (height, width), crop (top, left), target (height, width); a refiner's (K, B, 5) original
    size, crop and aesthetic score, the unconditional half's the negative score."""
    b = req.batch
    if not m.aesthetic:
        return np.tile(np.array([req.height, req.width, 0, 0, req.height, req.width], np.float32), (b, 1))
    scores = [req.negative_aesthetic_score, req.aesthetic_score] if req.guided else [req.aesthetic_score]
    return np.array([[[req.height, req.width, 0, 0, s]] * b for s in scores], np.float32)


def without_tags(pipe, text: str) -> str:
    """The text without AUTOMATIC1111's extra-network tags, saying once per pipeline where a tag
    asks for what the engine does not hold (extra_networks.py)."""
    stripped, tags = extra_networks.strip(text)
    for kind, arguments in tags:
        message = extra_networks.advice(kind, arguments, pipe.manifest.model.loras)
        if message and message not in pipe.warned:
            pipe.warned.add(message)
            log.warning(message)
    return stripped


def encode(pipe, sets: list[tuple[str, ...]], k: int, req: Request) -> list[dict]:
    """Sets of (K*B,) texts -> the U-Net step's text inputs for each: "text_embeddings",
    (K, B, n * 77, D), the text encoder run once a chunk; n is the same for all (shorter texts
    repeat their chunks or get chunks of "", tokenizer.py). SDXL: also "pooled_embeddings",
    (K, B, P), the first chunk's (as AUTOMATIC1111 takes it); with req.zero_negative, the
    unconditional half of both is zeros."""
    be, m = pipe.backend, pipe.manifest.model
    flat = [t for texts in sets for t in texts]
    ids, weights = pipe.tokenizer(flat, req.prompt_weighting, pipe.manifest.max_text_chunks)  # (S*K*B, n, 77)
    if not m.text_layers and np.any(weights != 1):  # engines from before clip skip and emphasis
        raise InvalidRequest("this engine's text encoder cannot weigh tokens (it was exported before prompt "
                             "emphasis); re-export it with ldm-export --force, or turn prompt weighting off")
    e = len(sets[0])
    shape = (k, e // k, m.text_length)
    clip_skip = be.upload(np.array([req.clip_skip], np.int64)) if m.text_layers else None
    zero = req.zero_negative and k == 2
    out = []
    for first in range(0, len(flat), e):
        rows = slice(first, first + e)
        chunks, pooled = [], None
        for i in range(ids.shape[1]):
            inputs = {"input_ids": be.upload(np.ascontiguousarray(ids[rows, i]).reshape(shape))}
            if m.text_layers:
                inputs["clip_skip"] = clip_skip
                inputs["token_weights"] = be.upload(np.ascontiguousarray(weights[rows, i]).reshape(shape))
            chunks.append(be.empty((*shape, m.text_width)))
            outputs = {"text_embeddings": chunks[-1]}
            if m.pooled_width:  # the first chunk's is kept; later ones' are written and dropped
                outputs["pooled_embeddings"] = be.empty((*shape[:2], m.pooled_width))
                pooled = outputs["pooled_embeddings"] if pooled is None else pooled
            be.run(pipe.components["text_encoder"], Run(inputs, outputs))
        # Several chunks (or zeros to put in): a few hundred KB, once a call, through the
        # host, so that backends need no concatenation.
        text = chunks[0] if len(chunks) == 1 and not zero else \
            be.upload(unconditional_zeroed(np.concatenate([be.download(c) for c in chunks], axis=2), zero))
        out.append({"text_embeddings": text})
        if pooled is not None:
            out[-1]["pooled_embeddings"] = be.upload(unconditional_zeroed(be.download(pooled), True)) \
                if zero else pooled
    return out


def step_texts(texts: list[str], req: Request, evaluations: int, offset: int = 0) -> list[tuple[str, ...]]:
    """The texts of each of `evaluations` U-Net evaluations: with prompt_weighting,
    AUTOMATIC1111's prompt editing ([from:to:when], [a|b]; prompt_schedule.py), scheduled over
    the request's steps times the sampler's evaluations a step (Heun: 2, as AUTOMATIC1111's
    total_steps), each evaluation counted, as its denoiser counts its calls."""
    if not req.prompt_weighting:
        return [tuple(texts)] * evaluations
    per_step = EVALUATIONS_PER_STEP.get(req.sampler, 1)
    steps = (req.edit_steps or req.steps) * per_step
    first = req.first_pass_steps or None  # the first pass's evaluations (its own sampler's count)
    schedules = [prompt_schedule.schedule(t, steps, first) for t in texts]
    return [tuple(prompt_schedule.text_at(s, offset + i) for s in schedules) for i in range(evaluations)]


def unconditional_zeroed(text: np.ndarray, zero: bool) -> np.ndarray:
    """(K, ...) text inputs with the unconditional half, K = 0, zeroed where `zero`."""
    if zero:
        text = text.copy()
        text[0] = 0
    return text
