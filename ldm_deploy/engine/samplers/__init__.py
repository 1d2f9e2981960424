"""Samplers as data: a table of per-step coefficients computed on the host with numpy.

Every sampler here is a linear combination of the current latents, the model's x0 prediction,
the previous x0 prediction and fresh noise (see `update.py`), so one exported `unet_step` graph
serves them all; changing sampler, steps or guidance never rebuilds an engine.

    plan("dpmpp_2m_karras", NoiseSchedule.from_config(scheduler_config), steps=30, guidance=7.5)

Each sampler (one file each) but DPM++ 2S a equals the diffusers scheduler of the same name made with
`Cls.from_config(scheduler_config)`, step for step: DDIMScheduler (eta 0), DDPMScheduler, EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler, HeunDiscreteScheduler (two rows a step), DPMSolverMultistepScheduler (defaults; use_karras_sigmas for
the Karras variants, use_exponential_sigmas for the Exponential ones, algorithm_type "sde-dpmsolver++"
for the SDE ones, solver_order 3 for the 3M ones, solver_type "heun" for the SDE Heun ones), LCMScheduler, UniPCMultistepScheduler (defaults; use_karras_sigmas for unipc_karras,
use_exponential_sigmas for unipc_exponential), KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler
(two rows a step), DPMSolverSDEScheduler (two rows a step; its noise_sampler_seed is the image's seed),
TCDScheduler (its step's eta 0.3: STEP_OPTIONS); the
`_sgm_uniform` ones with timestep_spacing "trailing", the `_beta` ones with use_beta_sigmas, the `_ays` ones
with `set_timesteps(timesteps=ays.ays_timesteps(...))` (Align Your Steps: ays.py); Euler, Heun
and the DPM2s take Karras and Exponential sigmas too. DPM++ 2S a (dpmpp_2s.py), which diffusers lacks, is
k-diffusion's sample_dpmpp_2s_ancestral on Euler's walk (K_DIFFUSION_ONLY).
`schedule.py` holds the schedule math they share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from ldm_deploy.engine.samplers import (ddim, ddpm, dpm2, dpmpp_2m, dpmpp_2s, dpmpp_sde, euler, euler_ancestral, heun,
                                        lcm, tcd, unipc)
from ldm_deploy.engine.samplers.schedule import Walk, img2img_start
from ldm_deploy.engine.samplers.update import C_N, COLUMNS, GUIDANCE
from ldm_deploy.errors import InvalidRequest

# name -> (A1111-style display name written to PNG metadata, walk(schedule, steps, start)).
_REGISTRY = {
    "ddim": ("DDIM", ddim.walk),
    "ddpm": ("DDPM", ddpm.walk),
    "euler": ("Euler", euler.walk),
    "euler_karras": ("Euler Karras", partial(euler.walk, karras=True)),
    "euler_a": ("Euler a", euler_ancestral.walk),
    "heun": ("Heun", heun.walk),
    "heun_karras": ("Heun Karras", partial(heun.walk, karras=True)),
    "dpmpp_2m": ("DPM++ 2M", partial(dpmpp_2m.walk, karras=False)),
    "dpmpp_2m_karras": ("DPM++ 2M Karras", partial(dpmpp_2m.walk, karras=True)),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", partial(dpmpp_2m.walk, sde=True)),
    "dpmpp_2m_sde_karras": ("DPM++ 2M SDE Karras", partial(dpmpp_2m.walk, karras=True, sde=True)),
    "dpmpp_2m_exponential": ("DPM++ 2M Exponential", partial(dpmpp_2m.walk, exponential=True)),
    "dpmpp_2m_sde_exponential": ("DPM++ 2M SDE Exponential", partial(dpmpp_2m.walk, sde=True, exponential=True)),
    "dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun", partial(dpmpp_2m.walk, sde=True, heun=True)),
    "dpmpp_2m_sde_heun_karras": ("DPM++ 2M SDE Heun Karras", partial(dpmpp_2m.walk, karras=True, sde=True, heun=True)),
    "dpmpp_2m_sde_heun_exponential": ("DPM++ 2M SDE Heun Exponential", partial(dpmpp_2m.walk, exponential=True,
                                                                               sde=True, heun=True)),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", partial(dpmpp_2m.walk, sde=True, order=3)),
    "dpmpp_3m_sde_karras": ("DPM++ 3M SDE Karras", partial(dpmpp_2m.walk, karras=True, sde=True, order=3)),
    "dpmpp_3m_sde_exponential": ("DPM++ 3M SDE Exponential", partial(dpmpp_2m.walk, sde=True, exponential=True,
                                                                     order=3)),
    "euler_exponential": ("Euler Exponential", partial(euler.walk, exponential=True)),
    "heun_exponential": ("Heun Exponential", partial(heun.walk, exponential=True)),
    "lcm": ("LCM", lcm.walk),
    "tcd": ("TCD", tcd.walk),
    "unipc": ("UniPC", unipc.walk),
    "unipc_karras": ("UniPC Karras", partial(unipc.walk, karras=True)),
    "unipc_exponential": ("UniPC Exponential", partial(unipc.walk, exponential=True)),
    "dpm2": ("DPM2", dpm2.walk),
    "dpm2_karras": ("DPM2 Karras", partial(dpm2.walk, karras=True)),
    "dpm2_exponential": ("DPM2 Exponential", partial(dpm2.walk, exponential=True)),
    "dpm2_a": ("DPM2 a", partial(dpm2.walk, ancestral=True)),
    "dpm2_a_karras": ("DPM2 a Karras", partial(dpm2.walk, karras=True, ancestral=True)),
    "dpm2_a_exponential": ("DPM2 a Exponential", partial(dpm2.walk, exponential=True, ancestral=True)),
    "dpmpp_sde": ("DPM++ SDE", dpmpp_sde.walk),
    "dpmpp_sde_karras": ("DPM++ SDE Karras", partial(dpmpp_sde.walk, karras=True)),
    "dpmpp_sde_exponential": ("DPM++ SDE Exponential", partial(dpmpp_sde.walk, exponential=True)),
    "dpmpp_2s_a": ("DPM++ 2S a", dpmpp_2s.walk),
    "dpmpp_2s_a_karras": ("DPM++ 2S a Karras", partial(dpmpp_2s.walk, karras=True)),
    "dpmpp_2s_a_exponential": ("DPM++ 2S a Exponential", partial(dpmpp_2s.walk, exponential=True)),
}


def trailing(walker):
    """`walker` on diffusers' "trailing" timestep spacing whatever the model's config says (the
    spacing SDXL-Lightning, Turbo and Hyper-SD are drawn with; AUTOMATIC1111's "SGM Uniform" is
    near it: it spaces the timesteps from 999 to 0 at fractions, trailing at whole ones)."""
    def walk(schedule, steps: int, start: int) -> Walk:
        return walker(replace(schedule, timestep_spacing="trailing"), steps, start)

    return walk


for _name in ("euler", "euler_a", "heun", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
              "dpmpp_3m_sde", "dpmpp_sde", "dpmpp_2s_a", "unipc"):
    _display, _walker = _REGISTRY[_name]
    _REGISTRY[f"{_name}_sgm_uniform"] = (f"{_display} SGM Uniform", trailing(_walker))
# Every sampler that takes Karras and Exponential sigmas takes Beta(0.6, 0.6)'s quantiles too.
for _name in ("euler", "heun", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
              "dpmpp_sde", "dpmpp_2s_a", "unipc"):
    _display, _walker = _REGISTRY[_name]
    _REGISTRY[f"{_name}_beta"] = (f"{_display} Beta", partial(_walker, beta=True))
# NVIDIA's Align Your Steps walks (ays.py) where diffusers' scheduler takes them (`timesteps=`), and on
# Euler's walk for DPM++ 2S a.
for _name in ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpmpp_2s_a"):
    _display, _walker = _REGISTRY[_name]
    _REGISTRY[f"{_name}_ays"] = (f"{_display} Align Your Steps", partial(_walker, ays=True))
del _name, _display, _walker
SAMPLERS = tuple(_REGISTRY)
# U-Net evaluations a step, where not one (Heun's, DPM2's, DPM++ SDE's and DPM++ 2S a's last step has one:
# 2n - 1 rows).
EVALUATIONS_PER_STEP = {name: 2 for name in SAMPLERS if name.startswith(("heun", "dpm2", "dpmpp_sde", "dpmpp_2s"))}
# Samplers no diffusers scheduler runs: k-diffusion's (AUTOMATIC1111's and ComfyUI's), held to it in the tests.
K_DIFFUSION_ONLY = tuple(name for name in SAMPLERS if name.startswith("dpmpp_2s"))
DISPLAY_NAMES = {name: display for name, (display, _) in _REGISTRY.items()}


@dataclass(frozen=True)
class NoiseSchedule:
    """The model's training noise schedule, as its diffusers scheduler config states it.

    `timestep_spacing` is None when the config does not set it: each sampler then uses the
    default of the diffusers scheduler of the same name, as `Scheduler.from_config` would.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "scaled_linear" | "linear"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    timestep_spacing: str | None = None  # "leading" | "linspace" | "trailing" | None
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    # Not the scheduler config's: the model family ("sd1" | "sd2" | "sdxl"), whose tuned walks the
    # Align Your Steps samplers take (ays.py); the manifest's model.family sets it.
    family: str = "sd1"

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """From a diffusers scheduler_config.json dict (unknown keys are ignored)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in fields})

    def to_dict(self) -> dict:
        """The scheduler config's fields (what the manifest's noise_schedule holds)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "family"}


