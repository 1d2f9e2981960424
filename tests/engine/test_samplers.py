"""Every sampler table against the diffusers scheduler of the same name, step by step.

diffusers runs its scheduler loop as StableDiffusionPipeline / StableDiffusionImg2ImgPipeline do,
on a stand-in model whose output depends on its input (0.5 * model_in + R_i, fixed random R_i);
our side runs the same stand-in through `update.py` in float32, as the exported graph does. At
every step the timestep, the model input and the latents must agree. Euler ancestral's fresh noise:
diffusers draws one randn per step from the generator passed to `step`; we draw from a second
generator seeded alike, so no diffusers code is patched.
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from conftest import diffusers_schedulers, k_diffusion_sampling, torchs_float32_rounding
from ldm_deploy.engine.samplers import (DISPLAY_NAMES, EVALUATIONS_PER_STEP, K_DIFFUSION_ONLY, NoiseSchedule, brownian,
                                        plan)
from ldm_deploy.engine.samplers import SAMPLERS as ALL_SAMPLERS
from ldm_deploy.engine.samplers.update import C_0, C_P, C_PP, C_X, GUIDANCE, T, guide, model_input, update
from ldm_deploy.errors import InvalidRequest

# diffusers 0.42's schedulers call np.array() on torch tensors, which torch 2.13 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json: no timestep_spacing key, so each
# scheduler class uses its own default spacing.
SD1 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1 (768, v-prediction): a DDIM config, also without timestep_spacing.
SD2 = {**SD1, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

DIFFUSERS = diffusers_schedulers()
# The samplers held to diffusers' schedulers; DPM++ 2S a is held to k-diffusion (below).
SAMPLERS = tuple(s for s in ALL_SAMPLERS if s not in K_DIFFUSION_ONLY)
SHAPE = (1, 4, 8, 8)  # one 64x64-pixel latent: enough values for max-abs errors to show
SEED = 1234
TOL = 1e-5  # max abs at values up to 15 (sigma_max 14.6), where a float32 ulp is ~1e-6


def inputs(steps):
    rng = np.random.default_rng(0)
    noise, image = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
    residuals = rng.standard_normal((2 * steps, *SHAPE), dtype=np.float32)  # Heun calls 2 * steps - 1 times
    return noise, image, residuals


def diffusers_trace(sampler, config, steps, strength, noise, image, residuals, generator=None):
    """[(timestep, model_in, latents after the step)] as the diffusers pipelines run it."""
    cls, extra = DIFFUSERS[sampler]
    if sampler.startswith("dpmpp_sde"):  # its Brownian tree's seed: ours is the image's
        extra = {**extra, "noise_sampler_seed": SEED}
    scheduler = cls.from_config(config, **extra)
    if sampler.endswith("_ays"):  # Align Your Steps: given timesteps, as pipe(..., timesteps=...) sets them
        scheduler.set_timesteps(timesteps=ays_oracle(config, steps))
    else:
        scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):  # (as SDXL's pipelines do; where two timesteps are equal, its
        scheduler.set_begin_index(0)  # lookup of the first picks the second: test_beta_at_equal_timesteps)
    timesteps = scheduler.timesteps
    if strength is None:  # StableDiffusionPipeline.prepare_latents
        x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):  # DDIM has none: it looks timesteps up by value
            scheduler.set_begin_index(t_start * scheduler.order)
        x = scheduler.add_noise(torch.from_numpy(image), torch.from_numpy(noise), timesteps[:1])
    generator = generator or torch.Generator().manual_seed(SEED)
    # Deterministic schedulers' step() has no generator argument (Heun's).
    noisy = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    trace = []
    for i, t in enumerate(timesteps):
        model_in = scheduler.scale_model_input(x, t)
        out = 0.5 * model_in + torch.from_numpy(residuals[i])
        x = scheduler.step(out, t, x, **noisy).prev_sample
        trace.append((float(t), model_in.numpy(), x.numpy()))
    return trace


def ays_oracle(config, steps) -> list[int]:
    """The Align Your Steps timesteps diffusers is given: at 10 steps its own AysSchedules (SD 1.5's,
    which SD 2.x takes too, or SDXL's where the config says "family": "sdxl"); at other step counts
    ours, whose interpolation test_ays_timesteps checks."""
    from diffusers.schedulers import AysSchedules

    from ldm_deploy.engine.samplers.ays import ays_timesteps

    if steps == 10:
        return AysSchedules["StableDiffusionXLTimesteps" if config.get("family") == "sdxl" else "StableDiffusionTimesteps"]
    return [int(t) for t in ays_timesteps(NoiseSchedule.from_config(config), steps)]


def our_trace(sampler, config, steps, strength, noise, image, residuals, generator=None):
    """[(timestep, model_in, latents after the step, x0)] from the plan, in float32 like the graph."""
    p = plan(sampler, NoiseSchedule.from_config(config), steps, guidance=7.5, strength=strength or 1.0)
    if strength is None:
        x = np.float32(p.init_noise_scale) * noise
    else:
        x = np.float32(p.image_scale) * image + np.float32(p.noise_scale) * noise
    x0 = x0_before = np.zeros(SHAPE, np.float32)
    generator = generator or torch.Generator().manual_seed(SEED)
    brownian_noise = brownian.row_noise(p.brownian, [SEED], SHAPE) if p.brownian else None
    trace = []
    for i, row in enumerate(p.rows):
        # diffusers' DPM2 a draws at its second call of a step only
        step_noise = torch.randn(SHAPE, generator=generator, dtype=torch.float32).numpy() if p.draws[i] else 0 * x
        if brownian_noise is not None:  # DPM++ SDE: not the generator's
            step_noise = 0 * x if brownian_noise[i] is None else brownian_noise[i]
        model_in = model_input(row, x)
        out = 0.5 * model_in + residuals[i]
        out = guide(out, out, row)  # no unconditional half: guidance must leave `cond` unchanged
        x0_now = x0
        x, x0 = update(row, x, x0, step_noise, out, x0_before)  # x0 of two steps back: UniPC's
        x0_before = x0_now
        assert x.dtype == np.float32
        trace.append((float(row[T]), model_in, x, x0))
    return trace


def precision_gain(sampler, rows) -> float:
    """How much more than TOL a sampler's latents may differ from diffusers' at these rows.

    An update that multiplies x0 (or x0_prev) by more than 1 multiplies their rounding too: Heun's
    correction, (s - s') / (2 s') (x0' - x0), reaches 7x at 3 steps. Multistep samplers difference
    x0s over float32 log-SNR gaps: diffusers' third order (3M) is up to ~2e-5 off a float64 run of
    itself at 30 steps, ours ~2e-6; on Beta's sigmas, which crowd both ends of the walk (timesteps
    998, 997, 995, 991 at 30 steps), its UniPC is 1.2e-4 off, ours 5e-6, and its 3M SDE 9.6e-4 off,
    ours 1.1e-4, and its DPM++ 2M at 12 steps 2.1e-5 off, ours 4e-6 (measured, SD1 config).
    """
    gain = max(1.0, float(np.abs(rows[:, [C_0, C_P, C_PP]]).max()))
    if "3m" in sampler:
        gain *= 2
    if sampler.endswith("_beta") and sampler.startswith(("dpmpp_2m", "dpmpp_3m", "unipc")):
        gain *= 4
    return gain


def check_against_diffusers(sampler, config, steps, strength):
    check_trace(diffusers_trace, sampler, config, steps, strength)


def check_trace(reference, sampler, config, steps, strength):
    """Our trace against `reference`'s (diffusers_trace, k_diffusion_trace), call by call."""
    args = (sampler, config, steps, strength, *inputs(steps))
    with torchs_float32_rounding():
        expected, got = reference(*args), our_trace(*args)
    assert len(got) == len(expected)
    # Both sides round to float32, diffusers with its own formulas (e.g. DPM-Solver's h as a
    # difference of float32 logs): the gap grows with the largest term of an update. Latents and,
    # with this stand-in model, x0 reach ~45 (sigma_max times a 3-sigma noise value), where
    # diffusers itself is ~1e-5 off a float64 evaluation; so the tolerance is TOL per 15 units of
    # the run's largest |model input|, |latent| or |x0|, times precision_gain.
    scale = max(np.abs(a).max() for step in got for a in step[1:])
    rows = plan(sampler, NoiseSchedule.from_config(config), steps, 7.5, strength or 1.0).rows
    atol = TOL * max(1.0, scale / 15) * precision_gain(sampler, rows)
    for i, ((t, model_in, x, _), (t_ref, model_in_ref, x_ref)) in enumerate(zip(got, expected)):
        where = f"{sampler} steps={steps} strength={strength} step {i}"
        # Karras, Exponential and Beta timesteps come from sigmas, which diffusers holds in float32: an
        # ulp apart; so do DPM2's and DPM++ 2S a's midpoint timesteps
        from_sigmas = any(k in sampler for k in ("karras", "exponential", "beta")) \
            or sampler.startswith(("dpm2", "dpmpp_sde", "dpmpp_2s"))
        assert t == pytest.approx(t_ref, rel=1e-6, abs=1e-4) if from_sigmas else t == t_ref, where
        np.testing.assert_allclose(model_in, model_in_ref, rtol=0, atol=atol, err_msg=where)
        np.testing.assert_allclose(x, x_ref, rtol=0, atol=atol, err_msg=where)


@pytest.mark.parametrize("strength", [None, 0.3, 0.6, 1.0], ids=lambda s: f"img2img{s}" if s else "txt2img")
@pytest.mark.parametrize("steps", [1, 2, 5, 30])  # (20 steps: the ensemble test's 12 and the spacings' 25 below)
@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1-epsilon", "sd2-v"])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if not s.endswith(("_sgm_uniform", "_beta", "_ays"))])
def test_matches_diffusers(sampler, config, steps, strength):
    if strength is not None and int(steps * strength) < 1:
        pytest.skip("no denoising step; the error is tested below")
    check_against_diffusers(sampler, config, steps, strength)


# Each _sgm_uniform sampler is its sampler's walk on trailing spacing (checked above for every
# sampler through the config): each on its own at fewer settings.
@pytest.mark.parametrize("strength", [None, 0.6], ids=lambda s: f"img2img{s}" if s else "txt2img")
@pytest.mark.parametrize("steps", [4, 25])
@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1-epsilon", "sd2-v"])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s.endswith("_sgm_uniform")])
def test_sgm_uniform_matches_diffusers(sampler, config, steps, strength):
    check_against_diffusers(sampler, config, steps, strength)


@pytest.mark.parametrize("strength", [None, 0.6], ids=lambda s: f"img2img{s}" if s else "txt2img")
@pytest.mark.parametrize("steps", [3, 25])
@pytest.mark.parametrize(
    "overrides",
    [
        {"timestep_spacing": "leading"},
        {"timestep_spacing": "linspace"},
        {"timestep_spacing": "trailing"},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0},
        {"set_alpha_to_one": True},
    ],
    ids=["leading", "linspace", "trailing", "linear-betas", "alpha-to-one"],
)
# (the _sgm_uniform ones are their samplers on trailing spacing whatever the config says: above;
# the _beta and _ays ones below)
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if not s.endswith(("_sgm_uniform", "_beta", "_ays"))])
def test_matches_diffusers_other_schedules(sampler, overrides, steps, strength):
    check_against_diffusers(sampler, {**SD1, **overrides}, steps, strength)


