"""Our engine on ONNX Runtime against diffusers' own pipelines, given the same noise.

For both tiny models, every sampler (some with and without a negative prompt, guided and not):
txt2img against StableDiffusionPipeline and img2img against StableDiffusionImg2ImgPipeline,
to 2e-3 max abs per pixel on [0, 1]."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from conftest import PRESETS, assert_not_saturated, diffusers_schedulers, generator_samplers, torchs_float32_rounding

TOL = 2e-3
SCHEDULERS = diffusers_schedulers()
W, H = 128, 96  # not square, so a width/height mix-up shows


@pytest.fixture(scope="module")
def reference(model_dirs):
    out = {}
    for p in PRESETS:
        t2i = StableDiffusionPipeline.from_pretrained(model_dirs[p], safety_checker=None, requires_safety_checker=False)
        t2i.set_progress_bar_config(disable=True)
        i2i = StableDiffusionImg2ImgPipeline(**t2i.components)
        i2i.set_progress_bar_config(disable=True)
        out[p] = (t2i, i2i, dict(t2i.scheduler.config))
    return out


def with_scheduler(reference, which, sampler):
    """The pipeline with a fresh scheduler built from the model's own config (not from the
    previous test's: `use_karras_sigmas` would leak into the next one)."""
    pipe, config = reference[which], reference[2]
    cls, kw = SCHEDULERS[sampler]
    pipe.scheduler = cls.from_config(config, **kw)
    return pipe


@pytest.fixture(scope="module")
def init_image():
    # A smooth colourful image, so the VAE encoder sees structure.
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x / W, y / H, 0.5 + 0.5 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


