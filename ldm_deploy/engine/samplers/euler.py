"""Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers' EulerDiscreteScheduler.

Works in sigma space: x = x0 + s * eps is diffusers' `sample`, and the U-Net sees
x / sqrt(s^2 + 1), the VP-space latent it was trained on. One step is an Euler step of the
probability-flow ODE dx/ds = (x - x0) / s:

    x_next = x + (x - x0) / s * (s_next - s) = (s_next / s) x + (1 - s_next / s) x0

This file also holds the sigma schedule and model-input scaling that Euler ancestral shares.
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
    sigma_at,
    sigma_to_t,
    spaced_timesteps,
    table,
    train_sigmas,
    x0_coefficients,
)

DEFAULT_SPACING = "linspace"


def sigma_schedule(schedule, steps: int, karras: bool = False, exponential: bool = False,
                   timestep_dtype=np.float32, beta: bool = False,
                   ays: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(timesteps (steps,), sigmas (steps + 1,) ending in 0, init_noise_sigma) of diffusers'
    Euler schedulers with their defaults (linear interpolation, final sigma zero); karras: Karras
    et al.'s sigmas between the spaced ones' extremes, at the timesteps they interpolate to
    (use_karras_sigmas); exponential: evenly spaced in log sigma between them (use_exponential_sigmas);
    beta: at Beta(0.6, 0.6)'s quantiles between them (use_beta_sigmas); ays: at the Align Your
    Steps timesteps (ays.py), as `set_timesteps(timesteps=...)` takes them.
    timestep_dtype: the spaced timesteps' (DPMSolverSDEScheduler's are float64, the others' float32)."""
    spacing = schedule.timestep_spacing or DEFAULT_SPACING
    # The U-Net gets float32 timesteps (linspace keeps fractions); take sigma at exactly those.
    if ays:
        t = ays_timesteps(schedule, steps)
    else:
        t = spaced_timesteps(spacing, steps, schedule).astype(timestep_dtype).astype(np.float64)
    train = train_sigmas(alphas_cumprod(schedule))
    spaced = sigma_at(t, train)
    if karras or exponential or beta:  # (diffusers' float32 tables put its timesteps an ulp or so from these)
        low = spaced.min()
        if spacing == "trailing" and len(np.arange(schedule.num_train_timesteps, 0, -schedule.num_train_timesteps / steps)) > steps:
            low = train[0]  # diffusers' extra trailing point (t = -1, spaced_timesteps) sets its low end
        ends = np.array([low, spaced.max()])
        spaced = (karras_sigmas if karras else beta_sigmas if beta else exponential_sigmas)(ends, steps)
        t = sigma_to_t(spaced, train).astype(np.float32).astype(np.float64)
    sigmas = np.append(spaced, 0.0)
    # diffusers' init_noise_sigma: s_max for "linspace" / "trailing" (k-diffusion's convention),
    # sqrt(s_max^2 + 1), the std of x0 + s * eps for unit-variance x0, for "leading".
    s_max = sigmas.max()
    init = s_max if spacing in ("linspace", "trailing") else np.sqrt(s_max**2 + 1)
    return t, sigmas, float(init)


def sigma_space_input(prediction_type: str, sigma: np.ndarray) -> tuple:
    """(c_in, p_x, p_m) for sigma-space x: the model input and x0 conversion."""
    alpha = 1 / np.sqrt(sigma**2 + 1)  # x_t = alpha * x
    p_x, p_m = x0_coefficients(prediction_type, alpha, sigma * alpha)
    return alpha, p_x * alpha, p_m


def walk(schedule, steps: int, start: int, karras: bool = False, exponential: bool = False,
         beta: bool = False, ays: bool = False) -> Walk:
    """Coefficients for steps start..steps-1 of a `steps`-step Euler walk."""
    t, sigmas, init = sigma_schedule(schedule, steps, karras, exponential, beta=beta, ays=ays)
    s, s_next = sigmas[:-1], sigmas[1:]
    c_in, p_x, p_m = sigma_space_input(schedule.prediction_type, s)
    ratio = s_next / s
    rows = table(steps, timestep=t, c_in=c_in, p_x=p_x, p_m=p_m, c_x=ratio, c_0=1 - ratio)
    return Walk(rows[start:], init, sigma_levels(s)[start:])


def sigma_levels(s: np.ndarray) -> np.ndarray:
    """(N, 2) add_noise levels in sigma space: x = z + s * noise."""
    return np.stack([np.ones_like(s), s], 1)