# Each _beta sampler is its sampler's walk (checked above) at other sigmas, which euler.sigma_schedule
# (Euler, Heun, the DPM2s, DPM++ SDE) or dpmpp_2m.timesteps_and_sigmas (the multistep ones) spread:
# each on its own at fewer settings. 3 steps puts one at Beta's median.
@pytest.mark.parametrize("config, steps, strength", [
    (SD1, 3, None), (SD1, 25, None), (SD1, 3, 0.6), (SD1, 25, 0.6), (SD2, 25, None),
    ({**SD1, "timestep_spacing": "leading"}, 25, None),
    ({**SD1, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}, 3, None),
], ids=["sd1-3", "sd1-25", "sd1-3-img2img0.6", "sd1-25-img2img0.6", "sd2-v-25", "leading-25", "linear-betas-3"])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s.endswith("_beta")])
def test_beta_matches_diffusers(sampler, config, steps, strength):
    if sampler.startswith("dpm2_a") and config.get("beta_schedule") == "linear" and steps == 3:
        # s' / s ~ 1e-4 at the second step: diffusers' float32 s_down^2 = s'^2 - s_up^2 cancels to
        # below 0 (NaN); ours takes its exact value there (dpm2.py)
        from ldm_deploy.engine.samplers.euler import sigma_schedule

        rows = plan(sampler, NoiseSchedule.from_config(config), steps, 7.5).rows
        assert np.all(np.isfinite(rows))
        # step 1 (rows 2 and 3) aims at s_down = s'^2 / s exactly: row 3's c_x is s_down / s_mid,
        # s_mid = sqrt(s s_down) (in float32)
        s, s_next = sigma_schedule(NoiseSchedule.from_config(config), steps, beta=True)[1].astype(np.float32)[1:3]
        down = np.float64(s_next) ** 2 / np.float64(s)
        assert rows[3, C_X] == pytest.approx(down / np.sqrt(s * down), rel=1e-5)
        expected = diffusers_trace(sampler, config, steps, strength, *inputs(steps))
        got = our_trace(sampler, config, steps, strength, *inputs(steps))
        assert not np.all(np.isfinite(expected[-1][2]))  # (a diffusers that computes it otherwise: compare all)
        for (_, _, x, _), (_, _, x_ref) in zip(got[:2], expected[:2]):  # step 0, before its NaN
            np.testing.assert_allclose(x, x_ref, rtol=0, atol=TOL * 10)
        return
    check_against_diffusers(sampler, config, steps, strength)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_beta", "dpmpp_2m_sde_beta"])