# Guidance and negative prompts are the graph's, the same for every sampler: each sampler is run
# guided; a few of them in every combination.
GUIDED = [(7.5, None)]
COMBINATIONS = [(7.5, "blurry, low quality"), (1.0, None), (1.0, "ugly")]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("sampler,guidance,negative", [
    *((s, *g) for s in generator_samplers() for g in GUIDED),
    *((s, *g) for s in ("ddim", "euler_a", "heun", "dpmpp_2m_karras", "dpmpp_2m_sde", "unipc", "lcm", "dpm2_a")
      for g in COMBINATIONS),
])
def test_txt2img_matches_diffusers(preset, sampler, guidance, negative, reference, pipelines, torch_noise):
    steps, seed, prompt = 5, 11, "a photo of an astronaut riding a horse"
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    ref = with_scheduler(reference[preset], 0, sampler)(
        prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
        height=H, width=W, latents=latents.clone(), generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    ours = pipelines[preset](
        prompt, negative_prompt=negative, steps=steps, guidance=guidance, sampler=sampler,
        width=W, height=H, latents=latents.numpy(), generator=torch_noise(seed), output_type="np",
        progress=False,
    )
    assert ours.shape == ref.shape == (1, H, W, 3)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


# Each sampler's img2img start (its walk cut at a strength) is checked step by step in
# test_samplers.py; here each runs through the pipeline once on each model, at one strength each.
@pytest.mark.parametrize("preset,strength", [("tiny-sd1", 0.6), ("tiny-sd2", 1.0)])
@pytest.mark.parametrize("sampler", generator_samplers())
def test_img2img_matches_diffusers(preset, sampler, strength, reference, pipelines, init_image, torch_noise):
    steps, seed, prompt = 6, 5, "a watercolor painting"
    ref = with_scheduler(reference[preset], 1, sampler)(
        prompt, image=init_image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images
    ours = pipelines[preset](
        prompt, init_image=init_image, strength=strength, steps=steps, guidance=7.5, sampler=sampler,
        generator=torch_noise(seed), output_type="np", progress=False,
    )
    assert ours.shape == ref.shape == (1, H, W, 3)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_dpmpp_sde_matches_diffusers(reference, pipelines, init_image, torch_noise):
    """DPM++ SDE's noise is a Brownian tree's per image, seeded by the image's seed: a batch of two
    (seeds 11, 12) against two diffusers runs with noise_sampler_seed 11 and 12; then img2img with
    Karras sigmas on the other model."""
    steps, prompt = 5, "a photo of an astronaut riding a horse"
    latents = torch.randn((2, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    pipe, config = reference["tiny-sd1"][0], reference["tiny-sd1"][2]
    with torchs_float32_rounding():
        ours = pipelines["tiny-sd1"](prompt, seed=11, num_images=2, steps=steps, guidance=7.5, sampler="dpmpp_sde",
                                     width=W, height=H, latents=latents.numpy(), output_type="np", progress=False)
        for i in range(2):
            pipe.scheduler = SCHEDULERS["dpmpp_sde"][0].from_config(config, noise_sampler_seed=11 + i)
            ref = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=H, width=W,
                       latents=latents[i:i + 1].clone(), output_type="np").images
            assert_not_saturated(ref)
            np.testing.assert_allclose(ours[i:i + 1], ref, rtol=0, atol=TOL)

        pipe, config = reference["tiny-sd2"][1], reference["tiny-sd2"][2]
        pipe.scheduler = SCHEDULERS["dpmpp_sde_karras"][0].from_config(config, noise_sampler_seed=5,
                                                                       **SCHEDULERS["dpmpp_sde_karras"][1])
        ref = pipe("a watercolor painting", image=init_image, strength=0.6, num_inference_steps=6, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(5), output_type="np").images
        ours = pipelines["tiny-sd2"]("a watercolor painting", init_image=init_image, strength=0.6, steps=6,
                                     guidance=7.5, sampler="dpmpp_sde_karras", seed=5, generator=torch_noise(5),
                                     output_type="np", progress=False)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("sampler, steps, guidance", [
    ("euler_a_sgm_uniform", 4, 2.0), ("dpmpp_sde_sgm_uniform", 4, 2.0), ("dpmpp_2m_sde_beta", 8, 7.5),
    ("dpmpp_sde_beta", 5, 7.5)])
def test_other_sigmas_match_diffusers(sampler, steps, guidance, reference, pipelines):
    """A sampler on trailing spacing whatever the model's config says, as diffusers' scheduler made
    with timestep_spacing="trailing" (4 steps, as SDXL-Lightning draws); at Beta's sigmas, as its
    use_beta_sigmas."""
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(2))
    pipe, config = reference["tiny-sd1"][0], reference["tiny-sd1"][2]
    cls, options = SCHEDULERS[sampler]
    with torchs_float32_rounding():
        pipe.scheduler = cls.from_config(config, **options, **({"noise_sampler_seed": 8} if sampler.startswith("dpmpp_sde") else {}))
        ref = pipe("a red barn", num_inference_steps=steps, guidance_scale=guidance, height=H, width=W,
                   latents=latents.clone(), generator=torch.Generator().manual_seed(8), output_type="np").images
        ours = pipelines["tiny-sd1"]("a red barn", steps=steps, guidance=guidance, sampler=sampler, width=W, height=H, seed=8,
                                     latents=latents.numpy(), generator=torch.Generator().manual_seed(8),
                                     output_type="np", progress=False)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("sampler", ["euler_ays", "dpmpp_2m_ays"])
def test_align_your_steps_matches_diffusers(sampler, reference, pipelines):
    """NVIDIA's ten Align Your Steps for SD 1.5 as diffusers draws them: its pipeline given
    timesteps=AysSchedules["StableDiffusionTimesteps"]."""
    from diffusers.schedulers import AysSchedules

    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    pipe, config = reference["tiny-sd1"][0], reference["tiny-sd1"][2]
    cls, options = SCHEDULERS[sampler]
    with torchs_float32_rounding():
        pipe.scheduler = cls.from_config(config, **options)
        ref = pipe("a red barn", timesteps=AysSchedules["StableDiffusionTimesteps"], guidance_scale=7.5, height=H,
                   width=W, latents=latents.clone(), output_type="np").images
        ours = pipelines["tiny-sd1"]("a red barn", steps=10, guidance=7.5, sampler=sampler, width=W, height=H,
                                     latents=latents.numpy(), output_type="np", progress=False)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_noise_multiplier_scales_the_noise_added_to_the_image(reference, pipelines, init_image, torch_noise):
    """AUTOMATIC1111's "Noise multiplier for img2img": diffusers' img2img with its start noise
    scaled (its scheduler's add_noise given multiplier x noise); txt2img ignores it."""
    from diffusers import EulerDiscreteScheduler

    from ldm_deploy.errors import InvalidRequest

    class Scaled(EulerDiscreteScheduler):
        def add_noise(self, original, noise, timesteps):
            return super().add_noise(original, noise * 1.1, timesteps)

    pipe, config = reference["tiny-sd1"][1], reference["tiny-sd1"][2]
    pipe.scheduler = Scaled.from_config(config)
    ref = pipe("a watercolor painting", image=init_image, strength=0.6, num_inference_steps=6, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(5), output_type="np").images
    kw = dict(steps=6, guidance=7.5, sampler="euler", output_type="np", progress=False)
    ours = pipelines["tiny-sd1"]("a watercolor painting", init_image=init_image, strength=0.6, noise_multiplier=1.1,
                                 generator=torch_noise(5), **kw)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
    plain = pipelines["tiny-sd1"]("a watercolor painting", init_image=init_image, strength=0.6,
                                  generator=torch_noise(5), **kw)
    assert np.abs(plain - ours).max() > 10 * TOL
    image = pipelines["tiny-sd1"]("x", init_image=init_image, strength=0.6, noise_multiplier=1.1, seed=1, steps=2,
                                  progress=False)[0]
    assert "Denoising strength: 0.6, Noise multiplier: 1.1," in image.info["parameters"]
    txt = dict(steps=2, width=64, height=64, seed=1, output_type="np", progress=False)
    assert np.array_equal(pipelines["tiny-sd1"]("x", noise_multiplier=1.1, **txt), pipelines["tiny-sd1"]("x", **txt))
    for bad in (0, -1.0, float("nan"), True, "1.1"):
        with pytest.raises(InvalidRequest, match="noise_multiplier scales the noise added to an img2img image"):
            pipelines["tiny-sd1"]("x", init_image=init_image, noise_multiplier=bad, steps=2, progress=False)


def test_dpmpp_sde_with_a_generator_and_no_seed_is_warned(pipelines, caplog):
    import logging

    pipe = pipelines["tiny-sd1"]
    pipe.warned.discard("sde")
    kw = dict(steps=2, width=64, height=64, progress=False, output_type="np")
    with caplog.at_level(logging.WARNING):
        pipe("x", sampler="dpmpp_sde", generator=torch.Generator().manual_seed(1), **kw)
    assert "seeded by each image's seed, not from the generator or latents given" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # with a seed the tree is the seed's: the same image again
        a = pipe("x", sampler="dpmpp_sde", seed=4, generator=torch.Generator().manual_seed(1), **kw)
        b = pipe("x", sampler="dpmpp_sde", seed=4, generator=torch.Generator().manual_seed(1), **kw)
    assert "Brownian" not in caplog.text and np.array_equal(a, b)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a"])
def test_diffusers_call_unchanged_gives_diffusers_image(sampler, reference, pipelines, init_image):
    """Code written for diffusers runs unchanged: its keyword names, and a torch.Generator that
    draws the start noise (and euler_a's step noise) exactly as diffusers does."""
    common = dict(num_inference_steps=4, guidance_scale=7.5, output_type="np", height=H, width=W)
    ref = with_scheduler(reference["tiny-sd1"], 0, sampler)(
        "a red barn", generator=torch.Generator().manual_seed(21), **common).images
    ours = pipelines["tiny-sd1"]("a red barn", generator=torch.Generator().manual_seed(21),
                                 sampler=sampler, progress=False, **common)
    assert_not_saturated(ref)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)

    common = dict(image=init_image, strength=0.7, num_inference_steps=5, guidance_scale=7.5,
                  num_images_per_prompt=2, output_type="np")
    ref = with_scheduler(reference["tiny-sd1"], 1, sampler)(
        "a watercolor", generator=torch.Generator().manual_seed(4), **common).images
    ours = pipelines["tiny-sd1"]("a watercolor", generator=torch.Generator().manual_seed(4),
                                 sampler=sampler, progress=False, **common)
    assert ours.shape == ref.shape == (2, H, W, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_diffusers_names_clash_with_ours(pipelines):
    from ldm_deploy.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="num_inference_steps and steps name the same setting"):
        pipelines["tiny-sd1"]("x", steps=3, num_inference_steps=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'callback_on_step_end'"):
        pipelines["tiny-sd1"]("x", callback_on_step_end=print)


def skipped_embeddings(pipe, texts, clip_skip):
    """diffusers' encode_prompt with clip_skip, for any list of texts: the hidden state
    clip_skip layers below the last, through the final layer norm. (diffusers 0.42 reaches that
    norm as text_encoder.text_model.final_layer_norm, which transformers 5 no longer has.)"""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return pipe.text_encoder.final_layer_norm(hidden)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_clip_skip_matches_diffusers(preset, guidance, reference, pipelines, torch_noise):
    """clip_skip=1 (AUTOMATIC1111's Clip skip 2) for the prompt and the negative prompt both, as
    AUTOMATIC1111 and ComfyUI apply it; diffusers' StableDiffusionPipeline given those embeddings."""
    prompt, negative, steps, seed = "a castle on a hill", "fog", 4, 8
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(6))
    pipe = with_scheduler(reference[preset], 0, "dpmpp_2m_karras")
    embeds = {"prompt_embeds": skipped_embeddings(pipe, [prompt], 1)}
    if guidance > 1:
        embeds["negative_prompt_embeds"] = skipped_embeddings(pipe, [negative], 1)
    ref = pipe(**embeds, num_inference_steps=steps, guidance_scale=guidance, height=H, width=W,
               latents=latents.clone(), generator=torch.Generator().manual_seed(seed), output_type="np").images
    kw = dict(steps=steps, guidance=guidance, width=W, height=H, latents=latents.numpy(), progress=False)
    ours = pipelines[preset](prompt, negative_prompt=negative if guidance > 1 else None, clip_skip=1,
                             generator=torch_noise(seed), **kw)
    assert_not_saturated(ref)
    np.testing.assert_allclose(np.asarray(ours[0], np.float32) / 255, ref[0], rtol=0, atol=TOL + 1 / 255)
    ours = pipelines[preset](prompt, negative_prompt=negative if guidance > 1 else None, clip_skip=1,
                             generator=torch_noise(seed), output_type="np", **kw)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
    plain = pipelines[preset](prompt, negative_prompt=negative if guidance > 1 else None, clip_skip=0,
                              generator=torch_noise(seed), output_type="np", **kw)
    assert np.abs(plain - ours).max() > 10 * TOL  # the skip changes the image


def test_clip_skip_is_checked_and_recorded_and_old_engines_run(pipelines, model_dirs, tmp_path, monkeypatch, caplog):
    import logging
    from dataclasses import replace

    from ldm_deploy import Pipeline
    from ldm_deploy.errors import EngineError, InvalidRequest
    from ldm_deploy.export import build
    from ldm_deploy.export.config import ExportConfig

    pipe = pipelines["tiny-sd1"]
    kw = dict(steps=1, width=64, height=64, progress=False)
    assert "Clip skip: 2," in pipe("x", clip_skip=1, **kw)[0].info["parameters"]  # A1111's count
    assert "Clip skip" not in pipe("x", **kw)[0].info["parameters"]
    for bad, message in [(2, "clip_skip must be from 0 to 1 (this text encoder has 2 layers), got 2"),
                         (-1, "clip_skip counts the text encoder layers skipped"),
                         (0.5, "clip_skip must be a whole number")]:
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            pipe("x", clip_skip=bad, **kw)
    # An engine exported before clip skip and long prompts existed (no text_layers, a text encoder
    # without the clip_skip input, a U-Net step of one chunk of text) draws what a new one draws
    # without a skip, says how to get one, and cuts long prompts at 75 tokens, as it did.
    config = ExportConfig(min_size=64, max_size=64, img2img=False)
    new = build.export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "new", config)
    info = build.model_info
    monkeypatch.setattr(build, "model_info", lambda src: replace(info(src), text_layers=0, long_prompts=False))
    old = build.export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "old", config)
    old_pipe = Pipeline.load(old)
    assert old_pipe.manifest.specs()["text_encoder"].inputs[-1].name == "input_ids"
    assert old_pipe.manifest.specs()["unet_step"].tensor("text_embeddings").shape[2] == 77
    with caplog.at_level(logging.WARNING):
        old_pipe("cat " * 80, **kw)
    assert "the prompt needs 2 chunks of 75 tokens" in caplog.text and "this engine takes 1" in caplog.text
    np.testing.assert_allclose(old_pipe("x", seed=3, output_type="np", **kw),
                               Pipeline.load(new)("x", seed=3, output_type="np", **kw), rtol=0, atol=1e-5)
    with pytest.raises(InvalidRequest, match=r"exported before clip skip\); re-export it with ldm-export --force"):
        old_pipe("x", clip_skip=1, **kw)
    old_pipe("x", prompt_weighting=True, **kw)  # nothing to weigh: runs
    # A manifest whose format does not match its graphs is refused when loaded, not mid-run.
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["model"]["text_layers"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="its text_encoder takes the inputs input_ids, where this ldm-deploy gives "
                                          "input_ids, clip_skip, token_weights: it was exported by another version"):
        Pipeline.load(old, verify=False)
    with pytest.raises(InvalidRequest, match="cannot weigh tokens .* or turn prompt weighting off"):
        old_pipe("(x:1.2)", prompt_weighting=True, **kw)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_karras", "euler_a"])
