"""SDXL base models against diffusers' StableDiffusionXL(Img2Img, Inpaint)Pipeline, given the same
noise: txt2img with every sampler, with and without a negative prompt (none at all: zero
embeddings, diffusers' force_zeros_for_empty_prompt), clip skip, batches, img2img and inpainting,
to 2e-3 max abs per pixel on [0, 1]. The tiny model's two text encoders differ in width (32, 48)
and its pooled projection (40) in both, so that a mixed-up concatenation cannot pass."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from PIL import Image

from conftest import TEST_CONFIG, assert_not_saturated, diffusers_schedulers, generator_samplers, torchs_float32_rounding
from ldm_deploy import Pipeline
from ldm_deploy.cli import export as export_cli
from ldm_deploy.cli import run as run_cli
from ldm_deploy.engine.infotext import read_png
from ldm_deploy.errors import ModelSourceError, UserError
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.random_model import make_random_controlnet, make_random_model

TOL = 2e-3
SCHEDULERS = diffusers_schedulers()
W, H = 128, 96  # not square: the six sizes' order (height first) matters
SCHEDULER_CONFIG = {}  # the model's, as the xl fixture loads it


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(model folder, our pipeline, diffusers' txt2img pipeline) of a tiny SDXL model."""
    root = tmp_path_factory.mktemp("sdxl")
    folder = make_random_model(root / "model", "tiny-sdxl", seed=1)
    engine = export_engine(str(folder), root / "engine", TEST_CONFIG)
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    SCHEDULER_CONFIG.update(ref.scheduler.config)
    return folder, Pipeline.load(engine), ref


def diffusers_run(pipe, sampler, **kwargs) -> np.ndarray:
    cls, options = SCHEDULERS[sampler]
    pipe.scheduler = cls.from_config(SCHEDULER_CONFIG, **options)  # not the last one's: its options stay
    return pipe(output_type="np", **kwargs).images


def ours(pipe, sampler, **kwargs) -> np.ndarray:
    return pipe(sampler=sampler, output_type="np", progress=False, **kwargs)