def test_beta_at_equal_timesteps(sampler):
    """From 32 steps on, Beta's first two timesteps on the multistep samplers floor to the same one
    (998, 998), as diffusers' do; each step keeps its own sigma. (diffusers' SD pipelines, which set
    no begin index, then look the first step up at the second and fail at the end: peers.py begins
    them at index 0.)"""
    from benchmarks.peers import from_index_zero

    rows = plan(sampler, NoiseSchedule.from_config(SD1), 40, 7.5).rows
    assert rows[0, T] == rows[1, T] == 998
    check_against_diffusers(sampler, SD1, 40, None)
    cls, extra = DIFFUSERS[sampler]  # the peers' scheduler walks all 40 steps as a pipeline calls it
    scheduler = from_index_zero(cls).from_config(SD1, **extra)
    scheduler.set_timesteps(40)
    x = torch.ones(SHAPE)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros(SHAPE), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert scheduler.step_index == 40 and torch.isfinite(x).all()


def test_beta_quantiles_match_scipy():
    """Beta's sigmas come from Beta(0.6, 0.6)'s quantiles, which diffusers and AUTOMATIC1111 take from
    scipy; the runtime inverts the incomplete beta function itself (beta_dist.py)."""
    from scipy import stats

    from ldm_deploy.engine.samplers.beta_dist import beta_ppf, incomplete_beta

    x = np.linspace(0, 1, 201)
    for a, b in ((0.6, 0.6), (2.0, 5.0), (0.5, 3.0)):
        np.testing.assert_allclose(incomplete_beta(x, a, b), stats.beta.cdf(x, a, b), rtol=0, atol=1e-14)
        np.testing.assert_allclose(beta_ppf(x, a, b), stats.beta.ppf(x, a, b), rtol=0, atol=1e-14)
    assert beta_ppf(np.array([0.0, 1.0]), 0.6, 0.6).tolist() == [0.0, 1.0]
    for a, b in ((0.6, 5.5), (0, 1), (float("nan"), 1)):  # where its series cancels, or no distribution
        with pytest.raises(ValueError, match="exact for 0 < a, b <= 5 only"):
            beta_ppf(np.array([0.5]), a, b)


