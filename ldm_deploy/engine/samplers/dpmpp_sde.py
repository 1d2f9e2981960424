"""DPM++ SDE (Lu et al. 2022's DPM-Solver++ as a stochastic second-order step, k-diffusion's
sample_dpmpp_sde), as diffusers' DPMSolverSDEScheduler: two U-Net calls a step, 2N - 1 in all (the
last step, to sigma 0, is one Euler step onto x0).

Same sigmas and model input as Euler (see euler.py). With t = -log s, a step from s to s' goes
through s_m = exp(-(t + t') / 2), the middle in log sigma. Each half is an ancestral DPM-Solver++
step from s: to s_to it steps deterministically down to s_down and adds noise of std s_up
(s_down^2 + s_up^2 = s_to^2, as Euler ancestral's split), with e = s_down / s:

    x_m    = e_1 x + (1 - e_1) x0    + s_up1 n_1    (row A; 1 - e = -expm1(t - t_down))
    x_next = e_2 x + (1 - e_2) x0_m  + s_up2 n_2    (row B, the whole step from x with x0 at s_m)

Row B sees x_m and x0_m and, as its state, row A's x0; x = (x_m - (1 - e_1) x0 - s_up1 n_1) / e_1,
so its coefficients are c_x = e_2 / e_1, c_0 = 1 - e_2, c_p = -e_2 (1 - e_1) / e_1, and its noise
input (c_n = 1) is s_up2 n_2 - (e_2 s_up1 / e_1) n_1, made on the host.

The noise is not the generator's: n_1 and n_2 are increments of one Brownian motion over the noise
levels (brownian.py), n_1 over [s_m, s] and n_2 over [s', s], each over the square root of its
length, from a tree seeded by the image's seed (diffusers' `noise_sampler_seed`, AUTOMATIC1111's
per-image seeds), spanning the whole walk's sigmas. `Walk.brownian` lists each row's terms.

diffusers computes these coefficients in float32 (s_down cancels most bits of s_to^2; the noise's
query times are float32 exp(log s)): so do these, each torch scalar op rounded as torch rounds it.
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers import schedule as ops32  # float32 sqrt, log, exp (see there)
from ldm_deploy.engine.samplers.euler import sigma_levels, sigma_schedule, sigma_space_input
from ldm_deploy.engine.samplers.schedule import Walk, alphas_cumprod, sigma_to_t, table, train_sigmas

f32 = np.float32


def walk(schedule, steps: int, start: int, karras: bool = False, exponential: bool = False,
         beta: bool = False) -> Walk:
    """Coefficients for the calls of steps start..steps-1 of a `steps`-step DPM++ SDE walk."""
    t, sigmas, init = sigma_schedule(schedule, steps, karras, exponential, timestep_dtype=np.float64, beta=beta)
    # diffusers' midpoint timesteps come from its float64 sigmas
    logs = -np.log(sigmas[:-1])
    t_mid = sigma_to_t(np.exp(-(logs[:-1] + np.diff(logs) * 0.5)), train_sigmas(alphas_cumprod(schedule)))
    s32 = sigmas.astype(np.float32)
    rows, s_rows, terms = [], [], []
    for k in range(steps):
        s, s_next = s32[k], s32[k + 1]
        c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, float(s))
        s_rows.append(float(s))
        if s_next == 0:  # the last step: an Euler step onto x0
            rows.append(table(1, timestep=t[k], c_in=c_in, p_x=p_x, p_m=p_m, c_0=1.0))
            terms.append(())
            continue
        lam, lam_next = -log(s), -log(s_next)
        s_from = exp(-lam)
        s_mid = exp(-f32(lam + f32(f32(lam_next - lam) * f32(0.5))))
        e1, keep1, up1 = ancestral(lam, s_from, s_mid)
        rows.append(table(1, timestep=t[k], c_in=c_in, p_x=p_x, p_m=p_m, c_x=e1, c_0=keep1, c_n=1.0))
        terms.append(((up1, s_from, s_mid),))
        s_to = exp(-lam_next)
        e2, keep2, up2 = ancestral(lam, s_from, s_to)
        c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, float(s_mid))
        rows.append(table(1, timestep=t_mid[k], c_in=c_in, p_x=p_x, p_m=p_m, c_x=e2 / e1, c_0=keep2,
                          c_p=-e2 * keep1 / e1, c_n=1.0))
        terms.append(((up2, s_from, s_to), (-e2 * up1 / e1, s_from, s_mid)))
        s_rows.append(float(s_next))  # diffusers' add_noise level after row A (as Heun's)
    positive = s32[s32 > 0]
    span = (float(positive.min()), float(positive.max()))
    rows = np.concatenate(rows)[2 * start:]
    return Walk(rows, init, sigma_levels(np.array(s_rows))[2 * start:], draws=np.zeros(len(rows), bool),
                brownian=(span, tuple(terms[2 * start:])))


def ancestral(lam, s_from, s_to) -> tuple[float, float, float]:
    """(e, 1 - e, s_up) of one ancestral DPM-Solver++ step from s_from (at lam = -log s_from) toward
    s_to, in diffusers' float32 order of operations."""
    up = min(s_to, f32(ops32.sqrt(f32(f32(s_to * s_to) * f32(s_from * s_from - s_to * s_to)) / f32(s_from * s_from))))
    down = f32(ops32.sqrt(f32(s_to * s_to - up * up)))  # (float32 cancels most of it where s_to << s_from)
    with np.errstate(divide="ignore"):  # down is 0 where float32 cancels it (s_to far below s_from):
        lam_down = -log(down)  # then e = 0, as torch's log(0) = -inf makes diffusers' too
    e = f32(exp(-lam_down) / exp(-lam))
    keep = -f32(np.expm1(np.float64(f32(lam - lam_down))))
    return float(e), float(keep), float(up)


def log(x):
    """float32 log of a scalar, correctly rounded (float64, rounded once), through schedule.py's
    hook (torch's, diffusers' here, may differ in the last bit by CPU: said there)."""
    return f32(ops32.log(np.float64(x)))


def exp(x):
    return f32(ops32.exp(np.float64(x)))