def noise(seed: int, batch: int = 1, size=(W, H)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, size[1] // 8, size[0] // 8)).astype(np.float32)


@pytest.mark.parametrize("sampler", generator_samplers())
def test_txt2img_matches_diffusers(sampler, xl):
    _, pipe, ref = xl
    lat = noise(1)
    neg = "blurry, dark" if sampler in ("euler", "dpmpp_2m_karras") else None
    expected = diffusers_run(ref, sampler, prompt="a lighthouse on a cliff at dusk", negative_prompt=neg,
                             num_inference_steps=6, guidance_scale=6.0, width=W, height=H,
                             latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(5))
    got = ours(pipe, sampler, prompt="a lighthouse on a cliff at dusk", negative_prompt=neg, steps=6, guidance=6.0,
               width=W, height=H, latents=lat, generator=torch.Generator().manual_seed(5))
    assert_not_saturated(expected)
    assert np.abs(got - expected).max() < TOL


def test_align_your_steps_matches_diffusers(xl):
    """SDXL's own Align Your Steps walk, as diffusers draws it: pipe(..., timesteps=AysSchedules[
    "StableDiffusionXLTimesteps"]) (the SD 1.5 one's timesteps differ from the second on)."""
    from diffusers.schedulers import AysSchedules

    _, pipe, ref = xl
    assert pipe.manifest.model.noise_schedule.family == "sdxl"  # (what picks SDXL's walk: the manifest's family)
    lat = noise(2)
    kw = dict(prompt="a fox in the snow", width=W, height=H, generator=torch.Generator().manual_seed(4))
    expected = diffusers_run(ref, "dpmpp_2m_sde_ays", timesteps=AysSchedules["StableDiffusionXLTimesteps"],
                             guidance_scale=6.0, latents=torch.from_numpy(lat), **kw)
    kw["generator"] = torch.Generator().manual_seed(4)
    got = ours(pipe, "dpmpp_2m_sde_ays", steps=10, guidance=6.0, latents=lat, **kw)
    assert_not_saturated(expected)
    assert np.abs(got - expected).max() < TOL


def test_dpmpp_sde_matches_diffusers(xl):
    """DPM++ SDE's Brownian noise on SDXL (its tree seeded by the image's seed, diffusers'
    noise_sampler_seed), with the micro-conditioning and both encoders of the rest."""
    _, pipe, ref = xl
    assert pipe.manifest.model.noise_schedule.family == "sdxl"  # (what picks SDXL's walk: the manifest's family)
    lat = noise(2)
    cls, options = SCHEDULERS["dpmpp_sde_karras"]
    ref.scheduler = cls.from_config(SCHEDULER_CONFIG, noise_sampler_seed=9, **options)
    with torchs_float32_rounding():
        expected = ref(prompt="a lighthouse", num_inference_steps=5, guidance_scale=6.0, width=W, height=H,
                       latents=torch.from_numpy(lat), output_type="np").images
        got = ours(pipe, "dpmpp_sde_karras", prompt="a lighthouse", steps=5, guidance=6.0, width=W, height=H,
                   latents=lat, seed=9)
    assert_not_saturated(expected)
    assert np.abs(got - expected).max() < TOL


def test_no_negative_prompt_is_zeros_and_empty_one_is_encoded(xl):
    """SDXL base draws "no negative prompt" from zero embeddings, and "" from the encoded empty
    prompt, as diffusers does; the two images differ."""
    _, pipe, ref = xl
    assert pipe.manifest.model.noise_schedule.family == "sdxl"  # (what picks SDXL's walk: the manifest's family)
    lat = noise(2)
    got, expected = {}, {}
    for neg in (None, ""):
        got[neg] = ours(pipe, "euler", prompt="a red fox", negative_prompt=neg, steps=5, guidance=7.5, width=W,
                        height=H, latents=lat)
        expected[neg] = diffusers_run(ref, "euler", prompt="a red fox", negative_prompt=neg, num_inference_steps=5,
                                      guidance_scale=7.5, width=W, height=H, latents=torch.from_numpy(lat))
        assert np.abs(got[neg] - expected[neg]).max() < TOL
    assert np.abs(got[None] - got[""]).max() > 0.05


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_batches_clip_skip_and_guidance_off_match_diffusers(guidance, xl):
    """Two prompts, two images each (past the engine's batch of 2: in chunks), clip skip 1 (the
    third layer from the end in SDXL), and guidance off (the conditional half only)."""
    _, pipe, ref = xl
    prompts = ["a cat", "a very long wooden boat on a calm lake"]
    lat = noise(3, batch=4)
    expected = diffusers_run(ref, "dpmpp_2m", prompt=prompts, num_images_per_prompt=2, num_inference_steps=5,
                             guidance_scale=guidance, clip_skip=1, width=W, height=H, latents=torch.from_numpy(lat))
    got = ours(pipe, "dpmpp_2m", prompt=prompts, num_images=2, steps=5, guidance=guidance, clip_skip=1, width=W,
               height=H, latents=lat)
    assert np.abs(got - expected).max() < TOL
    plain = ours(pipe, "dpmpp_2m", prompt=prompts, num_images=2, steps=5, guidance=guidance, width=W, height=H,
                 latents=lat)
    assert np.abs(plain - got).max() > 0.01  # clip skip changed something


@pytest.fixture(scope="module")
def init_image():
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x / W, y / H, 0.5 + 0.5 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras", "euler_a"])
def test_img2img_matches_diffusers(sampler, xl, init_image):
    folder, pipe, ref = xl
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(ref)
    expected = diffusers_run(img2img, sampler, prompt="an oil painting", image=init_image, strength=0.6,
                             num_inference_steps=8, guidance_scale=7.5, generator=torch.Generator().manual_seed(9))
    got = ours(pipe, sampler, prompt="an oil painting", init_image=init_image, strength=0.6, steps=8,
               generator=torch.Generator().manual_seed(9))
    assert_not_saturated(expected)
    assert np.abs(got - expected).max() < TOL


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_with_the_base_model_matches_diffusers(strength, xl, init_image):
    """SDXL base (4 channels) inpaints as SD's text-to-image models do: the kept part put back at
    every step, as StableDiffusionXLInpaintPipeline does (its default strength, 0.9999, is passed)."""
    _, pipe, ref = xl
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(ref)
    mask = np.zeros((H, W), np.float32)
    mask[20:70, 30:100] = 1
    mask_image = Image.fromarray((mask * 255).astype(np.uint8))
    expected = diffusers_run(inpaint, "euler", prompt="a red sofa", image=init_image, mask_image=mask_image,
                             strength=strength, num_inference_steps=6, guidance_scale=7.5, width=W, height=H,
                             generator=torch.Generator().manual_seed(4))
    got = ours(pipe, "euler", prompt="a red sofa", init_image=init_image, mask=mask_image, strength=strength,
               steps=6, guidance=7.5, generator=torch.Generator().manual_seed(4))
    assert np.abs(got - expected).max() < TOL


@pytest.fixture(scope="module")
def xl_control(xl, tmp_path_factory):
    """(ControlNet folder, our pipeline of the tiny SDXL with it)."""
    root = tmp_path_factory.mktemp("sdxl-control")
    net = make_random_controlnet(root / "net", "tiny-sdxl", seed=2)
    engine = export_engine(str(xl[0]), root / "engine", dataclasses.replace(TEST_CONFIG, controlnets=(str(net),)))
    return net, Pipeline.load(engine)


@pytest.mark.parametrize("sampler,scale,end", [("euler", 0.7, 1.0), ("dpmpp_2m_karras", 1.0, 0.6)])
def test_controlnet_matches_diffusers(sampler, scale, end, xl, xl_control):
    """An SDXL ControlNet in the U-Net step, with SDXL's added conditioning, as diffusers'
    StableDiffusionXLControlNetPipeline runs it; the control image sets the size."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    net_dir, pipe = xl_control
    ref = StableDiffusionXLControlNetPipeline.from_pipe(xl[2], controlnet=ControlNetModel.from_pretrained(net_dir))
    y, x = np.mgrid[0:H, 0:W]
    control = Image.fromarray(((np.sin(x / 5.0) * np.cos(y / 7.0) > 0)[..., None] * [255, 255, 255]).astype(np.uint8))
    lat = noise(6)
    expected = diffusers_run(ref, sampler, prompt="a glass house", image=control, controlnet_conditioning_scale=scale,
                             control_guidance_end=end, num_inference_steps=6, guidance_scale=7.5,
                             latents=torch.from_numpy(lat))
    got = ours(pipe, sampler, prompt="a glass house", control_image=control, control_scale=scale, control_end=end,
               steps=6, guidance=7.5, latents=lat)
    assert_not_saturated(expected)
    assert np.abs(got - expected).max() < TOL
    off = ours(pipe, sampler, prompt="a glass house", control_image=control, control_scale=0.0, steps=6,
               guidance=7.5, latents=lat)
    assert np.abs(off - got).max() > 0.01  # the ControlNet acts


def test_manifest_and_cli_run(xl, tmp_path):
    """The engine says what it holds; ldm-export and ldm-run take an SDXL folder, and the PNG's
    parameters (no negative prompt) draw the same image again with --from-png."""
    folder, pipe, _ = xl
    m = pipe.manifest.model
    assert (m.family, m.text_width, m.pooled_width, m.zero_negative) == ("sdxl", 80, 40, True)
    assert {t.name for t in pipe.specs["unet_step"].inputs} >= {"pooled_embeddings", "time_ids"}
    out = tmp_path / "fox.png"
    engine = tmp_path / "engine"
    assert export_cli.main(["--model", str(folder), "--out", str(engine), "--min-size", "64", "--max-size", "256"]) \
        == 0
    code = run_cli.main(["--engine", str(engine), "a fox", "--steps", "3", "--width", "64", "--height", "64",
                         "--seed", "3", "--out", str(out)])
    assert code == 0 and out.is_file()
    params = read_png(out)
    assert "Seed: 3" in params and "Negative prompt" not in params
    drawn = np.asarray(Image.open(out))
    api = Pipeline.load(engine)("a fox", steps=3, width=64, height=64, seed=3, progress=False)[0]
    assert np.array_equal(np.asarray(api), drawn)  # no --negative-prompt: zeros, as the API's None
    again, empty = tmp_path / "again.png", tmp_path / "empty.png"
    assert run_cli.main(["--engine", str(engine), "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), drawn)
    assert run_cli.main(["--engine", str(engine), "a fox", "--steps", "3", "--width", "64", "--height", "64",
                         "--seed", "3", "--negative-prompt", "", "--out", str(empty)]) == 0
    assert np.abs(np.asarray(Image.open(empty)).astype(int) - drawn).max() > 5  # "" is encoded: another image
    assert "Empty negative prompt: encoded" in read_png(empty)  # which the text alone could not tell
    assert run_cli.main(["--engine", str(engine), "--from-png", str(empty), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(empty)))


def test_from_png_leaves_out_automatic1111s_clip_skip_for_sdxl(xl, tmp_path, capsys):
    """AUTOMATIC1111 writes its global "Clip skip: 2" into SDXL images it did not apply it to."""
    from PIL.PngImagePlugin import PngInfo

    _, pipe, _ = xl
    info = PngInfo()
    info.add_text("parameters", "a fox\nSteps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 3, "
                                "Size: 64x64, Model hash: 0123456789, Clip skip: 2, Version: v1.10.1")
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    out = tmp_path / "out.png"
    assert run_cli.main(["--engine", str(pipe.engine_dir), "--from-png", str(tmp_path / "a1111.png"),
                         "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Clip skip: 2" in err and "left out" in err
    plain = pipe("a fox", steps=3, guidance=7, width=64, height=64, seed=3, sampler="euler", progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(plain))


def test_what_sdxl_engines_do_not_take_is_refused_by_name(xl, model_dirs, tmp_path):
    folder = xl[0]
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ModelSourceError, match="made for SD 1.x / 2.x.*SDXL embeddings hold clip_l and clip_g"):
        export_engine(str(folder), tmp_path / "never", ExportConfig(embeddings=((str(tmp_path / "sd.safetensors"),
                                                                                  None),)))
    sd_net = make_random_controlnet(tmp_path / "sd-net", "tiny-sd1")
    with pytest.raises(ModelSourceError, match="made for another model"):  # an SD ControlNet on SDXL
        export_engine(str(folder), tmp_path / "never", ExportConfig(controlnets=(str(sd_net),)))
    assert not (tmp_path / "never").exists()


def test_broken_sdxl_folders_are_refused(xl, tmp_path):
    folder = xl[0]
    refiner = tmp_path / "refiner"
    shutil.copytree(folder, refiner)
    shutil.rmtree(refiner / "text_encoder")
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(ModelSourceError, match="not the pooled text .40. and four sizes and an aesthetic score"):
        export_engine(str(refiner), tmp_path / "e1", ExportConfig())  # a refiner's layout, a base's U-Net
    lacking = tmp_path / "lacking"
    shutil.copytree(folder, lacking)
    shutil.rmtree(lacking / "tokenizer_2")
    with pytest.raises(ModelSourceError, match="lacks the subfolder.*tokenizer_2.*XL"):
        export_engine(str(lacking), tmp_path / "e2", ExportConfig())
    alone = tmp_path / "alone"  # an SDXL U-Net in an SD folder: no second text encoder
    shutil.copytree(folder, alone)
    shutil.rmtree(alone / "text_encoder_2")
    (alone / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if "_2" not in k}))
    with pytest.raises(ModelSourceError, match="looks like SDXL.*no second"):
        export_engine(str(alone), tmp_path / "e3", ExportConfig())
    for name, damage, message in (
            ("noconfig", lambda d: (d / "text_encoder_2" / "config.json").unlink(), "text_encoder_2 has no config.json"),
            ("notok", lambda d: [f.unlink() for f in (d / "tokenizer_2").iterdir()], "tokenizer_2 holds no tokenizer"),
            ("fp16", lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").rename(
                d / "unet" / "diffusion_pytorch_model.fp16.safetensors"), "only variant weights.*variant=")):
        broken = tmp_path / name
        shutil.copytree(folder, broken)
        damage(broken)
        with pytest.raises(ModelSourceError, match=message):
            export_engine(str(broken), tmp_path / f"e-{name}", ExportConfig())
    with pytest.raises(UserError, match="--min-size 1104 is larger than the default --max-size for this model, 1024"):
        export_engine(str(folder), tmp_path / "e-size", ExportConfig(min_size=1104))  # (tiny: drawn at 256)
    edm = tmp_path / "edm"  # Playground v2.5: SDXL's layout, EDM's schedule and latent statistics
    shutil.copytree(folder, edm)
    scheduler = json.loads((edm / "scheduler" / "scheduler_config.json").read_text())
    (edm / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**scheduler, "_class_name": "EDMDPMSolverMultistepScheduler"}))
    with pytest.raises(ModelSourceError, match="an EDM model"):
        export_engine(str(edm), tmp_path / "e4", ExportConfig())
    vae = json.loads((edm / "vae" / "config.json").read_text())
    (edm / "vae" / "config.json").write_text(json.dumps({**vae, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}))
    with pytest.raises(ModelSourceError, match="normalises its latents"):
        export_engine(str(edm), tmp_path / "e5", ExportConfig())


def test_long_prompts_emphasis_editing_and_hires_run(xl):
    """What has no diffusers oracle for SDXL runs, and emphasis of 1 changes nothing at all."""
    _, pipe, _ = xl
    kwargs = dict(steps=3, width=W, height=H, seed=3, output_type="np", progress=False)
    plain = pipe("a cat on a mat", **kwargs)
    assert np.array_equal(pipe("a (cat:1.0) on a mat", prompt_weighting=True, **kwargs), plain)
    assert np.abs(pipe("a (cat:1.4) on a mat", prompt_weighting=True, **kwargs) - plain).max() > 1e-3
    long = pipe(", ".join(["a red cat"] * 40), **kwargs)  # two chunks
    edited = pipe("[a cat:a dog:0.5] on a mat", prompt_weighting=True, **kwargs)
    hires = pipe("a cat on a mat", hires_scale=2, **kwargs)
    assert long.shape == edited.shape == (1, H, W, 3) and hires.shape == (1, 2 * H, 2 * W, 3)
    for out in (long, edited, hires):
        assert np.isfinite(out).all() and out.std() > 0.01


def test_torch_backend_draws_what_onnx_runtime_draws(xl, tmp_path):
    """The same components through torch.export (exported programs: no AOTInductor compile here)."""
    folder, pipe, _ = xl
    engine = export_engine(str(folder), tmp_path / "torch", ExportConfig(
        backend="torch", aoti=False, min_size=64, max_size=256, opt_size=128, max_batch=2))
    kwargs = dict(prompt=["a cat", "a boat"], steps=4, width=W, height=H, seed=3, output_type="np", progress=False)
    assert np.abs(Pipeline.load(engine)(**kwargs) - pipe(**kwargs)).max() < 1e-4


def test_bench_measures_an_sdxl_engine_against_diffusers(xl, tmp_path, capsys):
    from ldm_deploy.cli import bench as bench_cli

    folder, pipe, _ = xl
    out = tmp_path / "bench.json"
    code = bench_cli.main(["--engine", str(pipe.engine_dir), "--model", str(folder), "--width", "64", "--height", "64",
                           "--steps", "2", "--warmup-steps", "1", "--repeats", "1", "--threads", "1",
                           "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert set(results["contenders"]) == {"ours", "diffusers"}
    assert results["contenders"]["diffusers"]["stages"]["unet_step"]["median"] > 0
    assert results["unet_flops_per_step"] > 0


def test_sdxl_controlnet_single_file_in_diffusers_names(xl, xl_control, tmp_path):
    """SDXL ControlNets are mostly shared as one file under diffusers' names: built for the model's
    U-Net (its added conditioning too) and given every weight."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from ldm_deploy.export import controlnet
    from ldm_deploy.export.source import load_source

    net_dir, _ = xl_control
    ref = ControlNetModel.from_pretrained(net_dir)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "xl-canny.safetensors"))
    src = load_source(str(xl[0]))
    net, files = controlnet.load_one(tmp_path / "xl-canny.safetensors", False, src.unet)
    controlnet.check_fits(net, src.unet, tmp_path / "xl-canny.safetensors", src.vae)
    assert net.config.addition_embed_type == "text_time" and files == [tmp_path / "xl-canny.safetensors"]
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    # under the original release's names too (its added-conditioning MLP as label_emb)
    from ldm_checkpoint import controlnet_state

    save_file(controlnet_state(ref, "control_model."), str(tmp_path / "xl-original.safetensors"))
    assert any("label_emb.0.0" in k for k in controlnet_state(ref))
    net, _ = controlnet.load_one(tmp_path / "xl-original.safetensors", False, src.unet)
    got = net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sdxl_inpainting_model_matches_diffusers(strength, tmp_path_factory, init_image):
    """An SDXL inpainting U-Net (9 channels in: latents, mask, masked image latents), as
    StableDiffusionXLInpaintPipeline runs it (diffusers/stable-diffusion-xl-1.0-inpainting-0.1)."""
    root = tmp_path_factory.mktemp("sdxl-inpainting")
    folder = make_random_model(root / "model", "tiny-sdxl", seed=4, inpainting=True)
    pipe = Pipeline.load(export_engine(str(folder), root / "engine", TEST_CONFIG))
    assert pipe.manifest.model.inpainting and "vae_encoder" in pipe.manifest.files
    ref = StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    SCHEDULER_CONFIG.update(ref.scheduler.config)
    mask = np.zeros((H, W), np.uint8)
    mask[16:80, 24:90] = 255
    kwargs = dict(prompt="a red sofa", image=init_image, mask_image=Image.fromarray(mask), strength=strength,
                  width=W, height=H)
    expected = diffusers_run(ref, "euler_a", num_inference_steps=6, guidance_scale=7.5,
                             generator=torch.Generator().manual_seed(8), **kwargs)
    got = ours(pipe, "euler_a", steps=6, guidance=7.5, generator=torch.Generator().manual_seed(8), **kwargs)
    assert_not_saturated(expected)
    assert np.abs(got - expected).max() < TOL