def test_plan_table():
    schedule = NoiseSchedule.from_config(SD1)
    for sampler in ALL_SAMPLERS:
        p = plan(sampler, schedule, 20, guidance=6.0, strength=0.5)
        assert p.rows.dtype == np.float32
        assert np.all(p.rows[:, GUIDANCE] == 6.0)
        base = sampler.removesuffix("_sgm_uniform").removesuffix("_beta").removesuffix("_ays")  # (at other sigmas)
        assert p.needs_noise == (base in ("euler_a", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential",
                                          "lcm", "tcd", "ddpm", "dpm2_a", "dpm2_a_karras", "dpm2_a_exponential")
                                 or base.startswith(("dpmpp_sde", "dpmpp_3m_sde", "dpmpp_2m_sde_heun", "dpmpp_2s_a")))
        if sampler in ("lcm", "tcd"):  # diffusers draws no noise at LCM's (TCD's) last step
            assert p.draws.tolist() == [True] * 9 + [False]
        if sampler.startswith(("dpm2_a", "dpmpp_2s_a")):  # one draw a step, at its second call
            np.testing.assert_array_equal(p.draws, np.arange(19) % 2 == 1)
        # DPM++ SDE's noise is its Brownian tree's: a term or two on each row but the last
        assert (p.brownian is not None) == sampler.startswith("dpmpp_sde")
        if p.brownian is not None:
            assert [len(t) for t in p.brownian[1]] == [1, 2] * 9 + [0]
        assert p.steps == (19 if sampler in EVALUATIONS_PER_STEP else 10)  # Heun: two calls a step, one for the last
    assert set(DISPLAY_NAMES) == set(ALL_SAMPLERS) and set(DIFFUSERS) == set(SAMPLERS)
    assert DISPLAY_NAMES["dpmpp_2m_karras"] == "DPM++ 2M Karras"
    assert DISPLAY_NAMES["dpmpp_2m_sde_karras"] == "DPM++ 2M SDE Karras"  # AUTOMATIC1111's names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "k_lms"}, "unknown sampler 'k_lms'; choose one of ddim, ddpm, euler, euler_karras, euler_a, heun"),
        ({"steps": 0}, "steps must be a whole number from 1 to 1000, got 0"),
        ({"steps": 1001}, "from 1 to 1000"),
        ({"steps": 2.5}, "whole number"),
        ({"strength": 0.0}, "strength must be in (0, 1], got 0.0"),
        ({"strength": 1.5}, "strength must be in (0, 1]"),
        ({"steps": 4, "strength": 0.2}, "raise strength to at least 0.25 or use more steps"),
        ({"sampler": "ddim", "steps": 1000}, "steps_offset 1 runs past the model's last timestep 999"),
        ({"sampler": "dpmpp_2m", "steps": 1000}, "1000 steps is more than sampler 'dpmpp_2m' can space"),
        ({"sampler": "lcm", "steps": 51}, "the lcm sampler takes at most 50 steps"),
        ({"sampler": "tcd", "steps": 51}, "the tcd sampler takes at most 50 steps (its distillation schedule), got 51; TCD-LoRA"),
    ],
)
def test_invalid_requests(kwargs, message):
    request = {"sampler": "euler", "schedule": NoiseSchedule.from_config(SD1), "steps": 20, "guidance": 7.5}
    with pytest.raises(InvalidRequest) as error:
        plan(**{**request, **kwargs})
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2' is not supported"),
        ({"timestep_spacing": "karras"}, "timestep_spacing 'karras' is not supported"),
    ],
)
def test_unsupported_schedules(overrides, message):
    with pytest.raises(InvalidRequest) as error:
        plan("ddim", NoiseSchedule.from_config({**SD1, **overrides}), 20, 7.5)
    assert message in str(error.value)


