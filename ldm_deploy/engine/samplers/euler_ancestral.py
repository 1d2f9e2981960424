"""Euler ancestral, as diffusers' EulerAncestralDiscreteScheduler (k-diffusion's
sample_euler_ancestral).

Same sigmas and model input as Euler (see euler.py). Each step splits the move to s_next into a
deterministic Euler step down to s_down and fresh noise of std s_up, s_down^2 + s_up^2 = s_next^2:

    s_up   = sqrt(s_next^2 (s^2 - s_next^2) / s^2),  s_down = sqrt(s_next^2 - s_up^2) = s_next^2 / s
    x_next = (s_down / s) x + (1 - s_down / s) x0 + s_up * noise

Only this sampler needs per-step noise; the last step (s_next = 0) adds none.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.euler import sigma_levels, sigma_schedule, sigma_space_input
from ldm_deploy.engine.samplers.schedule import Walk, table


def walk(schedule, steps: int, start: int) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step Euler ancestral walk."""
    t, sigmas, init = sigma_schedule(schedule, steps)
    s, s_next = sigmas[:-1], sigmas[1:]
    c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, s)
    s_up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
    ratio = (s_next / s) ** 2  # s_down / s, in the closed form that cannot go negative
    rows = table(steps, timestep=t, c_in=c_in, p_x=p_x, p_m=p_m, c_x=ratio, c_0=1 - ratio, c_n=s_up)
    return Walk(rows[start:], init, sigma_levels(s)[start:])
