"""Align Your Steps (Sabour, Fidler and Kreis, NVIDIA 2024): noise levels tuned per model family.

NVIDIA published, for SD 1.5 and SDXL, the ten-step walks that their method optimised. Each is
eleven noise levels of the model's own training table (the last is t = 0, sigma_min):

    SD 1.x / 2.x: t = 999 850 736 645 545 455 343 233 124 24 | 0
    SDXL:         t = 999 845 730 587 443 310 193 116  53 13 | 0

diffusers ships the ten timesteps as `AysSchedules["StableDiffusionTimesteps"]` (and "...XL...")
for `pipe(..., timesteps=...)`: ten steps from those levels, then to sigma 0. For another number
of steps, NVIDIA's how-to (and ComfyUI's AlignYourStepsScheduler) interpolates the eleven levels
log-linearly to steps + 1 points and ends the walk at 0 instead of the last; here each of the first
`steps` becomes the nearest whole timestep, what diffusers' `timesteps=` takes. So 10 steps are
exactly diffusers' walk with AysSchedules, and any step count is diffusers' walk with
`timesteps=ays_timesteps(...)`.

The levels are the model's own table's at NVIDIA's timesteps (NVIDIA's published sigmas, to three
decimals, are those levels but for SDXL's last: 0.113, at t = 13.4), and each step count's are whole
timesteps: ComfyUI's walk with the same levels is near, not the same. AUTOMATIC1111's "Align Your
Steps" interpolates to `steps` points and then adds 0: its last step goes from sigma_min to 0, and
its other levels lie a little lower than these; but its DPM++ 3M SDE, which asks for steps + 1 and
drops the next-to-last level (sigma_min), walks these. From 74 steps (SDXL: 60) on, interpolated
levels near t = 0 fall on the same whole timestep: refused (a step of no length, a U-Net call spent).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ldm_deploy.engine.samplers.schedule import alphas_cumprod, sigma_to_t, train_sigmas
from ldm_deploy.errors import InvalidRequest

# NVIDIA's levels as training timesteps (the SD 1.5 schedule serves SD 2.x too, as in
# AUTOMATIC1111 and ComfyUI: NVIDIA tuned none for it).
TIMESTEPS = {
    "sd1": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
}


def ays_timesteps(schedule, steps: int) -> np.ndarray:
    """(steps,) whole timesteps, descending, of an Align Your Steps walk for `schedule.family`."""
    if schedule.num_train_timesteps != 1000:
        raise InvalidRequest(f"Align Your Steps is tuned for models trained over 1000 timesteps; this one has "
                             f"{schedule.num_train_timesteps}: choose another schedule (e.g. a _karras sampler)")
    most = most_steps(schedule)
    if steps > most:
        raise InvalidRequest(f"{steps} steps of Align Your Steps (made for 10) would repeat timesteps near the walk's "
                             f"end; use at most {most} steps with it, or another schedule")
    return spread(schedule, steps)


@lru_cache(maxsize=16)
def most_steps(schedule) -> int:
    """The step count below the first whose walk repeats a timestep (73 for SD 1.x, 59 for SDXL)."""
    return next(n for n in range(1, schedule.num_train_timesteps + 1) if len(np.unique(spread(schedule, n))) < n) - 1


def spread(schedule, steps: int) -> np.ndarray:
    """NVIDIA's levels at `steps` whole timesteps (some may repeat: ays_timesteps refuses those)."""
    train = train_sigmas(alphas_cumprod(schedule))
    levels = train[list(TIMESTEPS["sdxl" if schedule.family == "sdxl" else "sd1"])]
    if steps + 1 != len(levels):  # log-linear between the levels, at steps + 1 evenly spaced places
        places = np.linspace(0, 1, steps + 1)
        levels = np.exp(np.interp(places, np.linspace(0, 1, len(levels)), np.log(levels)))
    return np.round(sigma_to_t(levels[:-1], train))  # the last level gives way to 0
