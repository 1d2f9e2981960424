"""DPM2 and DPM2 ancestral (Karras et al. 2022's second-order DPM-Solver step, k-diffusion's
sample_dpm_2 / sample_dpm_2_ancestral), as diffusers' KDPM2DiscreteScheduler and
KDPM2AncestralDiscreteScheduler: two U-Net calls a step, 2N - 1 in all (the last step, to sigma 0,
has one).

Same sigmas and model input as Euler (see euler.py). A step from s to s' takes an Euler step to
the midpoint s_i (row A), then at x_i and s_i takes the whole step from x with the midpoint's slope
d_i = (x_i - x0_i) / s_i (row B):

    x_i    = (s_i / s) x + (1 - s_i / s) x0
    x_next = x + d_i (s_to - s)

with s_i = sqrt(s s_to), the middle in log sigma, and s_to = s'. Row B sees x_i and x0_i and, as
its state, row A's x0; x itself is (s / s_i) x_i + (1 - s / s_i) x0, which makes

    x_next = (s_to / s_i) x_i + ((s - s_to) / s_i) x0_i + (1 - s / s_i) x0

The ancestral sampler aims at s_down instead of s' (s_to = s_down, so s_i = sqrt(s s_down)) and adds
fresh noise of std s_up at row B only (Euler ancestral's split, see euler_ancestral.py): diffusers
draws one randn a step, at its second call, so `Walk.draws` marks those rows.

diffusers keeps these sigmas in float32 (its midpoints are torch's float32 log, lerp and exp); the
midpoints here are computed the same way, and the midpoint timesteps are not rounded (only the
Karras ones of the steps themselves are).
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers import schedule as ops32  # float32 sqrt, log, exp (see there)
from ldm_deploy.engine.samplers.euler import sigma_levels, sigma_schedule, sigma_space_input
from ldm_deploy.engine.samplers.schedule import Walk, alphas_cumprod, sigma_to_t, table, train_sigmas


def walk(schedule, steps: int, start: int, karras: bool = False, exponential: bool = False,
         ancestral: bool = False, beta: bool = False) -> Walk:
    """Coefficients for the calls of steps start..steps-1 of a `steps`-step DPM2 (or DPM2 a) walk."""
    t, sigmas, init = sigma_schedule(schedule, steps, karras, exponential, beta=beta)
    if karras:  # KDPM2's Karras timesteps are rounded (Euler's are not)
        t = np.round(t)
    s32 = sigmas.astype(np.float32)
    s, s_next = s32[:-1], s32[1:]
    if ancestral:
        up = ops32.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        down2 = s_next**2 - up**2
        # As diffusers computes it (parity wins wherever diffusers' is finite, if a few ulps of
        # s'^2 make it coarse), but where float32 cancels s_down^2 to <= 0 (Beta's sigmas on a
        # linear-betas model at 2-4 steps: s'^2 / s^2 ~ 1e-8), where diffusers gives NaN: there
        # its exact value, s'^2 / s
        to = np.where(down2 > 0, ops32.sqrt(np.maximum(down2, 0)), s_next**2 / s)
    else:
        up, to = np.zeros_like(s), s_next
    # diffusers' lerp runs from s' to s for DPM2, from s to s_down for DPM2 a
    mid = middle(s, to) if ancestral else middle(to, s)
    mid[-1] = 0.0  # the last step ends at sigma 0: its Euler step lands on x0
    t_mid = sigma_to_t(mid.astype(np.float64), train_sigmas(alphas_cumprod(schedule))).astype(np.float32)
    s, to, mid, up = (a.astype(np.float64) for a in (s, to, mid, up))
    rows, s_rows, draws = [], [], []
    for k in range(steps):
        c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, s[k])
        r = mid[k] / s[k]
        rows.append(table(1, timestep=t[k], c_in=c_in, p_x=p_x, p_m=p_m, c_x=r, c_0=1 - r))
        s_rows.append(s[k])
        draws.append(False)
        if mid[k] > 0:  # the midpoint call
            c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, mid[k])
            rows.append(table(1, timestep=t_mid[k], c_in=c_in, p_x=p_x, p_m=p_m, c_x=to[k] / mid[k],
                              c_0=(s[k] - to[k]) / mid[k], c_p=1 - s[k] / mid[k], c_n=up[k]))
            # diffusers' add_noise level after row A is already the next step's sigma (as Heun's)
            s_rows.append(sigmas[k + 1])
            draws.append(ancestral)
    # Step k's first call is row 2k: every step before it has two.
    return Walk(np.concatenate(rows)[2 * start:], init, sigma_levels(np.array(s_rows))[2 * start:],
                np.array(draws)[2 * start:])


def middle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 sqrt(a * b) as diffusers computes it: exp(torch.lerp(log a, log b, 0.5)), whose
    lerp at weight 0.5 is end - (end - start) / 2 (so the order matters in the last bit)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        start, end = ops32.log(a), ops32.log(b)
        return ops32.exp(end - (end - start) * np.float32(0.5)).astype(np.float32)