@dataclass(frozen=True)
class SamplerPlan:
    """What the pipeline needs to run one generation.

    rows: (N, len(COLUMNS)) float32, one row per U-Net call, in the order they run.
    init_noise_scale: txt2img starts from x = init_noise_scale * noise.
    levels: (N, 2), each row's (image, noise) scales of the scheduler's add_noise (Walk.levels).
    draws: (N,) bool, the rows before which the pipeline draws a step noise from the generator
    (the others get zeros), so that the generator's stream runs as diffusers' does.
    brownian: Walk.brownian, for a sampler whose noise comes from a Brownian tree (`step_noise`).
    """

    rows: np.ndarray
    init_noise_scale: float
    levels: np.ndarray
    draws: np.ndarray
    brownian: tuple | None = None

    @property
    def steps(self) -> int:
        return len(self.rows)

    @property
    def image_scale(self) -> float:
        """img2img starts from x = image_scale * z_image + noise_scale * noise."""
        return float(self.levels[0, 0])

    @property
    def noise_scale(self) -> float:
        return float(self.levels[0, 1])

    def known_levels(self) -> np.ndarray:
        """(N, 2): after row i, where diffusers' inpainting with a text-to-image U-Net puts the
        image's known part back: row i + 1's level, and after the last row the image itself."""
        return np.concatenate([self.levels[1:], [[1.0, 0.0]]])

    @property
    def needs_noise(self) -> bool:
        """Whether any step adds fresh noise (drawn from the generator, or a Brownian tree's)."""
        return bool(np.any(self.draws)) or self.brownian is not None


