"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with its defaults:
algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final,
final_sigmas_type "zero"; optionally with Karras sigmas ("DPM++ 2M Karras"), and its stochastic
form, algorithm_type "sde-dpmsolver++" ("DPM++ 2M SDE").

Works in VP space (x is diffusers' `latents`, fed to the U-Net unscaled). With
lambda = log(alpha / sigma_vp) = -log(s) and h = lambda_next - lambda:

    first order:  x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) x0
    second order: the same with x0 -> x0 + (x0 - x0_prev) / (2 r),  r = (lambda - lambda_prev) / h

The SDE form puts back part of the noise it removes, fresh each step (e = e^-h):

    x_next = (sigma_next / sigma) e x + alpha_next (1 - e^2) x0' + sigma_next sqrt(1 - e^2) noise

with x0' the same (first or second order) x0 estimate. diffusers draws that noise as a randn from
the pipeline's generator, not from k-diffusion's Brownian tree: our images follow diffusers'.

The first executed step has no x0_prev and is first order (also for img2img, which starts on a
fresh scheduler); the last step is first order because its sigma is zero, and lands on x0.

DPM++ 3M (solver_order 3; AUTOMATIC1111 offers its SDE form, "DPM++ 3M SDE") adds the x0 of two
steps back (x0_prev2, the graph's c_pp column): diffusers' third-order update, with D1 and D2 the
first and second divided differences of the x0s over lambda, is linear in x0, x0_prev, x0_prev2.
The second executed step is second order, and so is the one before the last in walks of under 15
steps (lower_order_final).
"""

from __future__ import annotations

import numpy as np

from ldm_deploy.engine.samplers.ays import ays_timesteps
from ldm_deploy.engine.samplers.schedule import (
    Walk,
    alphas_cumprod,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    table,
    train_sigmas,
    x0_coefficients,
)

DEFAULT_SPACING = "linspace"


def timesteps_and_sigmas(schedule, steps: int, karras: bool, exponential: bool = False,
                         beta: bool = False, ays: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(integer timesteps (steps,), sigmas (steps + 1,) ending in 0), as diffusers sets them
    (ays: the Align Your Steps timesteps, as `set_timesteps(timesteps=...)` takes them)."""
    sigmas = train_sigmas(alphas_cumprod(schedule))
    if ays:
        t = ays_timesteps(schedule, steps)
        return t, np.append(sigmas[t.astype(np.int64)], 0.0)
    if exponential or beta:
        return exponential_timesteps_and_sigmas(schedule, steps, beta_sigmas if beta else exponential_sigmas)
    if karras:
        # The U-Net gets the rounded timestep, the update uses the exact Karras sigma.
        s = karras_sigmas(sigmas, steps)
        return np.round(sigma_to_t(s, sigmas)), np.append(s, 0.0)
    spacing = schedule.timestep_spacing or DEFAULT_SPACING
    if spacing == "trailing":
        t = spaced_timesteps(spacing, steps, schedule)
    else:
        # diffusers spaces steps + 1 points and drops the last (t ~ 0): the final step then goes
        # from a real noise level straight to sigma 0 instead of spending a U-Net call near t = 0.
        t = spaced_timesteps(spacing, steps + 1, schedule)[:-1]
    t = np.round(t)
    return t, np.append(sigmas[t.astype(np.int64)], 0.0)


def exponential_timesteps_and_sigmas(schedule, steps: int,
                                     spread=exponential_sigmas) -> tuple[np.ndarray, np.ndarray]:
    """use_exponential_sigmas as diffusers' multistep schedulers set it (and use_beta_sigmas, spread
    beta_sigmas, alike): the sigmas from its float32 table, and each timestep interpolated in log sigma against that table and cast to an integer
    unrounded (floor: sigma_max's comes out 998, a float32 hair below 999)."""
    table32 = train_sigmas(alphas_cumprod(schedule)).astype(np.float32)  # ascending, as diffusers holds it
    s = spread(table32.astype(np.float64), steps)
    log_table = np.log(table32)  # float32: the interpolation's ends
    log_s = np.log(np.maximum(s, 1e-10))
    low = np.minimum(np.searchsorted(log_table, log_s, side="right") - 1, len(log_table) - 2).clip(min=0)
    lo, hi = log_table[low], log_table[low + 1]
    w = np.clip((lo - log_s) / (lo - hi), 0, 1)  # float64 over float32, as there
    return np.floor((1 - w) * low + w * (low + 1)), np.append(s, 0.0)


def walk(schedule, steps: int, start: int, karras: bool = False, sde: bool = False,
         exponential: bool = False, order: int = 2, heun: bool = False, beta: bool = False,
         ays: bool = False) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step DPM++ 2M (SDE) walk (order 3: 3M;
    heun: solver_type "heun", whose second-order term weighs D1 = (x0 - x0_prev) / r by
    alpha_next (1 - (1 - e^-2h) / (2h)) rather than the midpoint's a / 2; SDE form only here)."""
    t, s = timesteps_and_sigmas(schedule, steps, karras, exponential, beta, ays)
    alpha = 1 / np.sqrt(s**2 + 1)
    sigma_vp = s * alpha
    p_x, p_m = x0_coefficients(schedule.prediction_type, alpha[:-1], sigma_vp[:-1])
    c_x = np.zeros(steps)
    c_0 = np.ones(steps)  # the last step: x_next = x0
    c_p = np.zeros(steps)
    c_pp = np.zeros(steps)
    c_n = np.zeros(steps)  # the last step adds no noise: sigma_next is 0
    # lam = -log(0) = +inf at the final sigma; the loop stops short of it (the last step is set
    # above). Two steps at one noise level (only near num_train_timesteps steps) divide by zero;
    # plan() rejects the result.
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = -np.log(s)
        for k in range(start, steps - 1):
            h = lam[k + 1] - lam[k]
            c_x[k] = sigma_vp[k + 1] / sigma_vp[k]
            if sde:
                a = -alpha[k + 1] * np.expm1(-2 * h)  # alpha_next (1 - e^-2h)
                c_x[k] *= np.exp(-h)
                c_n[k] = sigma_vp[k + 1] * np.sqrt(-np.expm1(-2 * h))
            else:
                a = -alpha[k + 1] * np.expm1(-h)  # alpha_next (1 - e^-h)
            c_0[k] = a
            third = order == 3 and k > start + 1 and not (k == steps - 2 and steps < 15)
            if third:
                c_0[k], c_p[k], c_pp[k] = third_order(h, lam[k] - lam[k - 1], lam[k - 1] - lam[k - 2],
                                                      alpha[k + 1], sde)
            elif k > start:
                # midpoint: a / 2 of D1 = (x0 - x0_prev) / r; heun: alpha_next ((1 - e^-2h) / (-2h) + 1)
                weight = (1 + np.expm1(-2 * h) / (2 * h)) * alpha[k + 1] / a if heun else 0.5
                half_over_r = weight * h / (lam[k] - lam[k - 1])
                c_0[k] = a * (1 + half_over_r)
                c_p[k] = -a * half_over_r
    rows = table(steps, timestep=t, c_in=1.0, p_x=p_x, p_m=p_m, c_x=c_x, c_0=c_0, c_p=c_p, c_n=c_n, c_pp=c_pp)
    return Walk(rows[start:], 1.0, np.stack([alpha[:-1], sigma_vp[:-1]], 1)[start:])


def third_order(h: float, h0: float, h1: float, alpha_next: float, sde: bool) -> np.ndarray:
    """(c_0, c_p, c_pp): diffusers' third-order DPM-Solver++ update's weights of x0, x0_prev and
    x0_prev2 (h: this step's lambda gap, h0 and h1 the last two)."""
    r0, r1 = h0 / h, h1 / h
    d1_0 = np.array([1.0, -1.0, 0.0]) / r0  # (m0 - m1) / r0, as weights of (m0, m1, m2)
    d1_1 = np.array([0.0, 1.0, -1.0]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    if sde:
        e2 = -np.expm1(-2 * h)  # 1 - e^-2h
        b0, b1, b2 = alpha_next * e2, alpha_next * (e2 / (-2 * h) + 1), alpha_next * ((e2 - 2 * h) / (2 * h) ** 2 - 0.5)
    else:
        e1 = np.expm1(-h)  # e^-h - 1
        b0, b1, b2 = -alpha_next * e1, alpha_next * (e1 / h + 1), -alpha_next * ((e1 + h) / h**2 - 0.5)
    return b0 * np.array([1.0, 0.0, 0.0]) + b1 * d1 + b2 * d2