def test_hires_fix_is_txt2img_then_img2img_of_the_enlarged_image(sampler, reference, pipelines):
    """AUTOMATIC1111's hires fix with a Lanczos upscaler: diffusers' txt2img, its 8-bit image
    resized, then diffusers' img2img with the same seed, running exactly the hires steps as
    AUTOMATIC1111 does: the last 4 of a schedule of int(4 / 0.6) = 6."""
    seeds, steps = [21, 22], 3
    ours = pipelines["tiny-sd1"]("a lighthouse", seed=21, num_images=2, steps=steps, width=64, height=64,
                                 sampler=sampler, hires_scale=1.5, hires_steps=np.int64(4), hires_strength=0.6,
                                 progress=False)
    for seed, image in zip(seeds, ours):
        first = with_scheduler(reference["tiny-sd1"], 0, sampler)(
            "a lighthouse", num_inference_steps=steps, guidance_scale=7.5, height=64, width=64,
            generator=torch.Generator().manual_seed(seed)).images[0]
        want = with_scheduler(reference["tiny-sd1"], 1, sampler)(
            "a lighthouse", image=first.resize((96, 96), resample=Image.LANCZOS), strength=4.5 / 6,
            num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
            output_type="np").images[0]
        assert image.size == (96, 96)
        # Our 8-bit image against diffusers' floats: half a level of rounding on top of TOL (the
        # first pass's 8-bit images agreed, or the difference would show here; seen: 2.0e-3).
        np.testing.assert_allclose(np.asarray(image, np.float32) / 255, want, rtol=0, atol=TOL + 0.5 / 255)
        assert "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Lanczos" \
            in image.info["parameters"] and "Size: 64x64" in image.info["parameters"]


