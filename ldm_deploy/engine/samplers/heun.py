"""Heun (Karras et al. 2022, Algorithm 1 without churn), as diffusers' HeunDiscreteScheduler:
two U-Net calls per step, 2N - 1 in all (the last step, to sigma 0, is a plain Euler step).

Same sigmas and model input as Euler (see euler.py). A step from s to s' first takes the Euler
step to x' = (s'/s) x + (1 - s'/s) x0 (row A), then, at x' and s', corrects it with the average
of the two slopes (row B): with d = (x - x0) / s and d' = (x' - x0') / s',

    x_next = x + (d + d') / 2 (s' - s)

Row B sees x' and x0' and, as its state, row A's x0; x itself is (x' - (1 - s'/s) x0) / (s'/s),
which makes d = (x' - x0) / s' and, with it,

    x_next = x' + (s - s') / (2 s') (x0' - x0)

linear in what one unet_step has: c_x = 1, c_0 = -c_p = (s - s') / (2 s').
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.euler import sigma_levels, sigma_schedule, sigma_space_input
from ldm_deploy.engine.samplers.schedule import Walk, table


def walk(schedule, steps: int, start: int, karras: bool = False, exponential: bool = False,
         beta: bool = False, ays: bool = False) -> Walk:
    """Coefficients for the calls of steps start..steps-1 of a `steps`-step Heun walk."""
    t, sigmas, init = sigma_schedule(schedule, steps, karras, exponential, beta=beta, ays=ays)
    rows, s_rows = [], []  # s_rows: the sigma each row's input latents sit at
    for k in range(steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, s)
        r = s_next / s
        rows.append(table(1, timestep=t[k], c_in=c_in, p_x=p_x, p_m=p_m, c_x=r, c_0=1 - r))
        s_rows.append(s)
        if s_next > 0:  # the correction, at x' and s'
            c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, s_next)
            half = (s - s_next) / (2 * s_next)
            rows.append(table(1, timestep=t[k + 1], c_in=c_in, p_x=p_x, p_m=p_m, c_x=1.0, c_0=half, c_p=-half))
            s_rows.append(s_next)
    # Step k's first call is row 2k: every step before it has two.
    return Walk(np.concatenate(rows)[2 * start:], init, sigma_levels(np.array(s_rows))[2 * start:])