def test_sdxl_textual_inversion_matches_diffusers(xl, tmp_path):
    """An SDXL embedding (clip_l and clip_g vectors, two of each), loaded into both text encoders
    as diffusers' load_textual_inversion loads it into each; the word in a prompt takes its vectors."""
    from safetensors.torch import save_file

    folder, _, ref = xl
    g = torch.Generator().manual_seed(11)
    clip_l, clip_g = torch.randn(2, 32, generator=g), torch.randn(2, 48, generator=g)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "glowy.safetensors"))
    engine = export_engine(str(folder), tmp_path / "engine", dataclasses.replace(
        TEST_CONFIG, embeddings=((str(tmp_path / "glowy.safetensors"), None),)))
    pipe = Pipeline.load(engine)
    want = StableDiffusionXLPipeline.from_pipe(ref)
    want.load_textual_inversion(clip_l, token="glowy", text_encoder=want.text_encoder, tokenizer=want.tokenizer)
    want.load_textual_inversion(clip_g, token="glowy", text_encoder=want.text_encoder_2, tokenizer=want.tokenizer_2)
    lat = noise(12)
    got = {}
    for prompt in ("a glowy lamp in a room", "a lamp in a room"):
        expected = diffusers_run(want, "euler", prompt=prompt, num_inference_steps=4, guidance_scale=7.5, width=W,
                                 height=H, latents=torch.from_numpy(lat))
        got[prompt] = ours(pipe, "euler", prompt=prompt, steps=4, guidance=7.5, width=W, height=H, latents=lat)
        assert np.abs(got[prompt] - expected).max() < TOL, prompt
    without = ours(xl[1], "euler", prompt="a glowy lamp in a room", steps=4, guidance=7.5, width=W, height=H,
                   latents=lat)  # the engine without it: "glowy" is plain text there
    assert np.abs(without - got["a glowy lamp in a room"]).max() > 0.01