def test_hires_prompt_and_sampler_are_the_second_passs(reference, pipelines):
    """AUTOMATIC1111's "Hires prompt", "Hires negative prompt" and "Hires sampler": diffusers'
    txt2img, then its img2img of the enlarged image with the other prompts and scheduler."""
    ours = pipelines["tiny-sd1"]("a lighthouse", negative_prompt="fog", seed=21, steps=3, width=64, height=64,
                                 sampler="dpmpp_2m_karras", hires_scale=1.5, hires_steps=4, hires_strength=0.6,
                                 hires_prompt="a lighthouse, at night: stars", hires_negative_prompt="sun",
                                 hires_sampler="euler", progress=False)[0]
    first = with_scheduler(reference["tiny-sd1"], 0, "dpmpp_2m_karras")(
        "a lighthouse", negative_prompt="fog", num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
        generator=torch.Generator().manual_seed(21)).images[0]
    want = with_scheduler(reference["tiny-sd1"], 1, "euler")(
        "a lighthouse, at night: stars", negative_prompt="sun", image=first.resize((96, 96), resample=Image.LANCZOS),
        strength=4.5 / 6, num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(21),
        output_type="np").images[0]
    np.testing.assert_allclose(np.asarray(ours, np.float32) / 255, want, rtol=0, atol=TOL + 0.5 / 255)
    text = ours.info["parameters"]
    assert 'Hires sampler: Euler, Hires prompt: "a lighthouse, at night: stars", Hires negative prompt: sun' in text
    from ldm_deploy.engine import infotext

    options, warnings = infotext.settings(infotext.parse(text)[2])
    assert (options["hires_prompt"], options["hires_negative_prompt"], options["hires_sampler"]) == \
        ("a lighthouse, at night: stars", "sun", "euler") and not warnings
    same = pipelines["tiny-sd1"]("a", seed=1, steps=1, width=64, height=64, hires_scale=1.5, hires_prompt="a",
                                 hires_sampler="dpmpp_2m_karras", progress=False)[0].info["parameters"]
    assert "Hires prompt" not in same and "Hires sampler" not in same  # as the first pass's: not written
    plain = pipelines["tiny-sd1"]("a", seed=1, steps=1, width=64, height=64, hires_scale=1.5, hires_prompt="a (b:1.2)",
                                  progress=False)[0].info["parameters"]
    assert "Emphasis: None" in plain  # brackets read as text in the hires prompt alone


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)"])
def test_hires_fix_with_a_latent_upscaler_redraws_the_resized_latents(upscaler, reference, pipelines, model_dirs,
                                                                      tmp_path):
    """AUTOMATIC1111's "Latent" upscalers: diffusers' txt2img latents, resized by torch's
    interpolate, then diffusers' img2img given those latents as its image (no VAE round trip),
    running exactly the hires steps: the last 3 of int(3 / 0.7) = 4."""
    from ldm_deploy import Pipeline
    from ldm_deploy.engine.latent_resize import LATENT_UPSCALERS
    from ldm_deploy.export.build import export_engine
    from ldm_deploy.export.config import ExportConfig

    mode, antialias = LATENT_UPSCALERS[upscaler]
    kw = dict(seed=31, steps=3, width=96, height=64, sampler="euler", hires_scale=2, hires_steps=3,
              hires_upscaler=upscaler.upper(), output_type="np", progress=False)  # any letter case
    ours = pipelines["tiny-sd1"]("a lighthouse", **kw)
    first = with_scheduler(reference["tiny-sd1"], 0, "euler")(
        "a lighthouse", num_inference_steps=3, guidance_scale=7.5, height=64, width=96,
        generator=torch.Generator().manual_seed(31), output_type="latent").images
    resized = torch.nn.functional.interpolate(first, size=(16, 24), mode=mode, antialias=antialias)
    want = with_scheduler(reference["tiny-sd1"], 1, "euler")(
        "a lighthouse", image=resized, strength=3.5 / 4, num_inference_steps=4, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(31), output_type="np").images
    assert_not_saturated(want)
    np.testing.assert_allclose(ours, want, rtol=0, atol=TOL)
    image = pipelines["tiny-sd1"]("a lighthouse", **(kw | {"output_type": "pil"}))[0]
    assert f"Hires upscale: 2, Hires steps: 3, Hires upscaler: {upscaler}," in image.info["parameters"]
    # No VAE encoder needed: an engine exported without it (--no-img2img) draws the same.
    if upscaler == "Latent":
        # Each image of a batch, as alone with its seed.
        two = pipelines["tiny-sd1"]("a lighthouse", **(kw | {"seed": 30, "num_images": 2}))
        np.testing.assert_allclose(two[1:], ours, rtol=0, atol=1e-5)
        txt2img = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e",
                                ExportConfig(min_size=64, max_size=192, img2img=False))
        np.testing.assert_allclose(Pipeline.load(txt2img)("a lighthouse", **kw), ours, rtol=0, atol=1e-5)


