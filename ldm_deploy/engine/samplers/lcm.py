"""LCM (Luo et al. 2023), as diffusers' LCMScheduler: the sampler for LCM-LoRA, which lets an
SD 1.x / 2.x model draw in 2-8 steps (with guidance 1-2).

Each step the model's x0 prediction passes the consistency boundary condition, then goes back up
to the next timestep's noise level with fresh noise, as DDPM's forward process would:

    denoised = c_skip x + c_out x0,   c_skip = d^2 / (u^2 + d^2),  c_out = u / sqrt(u^2 + d^2)
    x_next   = sqrt(acp_next) denoised + sqrt(1 - acp_next) noise      (the last step: denoised)

with d = 0.5 (sigma_data) and u = 10 t (timestep_scaling). The boundary condition is linear in x
and x0, so it folds into p_x / p_m: `state` holds `denoised`. The timesteps are a subset of the
distillation schedule: the 50 (original_inference_steps) timesteps k - 1, 2k - 1, ... with
k = num_train_timesteps // 50, of which `steps` evenly spaced ones are taken from the top.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.schedule import Walk, alphas_cumprod, table, x0_coefficients
from ldm_deploy.errors import InvalidRequest

ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def timesteps(schedule, steps: int, name: str = "lcm") -> np.ndarray:
    """(steps,) descending integer timesteps, as LCMScheduler.set_timesteps(steps) sets them (and
    TCDScheduler's: `name`, the sampler's, for the error)."""
    if steps > ORIGINAL_STEPS:
        raise InvalidRequest(f"the {name} sampler takes at most {ORIGINAL_STEPS} steps (its distillation "
                             f"schedule), got {steps}; {name.upper()}-LoRA models need only 2-8")
    k = schedule.num_train_timesteps // ORIGINAL_STEPS
    origin = (np.arange(1, ORIGINAL_STEPS + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, ORIGINAL_STEPS, steps, endpoint=False)).astype(np.int64)]


def walk(schedule, steps: int, start: int) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step LCM walk."""
    t = timesteps(schedule, steps)
    acp = alphas_cumprod(schedule)[t]
    alpha, sigma_vp = np.sqrt(acp), np.sqrt(1 - acp)
    p_x, p_m = x0_coefficients(schedule.prediction_type, alpha, sigma_vp)
    u = t * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2)
    c_out = u / np.sqrt(u**2 + SIGMA_DATA**2)
    # x_next = alpha_next * denoised + sigma_next * noise; the last step returns denoised.
    c_0 = np.append(alpha[1:], 1.0)
    c_n = np.append(sigma_vp[1:], 0.0)
    rows = table(steps, timestep=t, c_in=1.0, p_x=c_out * p_x + c_skip, p_m=c_out * p_m, c_0=c_0, c_n=c_n)
    # DDPM's add_noise at each timestep; diffusers draws no noise at the last step.
    return Walk(rows[start:], 1.0, np.stack([alpha, sigma_vp], 1)[start:], draws=(c_n != 0)[start:])