def test_trailing_drops_diffusers_bogus_step():
    # diffusers' trailing spacing is np.arange(1000, 0, -1000 / steps); at 61 steps float
    # rounding leaves a 62nd point, run as an extra step at t = -1. We run the 61 real ones.
    scheduler = DDIMScheduler.from_config({**SD1, "timestep_spacing": "trailing"})
    scheduler.set_timesteps(61)
    assert len(scheduler.timesteps) == 62 and scheduler.timesteps[-1] == -1
    p = plan("ddim", NoiseSchedule.from_config({**SD1, "timestep_spacing": "trailing"}), 61, 7.5)
    np.testing.assert_array_equal(p.rows[:, T], scheduler.timesteps[:61].numpy())


@pytest.mark.parametrize("sampler", ["euler_karras", "heun_karras"])
def test_karras_sigmas_with_trailing_spacing_at_a_step_count_of_diffusers_extra_point(sampler):
    """At 61 steps diffusers' trailing spacing makes one point more (t = -1, spaced_timesteps); the
    plain samplers drop it with the bogus step it makes, but with Karras sigmas it is the low end of
    diffusers' schedule (its sigma clamps to t = 0's), so ours takes that end too."""
    check_against_diffusers(sampler, {**SD1, "timestep_spacing": "trailing"}, 61, None)


def ensemble_diffusers(sampler, config, steps, switch, noise, residuals):
    """The latents after each step of diffusers' SDXL "ensemble of expert denoisers": the base
    pipeline's loop cut at denoising_end (StableDiffusionXLPipeline), then a fresh scheduler
    from denoising_start on those latents (StableDiffusionXLImg2ImgPipeline.get_timesteps)."""
    cls, extra = DIFFUSERS[sampler]
    if sampler.endswith("_ays"):  # Align Your Steps' timesteps (at 12 steps: ours, as ldm-bench gives them)
        from benchmarks.peers import aligned

        cls = aligned(cls, "sd1")
    cutoff = int(round(1000 - switch * 1000))
    first = cls.from_config(config, **extra)
    first.set_timesteps(steps)
    x = torch.from_numpy(noise) * first.init_noise_sigma
    generator = torch.Generator().manual_seed(SEED)
    noisy = {"generator": generator} if "generator" in inspect.signature(first.step).parameters else {}
    trace, i = [], 0
    for t in [t for t in first.timesteps if t >= cutoff]:
        x = first.step(0.5 * first.scale_model_input(x, t) + torch.from_numpy(residuals[i]), t, x, **noisy).prev_sample
        trace.append(x.numpy())
        i += 1
    second = cls.from_config(config, **extra)
    second.set_timesteps(steps)
    t_start = len(second.timesteps) - int((second.timesteps < cutoff).sum())
    if hasattr(second, "set_begin_index"):
        second.set_begin_index(t_start)
    for t in second.timesteps[t_start:]:
        x = second.step(0.5 * second.scale_model_input(x, t) + torch.from_numpy(residuals[i]), t, x, **noisy).prev_sample
        trace.append(x.numpy())
        i += 1
    return trace


@pytest.mark.parametrize("switch", [0.8, 0.5, 0.25])
@pytest.mark.parametrize("config", [SD1, {**SD1, "timestep_spacing": "leading"}], ids=["sd1", "sdxl-leading"])
# (of the _beta and _ays samplers, the cut's own, two each: a sigma one and a multistep one)
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s not in EVALUATIONS_PER_STEP
                                     and (not s.endswith("_beta") or s in ("euler_beta", "dpmpp_2m_sde_beta"))
                                     and (not s.endswith("_ays") or s in ("euler_ays", "dpmpp_2m_sde_ays"))])
def test_denoising_end_and_start_match_diffusers_ensemble(sampler, config, switch):
    steps = 12
    noise, _, residuals = inputs(steps)
    expected = ensemble_diffusers(sampler, config, steps, switch, noise, residuals)
    schedule = NoiseSchedule.from_config(config)
    with torchs_float32_rounding():  # diffusers' sigma table: torch's sqrt
        first = plan(sampler, schedule, steps, 7.5, denoising_end=switch)
        second = plan(sampler, schedule, steps, 7.5, denoising_start=switch, strength=0.3)  # strength ignored
    assert first.steps + second.steps == len(expected) == steps
    x = np.float32(first.init_noise_scale) * noise
    generator = torch.Generator().manual_seed(SEED)
    got, i = [], 0
    for p in (first, second):  # the second starts afresh: no x0 history carried over
        x0 = x0_before = np.zeros(SHAPE, np.float32)
        for row in p.rows:
            step_noise = torch.randn(SHAPE, generator=generator, dtype=torch.float32).numpy()
            out = 0.5 * model_input(row, x) + residuals[i]
            x0_now = x0
            x, x0 = update(row, x, x0, step_noise, guide(out, out, row), x0_before)
            x0_before = x0_now
            got.append(x)
            i += 1
    scale = max(np.abs(a).max() for a in got)
    # (Beta's crowded steps make large coefficients: precision_gain's)
    gain = max(precision_gain(sampler, p.rows) for p in (first, second)) if sampler.endswith("_beta") else 1.0
    if sampler.startswith(("dpmpp_2m", "dpmpp_3m", "unipc")):
        # Multistep updates difference float32 x0s over float32 log-SNR gaps. Here diffusers' float32
        # runs are up to 7.6e-6 off the same runs with float64 sigmas and latents, ours up to 6.5e-6
        # (DPM++ 2M, its Karras and Exponential, UniPC and its Karras and Exponential, measured on an
        # AMD EPYC whose torch exp and log round otherwise than other CPUs'): two float32 runs may
        # be their sum apart.
        gain *= 1.5
    atol = TOL * max(1.0, scale / 15) * gain
    for k, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=f"{sampler} step {k}")


