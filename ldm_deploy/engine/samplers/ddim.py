"""DDIM (Song et al. 2020) with eta = 0, as diffusers' DDIMScheduler runs it.

Works in VP space (x is diffusers' `latents`) and feeds the U-Net x unscaled. One step:

    x0     = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_next = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,  eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)

Not expressible here, so not supported: clip_sample and thresholding (they clamp x0) and
eta > 0 (diffusers' pipelines default to 0). SD 1.x / 2.x configs set clip_sample false, and
StableDiffusionPipeline forces it off when a scheduler it is given has it on; but
DDIMScheduler.from_config(config) turns it on (its default) when the key is missing, and then
diffusers' DDIM clamps x0 to [-1, 1] where we do not.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.schedule import (
    Walk,
    alphas_cumprod,
    spaced_timesteps,
    table,
    x0_coefficients,
)

DEFAULT_SPACING = "leading"


def walk(schedule, steps: int, start: int) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step DDIM walk."""
    ac = alphas_cumprod(schedule)
    n = schedule.num_train_timesteps
    t = np.round(spaced_timesteps(schedule.timestep_spacing or DEFAULT_SPACING, steps, schedule))
    t = t.astype(np.int64)
    # diffusers steps back by n // steps whatever the spacing, so with "linspace" / "trailing"
    # a_prev is not always the next row's a_t; we keep that to stay identical.
    prev = t - n // steps
    # Past t = 0 there is no previous alpha: set_alpha_to_one gives a clean x0, else a_0 is reused.
    final = 1.0 if schedule.set_alpha_to_one else ac[0]
    a_t = ac[t]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)

    p_x, p_m = x0_coefficients(schedule.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    c_x = np.sqrt(1 - a_prev) / np.sqrt(1 - a_t)  # eps carries x's share of the noise
    c_0 = np.sqrt(a_prev) - c_x * np.sqrt(a_t)
    rows = table(steps, timestep=t, c_in=1.0, p_x=p_x, p_m=p_m, c_x=c_x, c_0=c_0)

    # add_noise at each timestep (VP forward process).
    return Walk(rows[start:], 1.0, np.stack([np.sqrt(a_t), np.sqrt(1 - a_t)], 1)[start:])
