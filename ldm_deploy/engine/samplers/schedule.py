"""Schedule math shared by the samplers: the training table, timestep spacing, sigmas.

Each function reproduces one step of diffusers' `set_timesteps` / `__init__`, so the samplers
built on them see the same timesteps and noise levels as the diffusers scheduler of the same
name. Two parameterisations of the same noise level appear throughout:

    VP:    x_t = alpha * x0 + sigma_vp * eps,  alpha = sqrt(alphas_cumprod)   (DDIM, DPM-Solver)
    sigma: x   = x0 + s * eps,                 s = sigma_vp / alpha          (Euler family)

so x = x_t / alpha, alpha = 1 / sqrt(s^2 + 1), sigma_vp = s * alpha.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ldm_deploy.engine.samplers.beta_dist import spaced_quantiles
from ldm_deploy.engine.samplers.update import COLUMNS
from ldm_deploy.errors import InvalidRequest

if TYPE_CHECKING:
    from ldm_deploy.engine.samplers import NoiseSchedule


class Walk(NamedTuple):
    """One sampler's answer for one request; `plan()` adds guidance and wraps it as a SamplerPlan.

    rows: (N, len(COLUMNS)) float64, the executed steps only; the guidance column is left 0.
    levels: (N, 2) float64, each executed row's noise level as the scheduler's `add_noise` puts
    an image there: x = levels[i, 0] * z + levels[i, 1] * noise (img2img starts at row 0's;
    inpainting with a text-to-image U-Net puts the image's known part back at each row's).
    draws: (N,) bool, the rows at which the scheduler draws fresh noise from the generator; None:
    every row when any row adds noise (c_n != 0), none otherwise.
    brownian: ((sigma_lo, sigma_hi), terms): a sampler whose noise is a Brownian motion's over
    the noise levels (dpmpp_sde.py): each row's noise input is sum(w * unit_noise(a, b)) over its
    terms ((w, a, b), ...) (brownian.py), from a tree over [sigma_lo, sigma_hi].
    """

    rows: np.ndarray
    init_noise_scale: float
    levels: np.ndarray
    draws: np.ndarray | None = None
    brownian: tuple | None = None


def table(n: int, **columns) -> np.ndarray:
    """(n, len(COLUMNS)) float64 rows from named columns (scalars or (n,) arrays); unnamed
    columns are 0, so a sampler states only the coefficients it uses."""
    rows = np.zeros((n, len(COLUMNS)))
    for name, values in columns.items():
        rows[:, COLUMNS.index(name)] = values
    return rows


def alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    """(num_train_timesteps,) float64 holding diffusers' float32 alphas_cumprod table.

    diffusers builds betas (torch.linspace: torch_linspace) and 1 - betas in float32 and stores the
    product in float32 (torch's CPU cumprod accumulates in float64). An all-float64 table differs
    by up to ~1e-6 relative: ~1e-5 in sigma_max ~ 14.6, and enough to flip the rounding of a Karras
    timestep on some schedules (the U-Net would then see t +- 1), so we round where diffusers rounds.
    """
    n, b0, b1 = schedule.num_train_timesteps, schedule.beta_start, schedule.beta_end
    if schedule.beta_schedule == "linear":
        betas = torch_linspace(b0, b1, n)
    elif schedule.beta_schedule == "scaled_linear":  # the latent-diffusion schedule
        betas = torch_linspace(b0**0.5, b1**0.5, n) ** 2
    else:
        raise InvalidRequest(
            f"beta_schedule {schedule.beta_schedule!r} is not supported; "
            "the samplers support 'linear' and 'scaled_linear' (all Stable Diffusion 1.x/2.x models)"
        )
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 `torch.linspace(start, end, n)` bit for bit, as diffusers builds its betas: ends and
    step in float32, the first half counted up from start and the second down from end by a fused
    multiply-add (exact in float64 here, then rounded to float32 once). numpy's linspace differs in
    the last bit of about a third of them, which can move a timestep diffusers truncates by one."""
    i = np.arange(n, dtype=np.float64)
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(n - 1)) if n > 1 else 0.0
    return np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i)).astype(np.float32)