@pytest.mark.parametrize("kwargs, message", [
    ({"denoising_end": 1.0}, "must lie in (0, 1), got 1.0"),
    ({"denoising_start": 0}, "must lie in (0, 1), got 0"),
    ({"denoising_start": True}, "must lie in (0, 1), got True"),
    ({"denoising_end": 0.0001}, "leaves the first model no step"),
    ({"denoising_start": 0.9999}, "leaves the second no step"),
    ({"denoising_end": 0.5, "sampler": "heun"}, "two U-Net calls a step"),
])
def test_denoising_fraction_errors(kwargs, message):
    sampler = kwargs.pop("sampler", "euler")
    with pytest.raises(InvalidRequest) as e:
        plan(sampler, NoiseSchedule.from_config(SD1), 10, 7.5, **kwargs)
    assert message in str(e.value)


# Each _ays sampler is its sampler's walk at given timesteps: at 10 steps diffusers' AysSchedules.
@pytest.mark.parametrize("config, steps, strength", [
    (SD1, 10, None), (SD1, 10, 0.6), (SD2, 10, None), (SD1, 4, None), (SD1, 25, 0.6),
    ({**SD1, "timestep_spacing": "leading", "family": "sdxl"}, 10, None),  # (SDXL's config, and its walk)
    ({**SD1, "timestep_spacing": "trailing"}, 10, 0.6),
    ({**SD1, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}, 10, None),
], ids=["sd1-10", "sd1-10-img2img0.6", "sd2-v-10", "sd1-4", "sd1-25-img2img0.6", "sdxl-10", "trailing-10-img2img0.6",
        "linear-betas-10"])
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s.endswith("_ays")])
def test_ays_matches_diffusers(sampler, config, steps, strength):
    check_against_diffusers(sampler, config, steps, strength)


@pytest.mark.parametrize("family, key", [("sd1", "StableDiffusion"), ("sd2", "StableDiffusion"),
                                         ("sdxl", "StableDiffusionXL")])
def test_ays_timesteps(family, key):
    """NVIDIA's ten steps as diffusers ships them (the timesteps, and the noise levels they are); other
    step counts log-linear between those levels, as NVIDIA's how-to and ComfyUI interpolate them."""
    from diffusers.schedulers import AysSchedules

    from ldm_deploy.engine.samplers.ays import ays_timesteps
    from ldm_deploy.engine.samplers.schedule import alphas_cumprod, sigma_at, train_sigmas

    schedule = NoiseSchedule.from_config({**SD1, "family": family})
    assert ays_timesteps(schedule, 10).tolist() == AysSchedules[f"{key}Timesteps"]
    train = train_sigmas(alphas_cumprod(schedule))
    # the levels of those timesteps are diffusers' sigmas (NVIDIA's to three decimals; SDXL's last,
    # 0.113, lies at t = 13.4, which the timesteps round to 13: 0.111)
    np.testing.assert_allclose(sigma_at(ays_timesteps(schedule, 10), train), AysSchedules[f"{key}Sigmas"][:-1],
                               rtol=1.5e-2)
    levels = train[AysSchedules[f"{key}Timesteps"] + [0]]  # NVIDIA's eleven: the last at t = 0, sigma_min
    for steps in (1, 4, 15, 30):
        want = np.exp(np.interp(np.linspace(0, 1, steps + 1)[::-1], np.linspace(0, 1, 11), np.log(levels[::-1])))
        t = ays_timesteps(schedule, steps).astype(int)
        # each the noise level of the whole timestep nearest the level wanted: within half the log
        # gap to a neighbour
        gaps = np.diff(np.log(train))
        half = np.maximum(gaps[np.clip(t - 1, 0, None)], gaps[np.clip(t, None, len(gaps) - 1)]) / 2
        assert np.all(np.abs(np.log(train[t]) - np.log(want[:-1])) <= half + 1e-9), steps
    # ldm-bench's diffusers contender walks them at any step count (benchmarks/peers.py)
    from diffusers import DPMSolverMultistepScheduler

    from benchmarks.peers import aligned

    contender = aligned(DPMSolverMultistepScheduler, family).from_config(SD1)
    contender.set_timesteps(10)
    assert contender.timesteps.tolist() == AysSchedules[f"{key}Timesteps"]
    contender.set_timesteps(7)
    assert contender.timesteps.tolist() == ays_timesteps(schedule, 7).tolist()
    # past the step count where interpolated levels near t = 0 round to the same timestep: refused
    most = {"sdxl": 59}.get(family, 73)
    assert len(set(ays_timesteps(schedule, most).tolist())) == most
    with pytest.raises(InvalidRequest, match=f"use at most {most} steps with it"):
        plan("dpmpp_2m_ays", schedule, most + 1, 7.5)
    with pytest.raises(InvalidRequest, match="tuned for models trained over 1000 timesteps"):
        plan("euler_ays", NoiseSchedule.from_config({**SD1, "num_train_timesteps": 500}), 10, 7.5)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", [("scaled_linear", 0.00085, 0.012),
                                                               ("linear", 0.0001, 0.02)])