def test_init_latents_are_checked(pipelines):
    from ldm_deploy.errors import InvalidRequest

    pipe = pipelines["tiny-sd1"]
    latents = pipe("x", steps=2, width=64, height=64, seed=1, output_type="latent", progress=False)
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == np.float32
    decoded = pipe("x", steps=2, width=64, height=64, seed=1, output_type="np", progress=False)
    assert pipe("x", init_image=latents, steps=2, progress=False)[0].size == (64, 64)  # their size
    # A (1, H, W, 3) image, as output_type="np" gives, is an image, not latents.
    assert pipe("x", init_image=decoded, steps=2, progress=False)[0].size == (64, 64)
    for init, kw, message in [
        (latents, dict(width=128), "init latents of 8x8 make 64x64 images, not width 128: latents are not resized"),
        (np.zeros((1, 3, 8, 8), np.float32), {}, "init latents have 3 channels; this model's have 4"),
        (np.zeros((2, 4, 8, 8), np.float32), {}, "init latents hold 2 images; give one, or one per image (1)"),
        (latents.astype(np.int64), {}, "init latents must be a finite (1, C, h, w) float array"),
        (np.zeros((1, 4, 4, 8), np.float32), {}, "init latents of 8x4 make 64x32 images, and height 32 is outside "
                                                 "this engine's range [64, 512]"),
    ]:
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            pipe("x", init_image=init, steps=2, progress=False, **kw)


