"""TCD, Trajectory Consistency Distillation (Zheng et al. 2024), as diffusers' TCDScheduler with
the gamma its docs draw with (the step's `eta`, 0.3): the sampler of the TCD LoRAs, which let an
SD 1.x / SDXL model draw in 2-8 steps (guidance 1 or off).

It walks LCM's timesteps (lcm.timesteps). Each step goes from timestep t down past the next one,
t', to s = floor((1 - gamma) t') by DDIM's deterministic step on the model's x0 and epsilon, then
back up to t' with fresh noise:

    x_s    = sqrt(a_s) x0 + sqrt(1 - a_s) eps,        eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)
    x_next = sqrt(a_t' / a_s) x_s + sqrt(1 - a_t' / a_s) noise       (the last step: x_s, t' = 0)

(a: alphas_cumprod). eps is linear in x and x0, so each step is a row of our table.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.lcm import timesteps
from ldm_deploy.engine.samplers.schedule import Walk, alphas_cumprod, table, x0_coefficients

GAMMA = 0.3  # TCDScheduler.step's default eta, the value its docs and the TCD LoRAs' cards draw with


def walk(schedule, steps: int, start: int, gamma: float = GAMMA) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step TCD walk."""
    t = timesteps(schedule, steps, "tcd")
    acp = alphas_cumprod(schedule)
    t_next = np.append(t[1:], 0)  # (diffusers' prev_timestep: 0 after the last step)
    s = np.floor((1 - gamma) * t_next).astype(np.int64)
    a_t, a_next, a_s = acp[t], acp[t_next], acp[s]
    alpha, sigma_vp = np.sqrt(a_t), np.sqrt(1 - a_t)
    p_x, p_m = x0_coefficients(schedule.prediction_type, alpha, sigma_vp)
    last = np.arange(steps) == steps - 1
    up = np.where(last, 1.0, np.sqrt(a_next / a_s))  # back up to t' (not after the last step)
    c_n = np.where(last | (gamma == 0), 0.0, np.sqrt(1 - a_next / a_s))
    to_s = np.sqrt(1 - a_s) / sigma_vp  # eps's share of x_s, per unit of eps
    rows = table(steps, timestep=t, c_in=1.0, p_x=p_x, p_m=p_m, c_x=up * to_s,
                 c_0=up * (np.sqrt(a_s) - to_s * alpha), c_n=c_n)
    return Walk(rows[start:], 1.0, np.stack([alpha, sigma_vp], 1)[start:], draws=(c_n != 0)[start:])