def test_exponential_timesteps_at_every_step_count(beta_schedule, beta_start, beta_end):
    """diffusers truncates these timesteps: a last bit of its float32 table moves one by 1, so the
    table is torch's linspace bit for bit, and every step count to 1000 gives diffusers' timesteps."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from ldm_deploy.engine.samplers.dpmpp_2m import exponential_timesteps_and_sigmas
    from ldm_deploy.engine.samplers.schedule import alphas_cumprod, torch_linspace

    schedule = NoiseSchedule(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end)
    np.testing.assert_array_equal(torch_linspace(beta_start, beta_end, 1000),
                                  torch.linspace(beta_start, beta_end, 1000, dtype=torch.float32).numpy())
    ref = DPMSolverMultistepScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                                      use_exponential_sigmas=True)
    np.testing.assert_array_equal(alphas_cumprod(schedule), ref.alphas_cumprod.numpy())
    for steps in range(1, 1001):
        ref.set_timesteps(steps)
        with torchs_float32_rounding():  # the table's sqrt as torch's: floors move at a last bit
            t, _ = exponential_timesteps_and_sigmas(schedule, steps)
        np.testing.assert_array_equal(t, ref.timesteps.numpy(), err_msg=f"{steps} steps")


def test_dpmpp_sde_with_our_rounding():
    """The runtime rounds DPM++ SDE's float32 exp and log correctly, where torch is an ulp off now
    and then; where that moves a noise query time (rounded to 1e-6; trailing spacing at 25 steps
    does) it moves that step's noise by ~1e-3 of its std. The latents stay within 1e-3 of the
    run's scale of diffusers'."""
    moved = []
    for config, steps in [({**SD1, "timestep_spacing": "trailing"}, 25), (SD1, 20), (SD2, 30)]:
        args = ("dpmpp_sde", config, steps, None, *inputs(steps))
        expected, got = diffusers_trace(*args), our_trace(*args)
        scale = max(np.abs(a).max() for step in got for a in step[1:])
        worst = max(np.abs(ours[2] - theirs[2]).max() for ours, theirs in zip(got, expected))
        assert worst < 1e-3 * scale, (steps, worst, scale)
        moved.append(worst > TOL * scale / 15)
    assert moved[0]  # a query did move there: the bound is tested


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if not s.startswith("dpmpp_sde")])
def test_the_generator_draws_as_often_as_diffusers(sampler):
    """A step draws from the generator only where diffusers' scheduler does (DPM2 a: at its second
    call; LCM: not at its last step; DDPM: not at t = 0), so that what draws next from the same
    generator (a batch's next chunk, the hires pass) gets what it gets in diffusers."""
    for config in (SD1, {**SD1, "steps_offset": 0}):  # (the second: DDPM's last timestep is 0)
        theirs, ours = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
        diffusers_trace(sampler, config, 4, None, *inputs(4), generator=theirs)
        our_trace(sampler, config, 4, None, *inputs(4), generator=ours)
        assert torch.equal(theirs.get_state(), ours.get_state()), (sampler, config)


# DPM++ 2S a, which no diffusers scheduler runs: k-diffusion's sample_dpmpp_2s_ancestral (what
# AUTOMATIC1111 and ComfyUI run) on the walk of diffusers' EulerDiscreteScheduler with the same options.
EULER_OPTIONS = {"": {}, "_karras": {"use_karras_sigmas": True}, "_exponential": {"use_exponential_sigmas": True},
                 "_beta": {"use_beta_sigmas": True}, "_sgm_uniform": {"timestep_spacing": "trailing"}}


def k_diffusion_trace(sampler, config, steps, strength, noise, image, residuals, generator=None):
    """[(timestep, model_in, latents after the call)] of k-diffusion's sampler on diffusers' Euler walk:
    its sigmas, timesteps, start (init_noise_sigma, or add_noise for img2img) and model input; the
    midpoints' timesteps from diffusers' _sigma_to_t. The stand-in's x0 is what diffusers' Euler
    step takes as pred_original_sample."""
    from diffusers import EulerDiscreteScheduler

    sampling = k_diffusion_sampling()
    variant = sampler.removeprefix("dpmpp_2s_a")
    scheduler = EulerDiscreteScheduler.from_config(config, **EULER_OPTIONS.get(variant, {}))
    if variant == "_ays":  # Align Your Steps: given timesteps, as pipe(..., timesteps=...) sets them
        scheduler.set_timesteps(timesteps=ays_oracle(config, steps))
    else:
        scheduler.set_timesteps(steps)
    first = 0 if strength is None else max(steps - min(int(steps * strength), steps), 0)
    scheduler.set_begin_index(first)
    sigmas, timesteps = scheduler.sigmas[first:], scheduler.timesteps[first:]
    if strength is None:
        x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(torch.from_numpy(image), torch.from_numpy(noise), timesteps[:1])
    log_sigmas = np.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).numpy() ** 0.5)
    v = config.get("prediction_type") == "v_prediction"
    trace, calls = [], []

    def model(x, sigma):
        s = float(sigma[0])
        step_start = len(calls) % 2 == 0  # a step's first call, then its midpoint's (the last step has one)
        t = float(timesteps[len(calls) // 2]) if step_start else float(scheduler._sigma_to_t(np.array(s), log_sigmas))
        model_in = x / (s**2 + 1) ** 0.5
        out = 0.5 * model_in + torch.from_numpy(residuals[len(calls)])
        if trace:
            trace[-1] = (*trace[-1][:2], x.numpy())  # the latents the previous call's row made
        calls.append(s)
        trace.append((t, model_in.numpy(), None))
        return out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1) if v else x - s * out

    generator = generator or torch.Generator().manual_seed(SEED)
    x = sampling.sample_dpmpp_2s_ancestral(
        model, x, sigmas, disable=True,
        noise_sampler=lambda sigma, sigma_next: torch.randn(SHAPE, generator=generator, dtype=torch.float32))
    trace[-1] = (*trace[-1][:2], x.numpy())
    return trace


def check_against_k_diffusion(sampler, config, steps, strength):
    check_trace(k_diffusion_trace, sampler, config, steps, strength)


@pytest.mark.parametrize("strength", [None, 0.3, 0.6, 1.0], ids=lambda s: f"img2img{s}" if s else "txt2img")
@pytest.mark.parametrize("steps", [1, 2, 5, 30])
@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1-epsilon", "sd2-v"])
@pytest.mark.parametrize("sampler", ["dpmpp_2s_a", "dpmpp_2s_a_karras"])
def test_dpmpp_2s_a_matches_k_diffusion(sampler, config, steps, strength):
    if strength is not None and int(steps * strength) < 1:
        pytest.skip("no denoising step; the error is tested above")
    check_against_k_diffusion(sampler, config, steps, strength)


# Its other sigmas (Exponential, Beta, SGM Uniform, Align Your Steps) and other schedules, at fewer settings.
@pytest.mark.parametrize("config, steps, strength", [
    (SD1, 3, None), (SD1, 10, None), (SD1, 25, None), (SD1, 25, 0.6), (SD2, 25, None),
    ({**SD1, "timestep_spacing": "leading"}, 25, None), ({**SD1, "timestep_spacing": "linspace"}, 3, 0.6),
    ({**SD1, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}, 3, None),
], ids=["sd1-3", "sd1-10", "sd1-25", "sd1-25-img2img0.6", "sd2-v-25", "leading-25", "linspace-3-img2img0.6", "linear-betas-3"])
@pytest.mark.parametrize("sampler", K_DIFFUSION_ONLY)
def test_dpmpp_2s_a_schedules_match_k_diffusion(sampler, config, steps, strength):
    if sampler == "dpmpp_2s_a_beta" and config.get("beta_schedule") == "linear":
        # s' / s ~ 1e-4 at the second step: k-diffusion's float32 s_down^2 = s'^2 - s_up^2 cancels to
        # 0 there, and it takes its last step's Euler branch (one call) mid-walk; ours aims at the
        # exact s_down (dpmpp_2s.py)
        rows = plan(sampler, NoiseSchedule.from_config(config), steps, 7.5).rows
        assert len(rows) == 5 and np.all(np.isfinite(rows))
        expected = k_diffusion_trace(sampler, config, steps, strength, *inputs(steps))
        got = our_trace(sampler, config, steps, strength, *inputs(steps))
        assert len(expected) == 4  # (a k-diffusion that computes it otherwise: compare all)
        for (_, _, x, _), (_, _, x_ref) in zip(got[:2], expected[:2]):  # step 0
            np.testing.assert_allclose(x, x_ref, rtol=0, atol=TOL * 10)
        return
    check_against_k_diffusion(sampler, config, steps, strength)


def test_dpmpp_2s_a_draws_as_often_as_k_diffusion():
    """One draw a step, after its second call, none at the last step: what draws next from the same
    generator gets what it gets in AUTOMATIC1111's loop."""
    theirs, ours = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
    k_diffusion_trace("dpmpp_2s_a", SD1, 4, None, *inputs(4), generator=theirs)
    our_trace("dpmpp_2s_a", SD1, 4, None, *inputs(4), generator=ours)
    assert torch.equal(theirs.get_state(), ours.get_state())