def plan(
    sampler: str, schedule: NoiseSchedule, steps: int, guidance: float, strength: float = 1.0,
    denoising_start: float | None = None, denoising_end: float | None = None,
) -> SamplerPlan:
    """The coefficient table for one generation.

    steps: the U-Net calls of a full walk; img2img runs the last int(steps * strength) of them,
    as StableDiffusionImg2ImgPipeline does. guidance goes on every row (the graph computes
    u + g * (c - u)). The plan carries both starts: txt2img uses init_noise_scale, img2img
    image_scale / noise_scale, which keep a little of the image even at strength 1 (diffusers
    noises it to the first timestep, not to pure noise). Raises InvalidRequest for an unknown
    sampler or out-of-range numbers.

    denoising_start / denoising_end (fractions in (0, 1)): SDXL's "ensemble of expert denoisers",
    as diffusers' SDXL pipelines cut a walk: denoising_end runs only the steps whose timestep is
    at or above round(n_train * (1 - denoising_end)) (the base model's part; its latents are
    handed over as they are), denoising_start only those below it (the refiner's part, which
    starts from those latents, strength ignored). Each restarts a multistep sampler's history as
    diffusers' does (the refiner's first step is first order).
    """
    if sampler not in _REGISTRY:
        raise InvalidRequest(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    n_train = schedule.num_train_timesteps
    whole = isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)
    if not whole or not 1 <= steps <= n_train:
        raise InvalidRequest(f"steps must be a whole number from 1 to {n_train}, got {steps!r}")
    if not 0 < strength <= 1:
        raise InvalidRequest(
            f"strength must be in (0, 1], got {strength!r}: 1 repaints the image fully, "
            "small values keep it close to the input"
        )
    walker = _REGISTRY[sampler][1]
    if denoising_start is None:
        start = img2img_start(int(steps), strength)
    else:  # strength is ignored, as diffusers ignores it
        start = split_steps(sampler, walker(schedule, int(steps), 0).rows, denoising_start, schedule)
    walk = walker(schedule, int(steps), start)
    if not np.all(np.isfinite(walk.rows)):
        # Near num_train_timesteps steps, two steps can share a noise level (DPM-Solver divides
        # by their log-SNR gap).
        raise InvalidRequest(
            f"{steps} steps is more than sampler {sampler!r} can space over this model's "
            f"{n_train} training timesteps; use fewer steps"
        )
    rows, levels = walk.rows.copy(), walk.levels
    draws = walk.draws if walk.draws is not None else np.full(len(rows), bool(np.any(rows[:, C_N] != 0)))
    if denoising_end is not None:
        rows = rows[:split_steps(sampler, rows, denoising_end, schedule)]
    rows[:, GUIDANCE] = guidance
    return SamplerPlan(
        rows=rows.astype(np.float32),
        init_noise_scale=walk.init_noise_scale,
        levels=levels[:len(rows)],
        draws=draws[:len(rows)],
        brownian=walk.brownian,
    )


