"""DPM++ 2S a, the sampler diffusers lacks, end to end: our engine on ONNX Runtime against
k-diffusion's sample_dpmpp_2s_ancestral (what AUTOMATIC1111 and ComfyUI run) driving the tiny
models' own diffusers U-Net and VAE on diffusers' Euler walk, given the same noise. (test_samplers.py
holds its table to k-diffusion step by step.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from conftest import PRESETS, assert_not_saturated, k_diffusion_sampling

# diffusers 0.42's schedulers call np.array() on torch tensors, which torch 2.13 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TOL = 1e-4  # max abs per pixel on [0, 1] (measured: up to 6e-6; test_parity.py allows diffusers' 2e-3)
W, H = 128, 96


@pytest.fixture(scope="module")
def reference(model_dirs):
    out = {}
    for p in PRESETS:
        pipe = StableDiffusionPipeline.from_pretrained(model_dirs[p], safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out[p] = pipe
    return out


@torch.no_grad()
def k_diffusion_image(pipe, prompt, negative, steps, guidance, latents, generator, karras):
    """The image k-diffusion's DPM++ 2S a draws with the pipeline's U-Net, guided as diffusers guides:
    the step sigmas, timesteps and start are diffusers' EulerDiscreteScheduler's, a midpoint's
    timestep its _sigma_to_t of the midpoint's sigma; the denoiser's x0 is what its step takes."""
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=karras)
    scheduler.set_timesteps(steps)
    log_sigmas = np.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).numpy() ** 0.5)
    guided = guidance > 1
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, guided, negative)
    text = torch.cat([uncond, cond]) if guided else cond
    v = pipe.scheduler.config.prediction_type == "v_prediction"
    calls = []

    def denoiser(x, sigma):
        s = float(sigma[0])
        step_start = len(calls) % 2 == 0  # a step's first call, then its midpoint's (the last step has one)
        t = scheduler.timesteps[len(calls) // 2] if step_start else float(scheduler._sigma_to_t(np.array(s), log_sigmas))
        calls.append(t)
        model_in = x / (s**2 + 1) ** 0.5
        out = pipe.unet(torch.cat([model_in] * 2) if guided else model_in, t, encoder_hidden_states=text).sample
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        return out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1) if v else x - s * out

    x = k_diffusion_sampling().sample_dpmpp_2s_ancestral(
        denoiser, latents * scheduler.init_noise_sigma, scheduler.sigmas, disable=True,
        noise_sampler=lambda sigma, sigma_next: torch.randn(latents.shape, generator=generator))
    assert len(calls) == 2 * steps - 1
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampler,guidance,negative", [
    ("dpmpp_2s_a", 7.5, None), ("dpmpp_2s_a_karras", 7.5, "blurry, low quality"), ("dpmpp_2s_a_karras", 1.0, None),
])
def test_dpmpp_2s_a_draws_what_k_diffusion_draws(preset, sampler, guidance, negative, reference, pipelines,
                                                 torch_noise):
    steps, seed, prompt = 5, 11, "a photo of an astronaut riding a horse"
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    ref = k_diffusion_image(reference[preset], prompt, negative, steps, guidance, latents.clone(),
                            torch.Generator().manual_seed(seed), karras=sampler.endswith("_karras"))
    ours = pipelines[preset](
        prompt, negative_prompt=negative, steps=steps, guidance=guidance, sampler=sampler,
        width=W, height=H, latents=latents.numpy(), generator=torch_noise(seed), output_type="np",
        progress=False,
    )
    assert ours.shape == ref.shape == (1, H, W, 3)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
