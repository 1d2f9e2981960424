"""Inpainting against diffusers' StableDiffusionInpaintPipeline, given the same generators: an
inpainting model (9 channels in: latents, mask, masked image latents) and text-to-image models
(the kept part put back at every step), every sampler, to 2e-3 max abs per pixel on [0, 1]."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from conftest import TEST_CONFIG, assert_not_saturated, diffusers_schedulers, generator_samplers, torchs_float32_rounding
from ldm_deploy import Pipeline
from ldm_deploy.cli import run as run_cli
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.export import build
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.random_model import make_random_model

TOL = 2e-3
SCHEDULERS = diffusers_schedulers()
W, H = 128, 96


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """(model folder, our pipeline) of a tiny SD 1.x inpainting model."""
    root = tmp_path_factory.mktemp("inpainting")
    folder = make_random_model(root / "model", "tiny-sd1", seed=1, inpainting=True)
    engine = export_engine(str(folder), root / "engine", TEST_CONFIG)
    return folder, Pipeline.load(engine)


@pytest.fixture(scope="module")
def reference(inpainting, model_dirs):
    """Model name -> (diffusers' inpainting pipeline, its scheduler config)."""
    out = {}
    for name, folder in (("inpainting", inpainting[0]), *model_dirs.items()):
        pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out[name] = (pipe, dict(pipe.scheduler.config))
    return out


def diffusers_run(reference, name, sampler, **kwargs) -> np.ndarray:
    pipe, config = reference[name]
    cls, options = SCHEDULERS[sampler]
    pipe.scheduler = cls.from_config(config, **options)
    return pipe(height=H, width=W, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def init_image():
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x / W, y / H, 0.5 + 0.5 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def mask():
    """Half the size of the image (both resize it), a rectangle with a grey ramp on its left
    edge, so that where the 0.5 cut falls matters."""
    m = np.zeros((H // 2, W // 2), np.float32)
    m[10:36, 14:52] = 1.0
    m[10:36, 8:14] = np.linspace(0.2, 0.9, 6)
    return Image.fromarray((m * 255).round().astype(np.uint8))


def ours(pipe, sampler, **kwargs) -> np.ndarray:
    return pipe(sampler=sampler, output_type="np", progress=False, **kwargs)


# Every sampler at strength 1 and at 0.6 runs through inpainting once (the inpainting model at 1, a
# text-to-image model, whose kept part goes back at each row's level, at 0.6), a few at both.
FEW = ("euler_a", "heun", "dpm2_a", "dpmpp_2m_karras", "unipc", "lcm")


@pytest.mark.parametrize("sampler,strength", [*((s, 1.0) for s in generator_samplers()),
                                              *((s, 0.6) for s in FEW)])
def test_inpainting_model_matches_diffusers(sampler, strength, inpainting, reference, init_image, mask):
    common = dict(prompt="a cat on a bench", image=init_image, mask_image=mask, strength=strength,
                  num_inference_steps=5, guidance_scale=7.5)
    ref = diffusers_run(reference, "inpainting", sampler, generator=torch.Generator().manual_seed(3), **common)
    got = ours(inpainting[1], sampler, generator=torch.Generator().manual_seed(3), **common)
    assert got.shape == ref.shape == (1, H, W, 3)
    assert_not_saturated(ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("preset,sampler,strength", [
    *(("tiny-sd1", s, 0.6) for s in generator_samplers()), *(("tiny-sd1", s, 1.0) for s in FEW),
    ("tiny-sd2", "dpmpp_2m_karras", 1.0), ("tiny-sd2", "heun", 0.6), ("tiny-sd2", "euler_a", 1.0),
])
def test_text_to_image_model_inpaints_as_diffusers(preset, sampler, strength, pipelines, reference, init_image, mask):
    """diffusers puts the kept part back after every step, noised to the next step's level (Heun:
    after each of its two calls, as its scheduler counts steps)."""
    common = dict(prompt="a cat on a bench", image=init_image, mask_image=mask, strength=strength,
                  num_inference_steps=5, guidance_scale=7.5)
    ref = diffusers_run(reference, preset, sampler, generator=torch.Generator().manual_seed(4), **common)
    got = ours(pipelines[preset], sampler, generator=torch.Generator().manual_seed(4), **common)
    assert_not_saturated(ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("name,strength", [("inpainting", 1.0), ("tiny-sd1", 0.6)])
def test_dpmpp_sde_inpaints_as_diffusers(name, strength, inpainting, pipelines, reference, init_image, mask):
    """DPM++ SDE's Brownian noise, seeded by the image's seed (diffusers' noise_sampler_seed), with an
    inpainting model and with a text-to-image one (the kept part put back after each of its calls)."""
    pipe = inpainting[1] if name == "inpainting" else pipelines[name]
    common = dict(prompt="a cat on a bench", image=init_image, mask_image=mask, strength=strength,
                  num_inference_steps=5, guidance_scale=7.5)
    ref_pipe, config = reference[name]
    ref_pipe.scheduler = SCHEDULERS["dpmpp_sde_karras"][0].from_config(config, noise_sampler_seed=3,
                                                                       **SCHEDULERS["dpmpp_sde_karras"][1])
    with torchs_float32_rounding():
        ref = ref_pipe(height=H, width=W, output_type="np", generator=torch.Generator().manual_seed(3),
                       **common).images
        got = ours(pipe, "dpmpp_sde_karras", seed=3, generator=torch.Generator().manual_seed(3), **common)
    assert_not_saturated(ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def diffusers_alone(reference, name, sampler, seeds, **kwargs) -> np.ndarray:
    """diffusers' images drawn one at a time, each with its seed's generator: (len(seeds), H, W, 3)."""
    return np.concatenate([diffusers_run(reference, name, sampler, generator=torch.Generator().manual_seed(s),
                                         **kwargs) for s in seeds])


@pytest.mark.parametrize("name", ["inpainting", "tiny-sd1"])
def test_each_image_of_a_batch_is_its_seeds_alone(name, inpainting, pipelines, reference, init_image, mask):
    """Our seeds (7 for image 0, 8 for image 1) sample the image once per image, so that each image
    of a batch is the one diffusers draws alone with its seed's generator (and its PNG draws it
    again); image 0 is also diffusers' image 0 of a list of those generators, which samples the
    image once with the first. Unguided: the batch is the images' own."""
    pipe = inpainting[1] if name == "inpainting" else pipelines[name]
    common = dict(prompt="a red door", image=init_image, mask_image=mask, num_inference_steps=4,
                  guidance_scale=1.0)
    ref = diffusers_alone(reference, name, "euler_a", (7, 8), **common)
    listed = diffusers_run(reference, name, "euler_a", generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
                           num_images_per_prompt=2, **common)
    got = ours(pipe, "euler_a", seed=7, num_images_per_prompt=2, **common)
    assert got.shape == ref.shape == (2, H, W, 3)
    assert np.abs(ref[0] - ref[1]).max() > 0.05  # the two images differ
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(got[0], listed[0], rtol=0, atol=TOL)


def test_batches_past_the_engines_batch_are_each_seeds_alone(inpainting, pipelines, reference, init_image, mask):
    """Three images on engines of batch 2 (two chunks), guided: each its seed's alone."""
    common = dict(prompt="a red door", image=init_image, mask_image=mask, num_inference_steps=3,
                  guidance_scale=7.5)
    for name, pipe in (("inpainting", inpainting[1]), ("tiny-sd1", pipelines["tiny-sd1"])):
        assert pipe.manifest.dims["batch"].max == 2
        ref = diffusers_alone(reference, name, "dpmpp_2m_karras", (7, 8, 9), **common)
        got = ours(pipe, "dpmpp_2m_karras", seed=7, num_images_per_prompt=3, **common)
        np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_one_generator_samples_the_image_once_for_the_batch(inpainting, reference, init_image, mask):
    """One torch.Generator for a batch: the image sampled once, as diffusers does."""
    common = dict(prompt="a red door", image=init_image, mask_image=mask, num_inference_steps=3,
                  guidance_scale=7.5, num_images_per_prompt=2)
    ref = diffusers_run(reference, "inpainting", "euler", generator=torch.Generator().manual_seed(5), strength=0.7,
                        **common)
    got = ours(inpainting[1], "euler", generator=torch.Generator().manual_seed(5), strength=0.7, **common)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_array_masks_are_read_as_diffusers_reads_them(inpainting, reference, init_image):
    """Arrays are cut at 0.5 as they are (bool, 0 / 1 integers, floats) and resized by nearest
    neighbour; given latents are the start noise, as diffusers' at strength 1."""
    m = np.zeros((H // 2, W // 2), np.float32)
    m[8:40, 12:50] = 1.0
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(1))
    common = dict(prompt="a cat", image=init_image, num_inference_steps=4, guidance_scale=7.5)
    ref = diffusers_run(reference, "inpainting", "euler", mask_image=m, latents=latents.clone(),
                        generator=torch.Generator().manual_seed(2), **common)
    assert_not_saturated(ref)
    for given in (m, m.astype(bool), m.astype(np.int64), m[..., None]):
        got = ours(inpainting[1], "euler", mask_image=given, latents=latents.numpy(), width=W, height=H,
                   generator=torch.Generator().manual_seed(2), **common)
        np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_model_without_a_mask_redraws_everything(strength, inpainting, reference, init_image):
    """No mask: all of it is redrawn, as diffusers draws with a white mask (txt2img: from a blank
    image, which at strength 1 only the masked image's latents see)."""
    white = Image.new("L", (W, H), 255)
    common = dict(prompt="a lighthouse", num_inference_steps=5, guidance_scale=7.5)
    ref = diffusers_run(reference, "inpainting", "dpmpp_2m_karras", image=init_image, mask_image=white,
                        strength=strength, generator=torch.Generator().manual_seed(9), **common)
    if strength == 1.0:  # txt2img
        got = ours(inpainting[1], "dpmpp_2m_karras", width=W, height=H, generator=torch.Generator().manual_seed(9),
                   **common)
    else:  # img2img
        got = ours(inpainting[1], "dpmpp_2m_karras", init_image=init_image, strength=strength,
                   generator=torch.Generator().manual_seed(9), **common)
    assert_not_saturated(ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_text_to_image_model_keeps_the_unmasked_latents(pipelines, init_image):
    """The last step puts the image's own latents back where the mask is black: those of an
    all-black mask (nothing redrawn; to rounding, as ONNX Runtime fuses the blend), and elsewhere
    something new."""
    pipe = pipelines["tiny-sd1"]
    m = np.zeros((H, W), np.uint8)
    m[:, W // 2:] = 255  # redraw the right half
    common = dict(prompt="a boat", init_image=init_image, steps=4, seed=5, output_type="latent", progress=False)
    half = pipe(mask=m, **common)
    none = pipe(mask=np.zeros((H, W), np.uint8), **common)
    w = W // 8
    np.testing.assert_allclose(half[..., : w // 2], none[..., : w // 2], rtol=1e-6, atol=1e-12)
    assert np.abs(half[..., w // 2:] - none[..., w // 2:]).max() > 0.1


@pytest.mark.parametrize("name", ["inpainting", "tiny-sd1"])
@pytest.mark.parametrize("pad,size", [(8, (64, 64)), (40, (64, 128)), (0, (128, 64))])
def test_only_the_masked_area_as_diffusers_padding_mask_crop(name, pad, size, inpainting, pipelines, reference,
                                                             init_image):
    """The box around the mask (padded, grown to the drawing's aspect, kept inside the image), drawn
    at width x height and pasted back through the mask (soft where it is grey): diffusers' pixels,
    but for 8-bit rounding (< 0.1% of them one level off)."""
    pipe = inpainting[1] if name == "inpainting" else pipelines[name]
    m = np.zeros((H, W), np.uint8)
    m[30:50, 40:90] = 255
    m[30:50, 36:40] = 128  # grey: redrawn (>= 0.5) and half pasted over
    w, h = size
    common = dict(prompt="a cat", image=init_image, mask_image=Image.fromarray(m), padding_mask_crop=pad,
                  num_inference_steps=4, width=w, height=h)
    pipe_ref, config = reference[name]
    cls, options = SCHEDULERS["ddim"]
    pipe_ref.scheduler = cls.from_config(config, **options)
    ref = np.asarray(pipe_ref(generator=torch.Generator().manual_seed(3), **common).images[0], np.int16)
    got = pipe(sampler="ddim", generator=torch.Generator().manual_seed(3), progress=False, **common)[0]
    assert got.size == (W, H)
    assert "Inpaint area: Only masked, Masked area padding: %d" % pad in got.info["parameters"]
    diff = np.abs(np.asarray(got, np.int16) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert np.array_equal(np.asarray(got)[m == 0], np.asarray(init_image)[m == 0])  # the rest is the image's own
    as_array = pipe(sampler="ddim", generator=torch.Generator().manual_seed(3), progress=False, output_type="np",
                    **common)
    np.testing.assert_array_equal(as_array[0], np.asarray(got, np.float32) / 255)


@pytest.mark.parametrize("pad", [None, 8])
def test_mask_blur_is_diffusers_mask_processor_blur(pad, pipelines, reference, init_image):
    """mask_blur=4 is the mask through diffusers' mask_processor.blur(mask, 4) (AUTOMATIC1111's
    "Mask blur: 4"): cut at 0.5 it moves the edge; with mask_crop the paste is soft."""
    from diffusers.image_processor import VaeImageProcessor

    m = np.zeros((H, W), np.uint8)
    m[30:60, 40:90] = 255
    blurred = VaeImageProcessor.blur(Image.fromarray(m), 4)
    crop = {} if pad is None else {"padding_mask_crop": pad, "width": 64, "height": 64}
    common = dict(prompt="a cat", image=init_image, num_inference_steps=3, guidance_scale=7.5, **crop)
    pipe_ref, config = reference["tiny-sd1"]
    cls, options = SCHEDULERS["ddim"]
    pipe_ref.scheduler = cls.from_config(config, **options)
    size = {} if pad is not None else {"height": H, "width": W}
    ref = pipe_ref(mask_image=blurred, generator=torch.Generator().manual_seed(3), output_type="pil", **common,
                   **size).images[0]
    got = pipelines["tiny-sd1"](mask=m, mask_blur=4, sampler="ddim", progress=False,
                                generator=torch.Generator().manual_seed(3), **common)[0]
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(ref, np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert "Mask blur: 4," in got.info["parameters"]
    with pytest.raises(InvalidRequest, match="mask_blur blurs a mask"):
        pipelines["tiny-sd1"]("x", init_image=init_image, mask_blur=4, steps=2, progress=False)
    for bad in (-1, 1e300):
        with pytest.raises(InvalidRequest, match="a radius in pixels, from 0 to 10000"):
            pipelines["tiny-sd1"]("x", init_image=init_image, mask=m, mask_blur=bad, steps=2, progress=False)
    # palette and 1-bit masks (which PIL cannot blur as they are), numpy radii: as an L mask
    kw = dict(init_image=init_image, steps=2, seed=1, output_type="np", progress=False)
    want = pipelines["tiny-sd1"]("x", mask=Image.fromarray(m), mask_blur=2, **kw)
    for given, radius in ((Image.fromarray(m).convert("P"), 2), (Image.fromarray(m).convert("1"), np.float32(2)),
                          (Image.fromarray(m), np.int64(2))):
        np.testing.assert_array_equal(pipelines["tiny-sd1"]("x", mask=given, mask_blur=radius, **kw), want)


def test_masks_are_checked(inpainting, pipelines, init_image, mask, tmp_path, caplog):
    pipe = pipelines["tiny-sd1"]
    with pytest.raises(InvalidRequest, match="needs the image it masks"):
        pipe("x", mask=mask, steps=2, progress=False)
    with pytest.raises(InvalidRequest, match="not latents"):
        pipe("x", init_image=np.zeros((1, 4, H // 8, W // 8), np.float32), mask=mask, steps=2, progress=False)
    with pytest.raises(InvalidRequest, match="does not inpaint"):
        pipe("x", init_image=init_image, mask=mask, hires_scale=2, steps=2, progress=False)
    with pytest.raises(InvalidRequest, match="the mask array is empty"):
        pipe("x", init_image=init_image, mask=np.zeros((0, 5)), steps=2, progress=False)
    with pytest.raises(InvalidRequest, match="2 generators for 1 images"):
        pipe("x", init_image=init_image, mask=mask, generator=[torch.Generator(), torch.Generator()], steps=2,
             progress=False)
    with pytest.raises(InvalidRequest, match="mask must be a path"):
        pipe("x", init_image=init_image, mask=[1, 0], steps=2, progress=False)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidRequest, match="cannot read the mask"):
        pipe("x", init_image=init_image, mask=tmp_path / "broken.png", steps=2, progress=False)
    with pytest.raises(InvalidRequest, match="mask_image and mask name the same setting"):
        pipe("x", init_image=init_image, mask=mask, mask_image=mask, steps=2, progress=False)
    for kw, message in [(dict(mask_crop=8), "give the mask too"),
                        (dict(mask=mask, mask_crop=-1), "0 to 100000"),
                        (dict(mask=mask, mask_crop=8), "the mask is 64x48 and the image 128x96"),
                        (dict(mask=np.zeros((H, W), np.uint8), mask_crop=8), "all black"),
                        (dict(mask=np.ones((H, W), np.uint8), mask_crop=8, output_type="latent"), "latents cannot")]:
        with pytest.raises(InvalidRequest, match=message):
            pipe("x", init_image=init_image, steps=2, progress=False, **kw)
    with caplog.at_level("WARNING"):  # without mask_crop an all-black mask draws (as diffusers'), said
        pipe("x", init_image=init_image, mask=np.zeros((H, W), np.uint8), steps=1, progress=False)
    assert "the mask is all black (white marks what to redraw): nothing is redrawn" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # an inpainting model draws it all again, from the whole image
        inpainting[1]("x", init_image=init_image, mask=np.zeros((H, W), np.uint8), steps=1, progress=False)
    assert "the mask is all black (white marks what to redraw): the inpainting model draws the image again" \
        in caplog.text
    assert inpainting[1].manifest.model.inpainting and not pipe.manifest.model.inpainting
    assert pipe.manifest.model.masks and "vae_encoder" in inpainting[1].manifest.files


def test_engines_from_before_masks_draw_as_before_and_refuse_masks(model_dirs, tmp_path, monkeypatch, init_image,
                                                                   mask):
    """A U-Net step without the mask inputs and state2 (engines of earlier releases) draws what a
    new one draws unmasked (mask 1 leaves each step's latents as they are, and state2's column is
    0, bit for bit); a mask, and UniPC (which needs state2), are refused with the re-export."""
    config = ExportConfig(min_size=64, max_size=64, img2img=False)
    new = Pipeline.load(build.export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "new", config))
    info = build.model_info
    monkeypatch.setattr(build, "model_info", lambda src: dataclasses.replace(info(src), masks=False, history=False))
    old = Pipeline.load(build.export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "old", config))
    assert [t.name for t in old.manifest.specs()["unet_step"].inputs] == \
        ["latents", "text_embeddings", "coeffs", "state", "noise"]
    assert old.manifest.specs()["unet_step"].tensor("coeffs").shape == (9,)
    for sampler in ("euler_a", "dpmpp_2m_karras", "heun"):
        kw = dict(steps=3, seed=3, sampler=sampler, output_type="latent", progress=False)
        np.testing.assert_array_equal(old("a house", **kw), new("a house", **kw))
    with pytest.raises(InvalidRequest, match="exported before inpainting.*re-export it with ldm-export --force"):
        old("x", init_image=init_image, mask=mask, steps=2, progress=False)
    with pytest.raises(InvalidRequest, match="the unipc sampler needs an engine whose U-Net step keeps two"):
        old("x", sampler="unipc", steps=5, progress=False)  # (3 steps need no state2: they run)


def test_ldm_run_inpaints(inpainting, init_image, mask, tmp_path, capsys):
    init_image.save(tmp_path / "photo.png")
    mask.save(tmp_path / "mask.png")
    engine = str(inpainting[1].engine_dir)
    code = run_cli.main(["a cat", "--engine", engine, "--init-image", str(tmp_path / "photo.png"), "--mask",
                         str(tmp_path / "mask.png"), "--steps", "3", "--seed", "2", "--out", str(tmp_path / "o.png"),
                         "--quiet"])
    assert code == 0
    want = inpainting[1]("a cat", init_image=init_image, mask=mask, steps=3, seed=2, progress=False)[0]
    with Image.open(tmp_path / "o.png") as got:
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert "Denoising strength: 1.0" in got.info["parameters"]
    code = run_cli.main(["a cat", "--engine", engine, "--mask", str(tmp_path / "mask.png"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--init-image" in err and "Traceback" not in err
    code = run_cli.main(["a cat", "--engine", engine, "--init-image", str(tmp_path / "photo.png"), "--mask-crop", "32",
                         "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "give --mask" in err and "Traceback" not in err
    code = run_cli.main(["a cat", "--engine", engine, "--init-image", str(tmp_path / "photo.png"), "--mask-blur", "4",
                         "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--mask-blur blurs a mask: give --mask" in err and "Traceback" not in err
    big = mask.resize((W, H))
    big.save(tmp_path / "big-mask.png")
    code = run_cli.main(["a cat", "--engine", engine, "--init-image", str(tmp_path / "photo.png"), "--mask",
                         str(tmp_path / "big-mask.png"), "--mask-crop", "16", "--width", "64", "--height", "64",
                         "--steps", "3", "--seed", "2", "--out", str(tmp_path / "c.png"), "--quiet"])
    assert code == 0
    want = inpainting[1]("a cat", init_image=init_image, mask=big, mask_crop=16, width=64, height=64, steps=3, seed=2,
                         progress=False)[0]
    with Image.open(tmp_path / "c.png") as got:
        assert got.size == (W, H) and np.array_equal(np.asarray(got), np.asarray(want))


def test_crop_box_and_resizes_are_diffusers():
    """The pure parts of mask_crop against diffusers' VaeImageProcessor on random masks: boxes
    at the edges (shifted back in), every aspect, pads past the image; the fill and crop resizes."""
    from diffusers.image_processor import VaeImageProcessor

    from ldm_deploy.engine import mask_crop

    rng = np.random.default_rng(0)
    processor = VaeImageProcessor()
    for _ in range(300):
        h, w = rng.integers(8, 80, size=2)
        m = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] = rng.integers(1, 256)
        mask = Image.fromarray(m)
        width, height = (int(v) * 8 for v in rng.integers(4, 64, size=2))
        pad = int(rng.choice([0, 3, 32, 200]))
        assert mask_crop.crop_region(mask, width, height, pad) == \
            VaeImageProcessor.get_crop_region(mask, width, height, pad=pad), (h, w, y0, x0, width, height, pad)
    image = Image.fromarray(rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))
    for width, height in ((64, 64), (128, 32), (24, 96), (61, 37)):
        for ours, theirs in ((mask_crop.fill_resize, processor._resize_and_fill),
                             (mask_crop.crop_resize, processor._resize_and_crop)):
            assert np.array_equal(np.asarray(ours(image, width, height)), np.asarray(theirs(image, width, height)))


def test_masks_are_prepared_as_diffusers_mask_processor_prepares_them():
    """Colour and greyscale images (resized, then made grey, then cut at 0.5) and arrays (cut, resized
    by nearest neighbour), each at another size than drawn, against VaeImageProcessor's preprocess."""
    from diffusers.image_processor import VaeImageProcessor

    from ldm_deploy.engine import images

    processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    rng = np.random.default_rng(1)
    colour = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    grey = colour.convert("L")
    values = rng.random((37, 53)).astype(np.float32)
    for given in (colour, grey, values):
        want = processor.preprocess(given, height=96, width=128).numpy()
        got = images.mask_to_model_input(images.as_mask(given), 128, 96)
        np.testing.assert_array_equal(got, want)


def test_fill_paints_the_hole_with_the_colours_around_it():
    from ldm_deploy.engine.inpaint import fill

    image = Image.new("RGB", (128, 64), (200, 0, 0))
    image.paste((0, 0, 200), (64, 0, 128, 64))  # red left half, blue right half
    image.paste((0, 255, 0), (40, 16, 88, 48))  # a green thing, to be removed
    hole = Image.new("L", image.size, 0)
    hole.paste(255, (40, 16, 88, 48))
    filled = fill(image, hole, 128, 64)
    before, after = np.asarray(image, int), np.asarray(filled, int)
    outside = np.asarray(hole) == 0
    assert np.array_equal(before[outside], after[outside])  # kept as it was
    assert after[16:48, 40:88, 1].max() < 10  # no green left
    left, right = after[32, 44], after[32, 84]  # near each side of the hole: that side's colour
    assert left[0] > 150 and left[2] < 50 and right[2] > 150 and right[0] < 50
    assert fill(image, hole, 64, 32).size == (64, 32)  # at the size drawn


def test_masked_content_fill(pipelines, init_image, mask):
    """AUTOMATIC1111's masked content "fill": the image filled where the (blurred) mask is, at the
    size drawn, then inpainted as any image."""
    from ldm_deploy.engine.inpaint import blur, fill

    pipe = pipelines["tiny-sd1"]
    kw = dict(steps=3, seed=2, sampler="euler", output_type="np", progress=False)
    got = pipe("x", init_image=init_image, mask=mask, mask_blur=4, masked_content="fill", **kw)
    blurred = blur(mask, 4)
    want = pipe("x", init_image=fill(init_image, blurred, W, H), mask=blurred, **kw)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, pipe("x", init_image=init_image, mask=mask, mask_blur=4, **kw))
    with pytest.raises(InvalidRequest, match="give the mask too"):
        pipe("x", init_image=init_image, masked_content="fill", **kw)
    with pytest.raises(InvalidRequest, match="masked_content must be one of"):
        pipe("x", init_image=init_image, mask=mask, masked_content="latent fluff", **kw)
    assert run_cli.main(["x", "--init-image", "a.png", "--masked-content", "fill"]) == 2


# Samplers without step noise: diffusers given the masked image's latents draws no sample of them,
# where ours draws it (and a text-to-image model drops it), so later draws would part.
@pytest.mark.parametrize("name,sampler", [("tiny-sd1", "euler"), ("tiny-sd1", "unipc"), ("inpainting", "dpmpp_2m")])
@pytest.mark.parametrize("content", ["latent noise", "latent nothing"])
def test_latent_fills_are_diffusers_given_the_filled_image_latents(name, sampler, content, inpainting, pipelines,
                                                                  reference, init_image, mask):
    """AUTOMATIC1111's masked content "latent noise" / "latent nothing": the image's latents, where
    the latent-size mask redraws, replaced by the start noise (its fill and start noise are one
    draw of the seed) or by zeros. The oracle: diffusers' inpainting pipeline given those latents
    as its image, the generator drawing on as ours does (the image's sample, the start noise, an
    inpainting model's masked image's sample)."""
    pipe, strength = inpainting[1] if name == "inpainting" else pipelines[name], 0.6
    ref_pipe = reference[name][0]
    with torch.no_grad():
        pixels = ref_pipe.image_processor.preprocess(init_image, height=H, width=W)
        redraw = ref_pipe.mask_processor.preprocess(mask, height=H, width=W)  # (1, 1, H, W), 0 / 1
        shape = (1, 4, H // 8, W // 8)
        g = torch.Generator().manual_seed(3)
        scale = ref_pipe.vae.config.scaling_factor
        z = ref_pipe.vae.encode(pixels).latent_dist.sample(g) * scale  # draw 1
        start = torch.randn(shape, generator=g)  # draw 2: what diffusers adds, and the fill
        masked = ref_pipe.vae.encode(pixels * (redraw < 0.5)).latent_dist.sample(g) * scale  # draw 3
        small = torch.nn.functional.interpolate(redraw, size=shape[2:])
        fill = start if content == "latent noise" else torch.zeros(shape)
        filled = z * (1 - small) + fill * small
        after_sample = torch.Generator().manual_seed(3)
        torch.randn(shape, generator=after_sample)
        common = dict(prompt="a cat on a bench", mask_image=mask, strength=strength, num_inference_steps=5,
                      guidance_scale=7.5)
        ref = diffusers_run(reference, name, sampler, image=filled, masked_image_latents=masked,
                            generator=after_sample, **common)
    got = ours(pipe, sampler, image=init_image, masked_content=content, seed=3, **common)
    assert_not_saturated(ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    plain = ours(pipe, sampler, image=init_image, seed=3, **common)
    assert np.abs(got - plain).max() > 0.02  # the fill shows


def test_latent_fills_leave_strength_1_alone(pipelines, init_image, mask):
    """At strength 1 the start is pure noise and the kept part is the image's: a fill of the hole
    changes nothing (AUTOMATIC1111's k-diffusion start keeps a trace of it; ours, diffusers', none)."""
    pipe = pipelines["tiny-sd1"]
    kw = dict(prompt="x", init_image=init_image, mask=mask, steps=3, seed=4, strength=1.0)
    plain = ours(pipe, "euler", **kw)
    for content in ("latent noise", "latent nothing"):
        np.testing.assert_allclose(ours(pipe, "euler", masked_content=content, **kw), plain, rtol=0, atol=1e-6)
    with pytest.raises(InvalidRequest, match="latent noise.*give the mask too"):
        pipe("x", init_image=init_image, masked_content="latent noise", steps=1, progress=False)
