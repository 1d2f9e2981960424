"""DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler with its defaults:
variance "fixed_small", spaced timesteps ("leading"), each step to the next scheduled timestep.

VP space, like DDIM. With a = alphas_cumprod at this step's timestep, a' at the next one (1 after
the last), beta = 1 - a / a' (the step's own noise), the posterior of x' given x and x0 is

    x' = sqrt(a') beta / (1 - a) x0 + sqrt(a / a') (1 - a') / (1 - a) x + sqrt(var) noise,
    var = (1 - a') / (1 - a) beta

fresh noise at every step whose timestep is above 0.

Not supported: clip_sample (DDPMScheduler's default clamps x0 to [-1, 1]; Stable Diffusion
configs turn it off, and export warns where one does not), thresholding, and variance types
other than "fixed_small".
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.schedule import Walk, alphas_cumprod, spaced_timesteps, table, x0_coefficients

DEFAULT_SPACING = "leading"


def walk(schedule, steps: int, start: int) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step DDPM walk."""
    ac = alphas_cumprod(schedule)
    t = np.round(spaced_timesteps(schedule.timestep_spacing or DEFAULT_SPACING, steps, schedule)).astype(np.int64)
    a_t = ac[t]
    a_next = np.append(ac[t[1:]], 1.0)  # diffusers' previous_timestep: the next one scheduled, then -1
    beta = 1 - a_t / a_next
    p_x, p_m = x0_coefficients(schedule.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t))
    c_0 = np.sqrt(a_next) * beta / (1 - a_t)
    c_x = np.sqrt(a_t / a_next) * (1 - a_next) / (1 - a_t)
    variance = np.maximum((1 - a_next) / (1 - a_t) * beta, 1e-20)
    c_n = np.where(t > 0, np.sqrt(variance), 0.0)
    rows = table(steps, timestep=t, c_in=1.0, p_x=p_x, p_m=p_m, c_x=c_x, c_0=c_0, c_n=c_n)
    # diffusers draws a step's noise only where t > 0
    return Walk(rows[start:], 1.0, np.stack([np.sqrt(a_t), np.sqrt(1 - a_t)], 1)[start:], draws=(t > 0)[start:])