def test_served_sdxl(xl):
    """ldm-serve on SDXL: AUTOMATIC1111's empty negative prompt is its "none", zero embeddings, as
    its web UI draws SDXL; its clip skip setting is not applied to SDXL, as there; waiting requests
    with and without a negative prompt are batched apart and keep their images."""
    from serve_http import call, pixels, running, unb64

    from ldm_deploy.serve.worker import Job, Worker

    pipe = xl[1]
    body = {"prompt": "a fox", "negative_prompt": "", "steps": 3, "seed": 4, "width": W, "height": H,
            "override_settings": {"CLIP_stop_at_last_layers": 2}}
    with running(pipe) as server:
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
    assert status == 200, answer
    want = pipe("a fox", negative_prompt=None, steps=3, seed=4, width=W, height=H, guidance=7.0, sampler="euler",
                prompt_weighting=True, progress=False)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))

    worker = Worker(pipe)  # not started: the jobs wait together
    common = {"steps": 3, "guidance": 7.0, "sampler": "euler", "width": W, "height": H, "num_images": 1,
              "prompt_weighting": True, "clip_skip": 0}
    jobs = [worker.submit(Job({**common, "prompt": p, "negative_prompt": n, "seed": s}))
            for p, n, s in (("a fox", None, 1), ("a cat", "blurry", 2), ("a dog", None, 3))]
    worker.start()
    for job in jobs:
        assert job.done.wait(120) and job.error is None, job.error
    worker.stop()
    assert worker.calls == 2  # the two without a negative prompt together
    for job in jobs:
        got, expected = pixels(job.images), pixels(pipe(**job.options, progress=False))
        assert np.abs(got - expected).max() <= 1 and np.mean(got != expected) < 0.01