def test_hires_fix_refuses_what_it_cannot_do(pipelines, init_image):
    from ldm_deploy.errors import InvalidRequest

    pipe = pipelines["tiny-sd1"]
    for kw, message in [
        (dict(hires_scale=1.0), "hires_scale must be above 1 and at most 8"),
        (dict(hires_scale=1e306), "hires_scale must be above 1 and at most 8"),
        (dict(hires_scale=True), "hires_scale must be a number, got True"),
        (dict(hires_scale=5, width=128, height=128), "hires fix at 5x makes 640x640, beyond this engine's "
                                                     "largest size 512x512"),
        (dict(hires_scale=2.0, hires_steps=-1), "hires_steps must be 0 (as many as steps) or more"),
        (dict(hires_scale=2.0, hires_steps=1.5), "hires_steps must be a whole number, got 1.5"),
        (dict(hires_scale=2.0, hires_strength=0.0), "hires_strength must be in (0, 1]"),
        (dict(hires_scale=2.0, hires_strength="0.5"), "hires_strength must be a number, got '0.5'"),
        (dict(hires_strength=0.5), "hires_strength (--hires-strength) set the hires fix's second pass; give hires_scale"),
        (dict(hires_prompt="a", hires_sampler="euler"), "hires_prompt, hires_sampler (--hires-prompt, --hires-sampler) "
                                                        "set the hires fix's second pass; give hires_scale too "
                                                        "(--hires-scale"),
        (dict(hires_scale=2.0, hires_sampler="Euler"), "unknown hires_sampler 'Euler'; choose one of"),
        (dict(hires_scale=2.0, hires_prompt=["a"]), "hires_prompt must be text (None: the first pass's), got list"),
        (dict(hires_upscaler="Latent"), "give hires_scale too"),
        (dict(hires_scale=2.0, hires_upscaler="ESRGAN"), "unknown hires upscaler 'ESRGAN'; choose one of Lanczos, "
                                                          "Latent, Latent (antialiased)"),
        (dict(prompt_weighting="false"), "prompt_weighting must be True or False, got 'false'"),
        (dict(output_type="pt"), "output_type must be 'pil', 'np' or 'latent', got 'pt'"),
        (dict(hires_scale=2.0, init_image=init_image), "hires fix enlarges a txt2img result"),
    ]:
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            pipe("x", **{"steps": 2, "width": 64, "height": 64, "progress": False, **kw})