def split_steps(sampler: str, rows: np.ndarray, fraction: float, schedule: NoiseSchedule) -> int:
    """How many of a whole walk's rows (one per step) lie at or above the timestep cutoff
    round(n_train * (1 - fraction)), as diffusers' SDXL pipelines cut a walk for denoising_end
    and denoising_start; an InvalidRequest where that leaves either part empty."""
    if isinstance(fraction, bool) or not isinstance(fraction, (float, int, np.floating, np.integer)) \
            or not 0 < fraction < 1:
        raise InvalidRequest(f"denoising_start / denoising_end (the refiner switch) must lie in (0, 1), "
                             f"got {fraction!r}")
    if sampler in EVALUATIONS_PER_STEP:
        raise InvalidRequest(f"the {sampler} sampler takes two U-Net calls a step, which a switch between models "
                             "can split; choose another sampler for a refiner")
    above = rows_above(rows, cutoff(schedule, fraction))
    if not 0 < above < len(rows):
        raise InvalidRequest(f"a switch at {fraction} of {len(rows)} steps leaves "
                             f"{'the first model' if above == 0 else 'the second'} no step; "
                             "move it, or use more steps")
    return above


def cutoff(schedule: NoiseSchedule, fraction: float) -> int:
    """The timestep where a walk is cut at `fraction`, as diffusers' SDXL pipelines compute it."""
    n = schedule.num_train_timesteps
    return int(round(n - fraction * n))


def rows_above(rows: np.ndarray, timestep: int) -> int:
    """How many of the rows run at or above `timestep` (a walk's first ones: timesteps fall)."""
    return int(np.sum(rows[:, COLUMNS.index("timestep")] >= timestep))