def spaced_timesteps(spacing: str, steps: int, schedule: NoiseSchedule) -> np.ndarray:
    """(steps,) descending float64 timesteps, not yet rounded (Euler keeps linspace's fractions).

    The spacings of "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2,
    written exactly as diffusers does; only "leading" adds steps_offset.
    """
    n = schedule.num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps)[::-1]
    elif spacing == "leading":
        t = (np.arange(steps) * (n // steps))[::-1] + schedule.steps_offset
    elif spacing == "trailing":
        # For 62 step counts up to 1000 (61, 103, ...) the float arange yields one more point,
        # which diffusers keeps as a bogus extra step at t = -1; we stop at `steps`.
        t = (np.round(np.arange(n, 0, -n / steps)) - 1)[:steps]
    else:
        raise InvalidRequest(
            f"timestep_spacing {spacing!r} is not supported; use 'leading', 'linspace' or 'trailing'"
        )
    if t.max() > n - 1:
        raise InvalidRequest(
            f"timestep_spacing {spacing!r} with steps_offset {schedule.steps_offset} runs past the "
            f"model's last timestep {n - 1} at this step count; use fewer steps"
        )
    return t.astype(np.float64)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """(num_train_timesteps,) sigma-space noise level of each training timestep, ascending, in
    float32 as diffusers' sigma schedulers compute it (DPM2 a's s_down cancels all but a few bits
    of s_next^2, so a last bit of a sigma shows in its midpoints: sqrt below)."""
    table = alphas_cumprod.astype(np.float32)
    return sqrt((1 - table) / table).astype(np.float64)


# float32 sqrt, log and exp where diffusers' float32 arithmetic is followed to the last bit (DPM2 a's
# s_down cancels all but a few bits of s'^2; DPM++ SDE's Brownian noise is queried at levels rounded
# to 1e-6). These are numpy's, correctly rounded or nearly. torch's last bit depends on the CPU: on
# an AMD EPYC seen here its float32 sqrt differs from the correctly rounded one on 14-19% of values
# (arrays, scalars), its exp from numpy's on ~39%, its log on 5-25%, so diffusers' sigmas there
# are an ulp off ours. The tests put torch's own in their place (torchs_float32_rounding in
# tests/conftest.py): they check the arithmetic, not the CPU's last bit.
def sqrt(x: np.ndarray) -> np.ndarray:
    return np.sqrt(x)


def log(x: np.ndarray) -> np.ndarray:
    return np.log(x)


def exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x)


def sigma_at(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Noise level at (possibly fractional) timesteps: linear in t between training timesteps."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigmas: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
    """(steps,) descending sigmas of Karras et al. 2022 (eq. 5) between the training extremes."""
    lo, hi = sigmas[0] ** (1 / rho), sigmas[-1] ** (1 / rho)
    return (hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho


def exponential_sigmas(sigmas: np.ndarray, steps: int) -> np.ndarray:
    """(steps,) descending sigmas evenly spaced in log sigma between the training extremes
    (k-diffusion's get_sigmas_exponential, AUTOMATIC1111's "Exponential" schedule, diffusers'
    use_exponential_sigmas)."""
    return np.exp(np.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), steps))


def beta_sigmas(sigmas: np.ndarray, steps: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """(steps,) descending sigmas at the quantiles 1 - i / (steps - 1) of Beta(a, b) between the
    training extremes ("Beta Sampling is All You Need", Lee et al. 2024): dense at both ends of the
    walk. diffusers' use_beta_sigmas and AUTOMATIC1111's "Beta" schedule, both with a = b = 0.6."""
    lo, hi = sigmas[0], sigmas[-1]
    return lo + np.array(spaced_quantiles(steps, a, b)) * (hi - lo)


def sigma_to_t(sigma: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Inverse of `sigma_at`, interpolating linearly in log sigma as diffusers' `_sigma_to_t`
    does (clamped to [0, num_train_timesteps - 1]); log sigma rises with t, so np.interp fits."""
    return np.interp(np.log(np.maximum(sigma, 1e-10)), np.log(sigmas), np.arange(len(sigmas)))


def x0_coefficients(prediction_type: str, alpha, sigma_vp) -> tuple:
    """(p_x, p_m) with x0 = p_x * x_t + p_m * model_out, for VP-space x_t at noise level
    (alpha, sigma_vp). A sigma-space sampler multiplies p_x by alpha (its x is x_t / alpha)."""
    if prediction_type == "epsilon":  # x_t = alpha x0 + sigma eps
        return 1.0 / alpha, -sigma_vp / alpha
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x0  (Salimans & Ho 2022)
        return alpha, -sigma_vp
    raise InvalidRequest(
        f"prediction_type {prediction_type!r} is not supported; "
        "the samplers support 'epsilon' (SD 1.x, SD 2.x base) and 'v_prediction' (SD 2.x 768)"
    )


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first executed step for img2img, as StableDiffusionImg2ImgPipeline's
    `get_timesteps` computes it (int() truncates: 20 steps at 0.29 run 5, not 6)."""
    executed = min(int(steps * strength), steps)
    if executed < 1:
        raise InvalidRequest(
            f"strength {strength} with {steps} steps runs no denoising step "
            f"(int(steps * strength) = 0); raise strength to at least {1 / steps:.3g} or use more steps"
        )
    return steps - executed
