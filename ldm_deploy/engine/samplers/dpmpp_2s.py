"""DPM++ 2S a (DPM-Solver++(2S) with ancestral noise), k-diffusion's sample_dpmpp_2s_ancestral, as
AUTOMATIC1111 and ComfyUI run it. diffusers has no scheduler for it: the walk is Euler's
(diffusers' EulerDiscreteScheduler: its sigmas, timesteps, model input and start, euler.py), the
step k-diffusion's, and the tests hold it to k-diffusion's own function.

Two U-Net calls a step, 2N - 1 in all (the last step, to sigma 0, has one). A step from s to s'
aims at s_down = s'^2 / s and adds fresh noise of std s_up (Euler ancestral's split, see
euler_ancestral.py). In log sigma it takes a first-order step halfway, to s_i = sqrt(s s_down)
(row A), and from x the whole way with the midpoint's x0 (row B):

    x_i    = (s_i / s) x + (1 - s_i / s) x0
    x_next = (s_down / s) x + (1 - s_down / s) x0_i + s_up * noise

(k-diffusion writes the ratios as exp(-h / 2) and exp(-h), h = log s - log s_down.) Row B sees
x_i and x0_i and, as its state, row A's x0; x itself is (s / s_i) x_i + (1 - s / s_i) x0, so

    x_next = (s_down / s_i) x_i + (1 - s_down / s) x0_i + (s_down / s - s_down / s_i) x0 + s_up * noise

Mathematically s_down = s'^2 / s and the midpoint s_i is s' itself. k-diffusion computes them in
float32, s_down as sqrt(s'^2 - s_up^2), which cancels to a few bits where s' / s is small (1%
off s'^2 / s at 2 steps, 14.6 -> 0.029), and its ratios from float32 logs; the coefficients here
follow that arithmetic (its exp, log and sqrt through schedule.py's float32 hook), so the images
are the ones it draws. The midpoint's timestep is the one its sigma interpolates to, unrounded
(k-diffusion's sigma_to_t, as DPM2's midpoints). The last step, to 0, is k-diffusion's Euler step,
which lands on x0. The noise is drawn once a step, after the second call, as k-diffusion draws
it: `Walk.draws` marks those rows.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers import schedule as ops32  # float32 sqrt, log, exp (see there)
from ldm_deploy.engine.samplers.euler import sigma_levels, sigma_schedule, sigma_space_input
from ldm_deploy.engine.samplers.schedule import Walk, alphas_cumprod, sigma_to_t, table, train_sigmas


def walk(schedule, steps: int, start: int, karras: bool = False, exponential: bool = False,
         beta: bool = False, ays: bool = False) -> Walk:
    """Coefficients for the calls of steps start..steps-1 of a `steps`-step DPM++ 2S a walk."""
    t, sigmas, init = sigma_schedule(schedule, steps, karras, exponential, beta=beta, ays=ays)
    f32 = np.float32
    s, s_next = sigmas[:-1].astype(f32), sigmas[1:].astype(f32)
    # k-diffusion's get_ancestral_step (eta 1), in float32
    up = np.minimum(s_next, ops32.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    down2 = s_next**2 - up**2
    # Where float32 cancels s_down^2 to <= 0 (Beta's sigmas on a linear-betas model at 3 steps, s' / s
    # ~ 1e-4), its exact value: k-diffusion there takes one Euler call to sigma 0 (at 0) or gives NaN.
    with np.errstate(divide="ignore", invalid="ignore"):
        down = np.where(down2 > 0, ops32.sqrt(np.maximum(down2, 0)), s_next**2 / s).astype(f32)
        # its DPM-Solver++(2S) step in log sigma: t = -log s, h = t_next - t, the midpoint at t + h / 2
        t_now, t_next = -ops32.log(s), -ops32.log(down)
        h = (t_next - t_now).astype(f32)
        mid, e_now = ops32.exp(-(t_now + f32(0.5) * h)).astype(f32), ops32.exp(-t_now).astype(f32)
        # (numpy's expm1: torch's is an ulp from it now and then, as its exp and log)
        a1, b1 = mid / e_now, -np.expm1(-h * f32(0.5))  # row A: x_i = a1 x + b1 x0
        a2, b2 = ops32.exp(-t_next).astype(f32) / e_now, -np.expm1(-h)  # x_next = a2 x + b2 x0_i + s_up noise
    mid[-1] = 0.0  # the last step: k-diffusion's Euler step to 0, onto x0
    t_mid = sigma_to_t(mid.astype(np.float64), train_sigmas(alphas_cumprod(schedule))).astype(np.float32)
    s, up, mid, a1, b1, a2, b2 = (np.asarray(v, np.float64) for v in (s, up, mid, a1, b1, a2, b2))
    rows, s_rows, draws = [], [], []
    for k in range(steps):
        c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, s[k])
        first = (a1[k], b1[k]) if mid[k] > 0 else (0.0, 1.0)
        rows.append(table(1, timestep=t[k], c_in=c_in, p_x=p_x, p_m=p_m, c_x=first[0], c_0=first[1]))
        s_rows.append(s[k])
        draws.append(False)
        if mid[k] > 0:  # the midpoint call
            c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, mid[k])
            # x = (x_i - b1 x0) / a1
            rows.append(table(1, timestep=t_mid[k], c_in=c_in, p_x=p_x, p_m=p_m, c_x=a2[k] / a1[k], c_0=b2[k],
                              c_p=-a2[k] * b1[k] / a1[k], c_n=up[k]))
            s_rows.append(sigmas[k + 1])  # x_i lies at the midpoint's level, s'
            draws.append(True)
    # Step k's first call is row 2k: every step before it has two.
    return Walk(np.concatenate(rows)[2 * start:], init, sigma_levels(np.array(s_rows))[2 * start:],
                np.array(draws)[2 * start:])
