"""AUTOMATIC1111's Tiling (ldm-export --tiling): the U-Net's and VAE's convolutions pad circularly.

The oracle is diffusers' pipeline with every Conv2d of its U-Net and VAE set to padding_mode
"circular" (the usual way to make diffusers draw seamless textures); and the property itself:
with circular padding everywhere the pipeline commutes with rolling the latents round the torus,
so rolled start noise gives the image rolled, which zero padding does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from conftest import assert_not_saturated, diffusers_schedulers
from ldm_deploy import Pipeline
from ldm_deploy.cli import export as export_cli
from ldm_deploy.cli import run as run_cli
from ldm_deploy.engine import infotext
from ldm_deploy.export.tiling import make_seamless

TOL = 2e-3
W, H = 128, 96


@pytest.fixture(scope="module")
def tiled(model_dirs, tmp_path_factory):
    """A tiny SD 1.x engine exported with --tiling, through ldm-export."""
    out = tmp_path_factory.mktemp("tiling") / "engine"
    assert export_cli.main(["--model", str(model_dirs["tiny-sd1"]), "--out", str(out), "--tiling", "--min-size", "64",
                            "--max-size", "256", "--max-batch", "2"]) == 0
    return Pipeline.load(out)


@pytest.fixture(scope="module")
def reference(model_dirs):
    """diffusers' txt2img and img2img pipelines, every U-Net and VAE convolution padding circularly."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    for module in (pipe.unet, pipe.vae):
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.padding_mode = "circular"
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    return pipe, img2img, dict(pipe.scheduler.config)


def scheduled(pipe, config, sampler):
    cls, options = diffusers_schedulers()[sampler]
    pipe.scheduler = cls.from_config(config, **options)
    return pipe


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_txt2img_matches_diffusers_with_circular_convolutions(sampler, tiled, reference):
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(9)
    want = scheduled(reference[0], reference[2], sampler)(
        "a brick wall", num_inference_steps=5, guidance_scale=7.5, height=H, width=W, latents=latents.clone(),
        generator=generator, output_type="np").images
    got = tiled("a brick wall", steps=5, guidance=7.5, width=W, height=H, latents=latents.numpy(),
                generator=torch.Generator().manual_seed(9), sampler=sampler, output_type="np", progress=False)
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_img2img_matches_diffusers_with_circular_convolutions(tiled, reference):
    y, x = np.mgrid[0:H, 0:W]
    image = Image.fromarray((np.stack([x / W, y / H, 0.5 + 0.5 * np.sin(x / 9.0)], -1) * 255).astype(np.uint8))
    want = scheduled(reference[1], reference[2], "dpmpp_2m")(
        "moss", image=image, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(4), output_type="np").images
    got = tiled("moss", init_image=image, strength=0.6, steps=5, guidance=7.5, sampler="dpmpp_2m",
                generator=torch.Generator().manual_seed(4), output_type="np", progress=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_rolled_noise_draws_the_image_rolled(tiled, pipelines):
    """Round the torus: start noise rolled by (2, 4) latents gives the image rolled by the VAE's
    factor times that, to float rounding; the engine with zero padding does not."""
    latents = np.random.default_rng(5).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)
    kw = dict(steps=4, width=W, height=H, sampler="euler", seed=1, output_type="np", progress=False)
    rolled = np.roll(latents, (2, 4), axis=(2, 3))
    scale = tiled.manifest.model.vae_scale
    image = tiled("a pattern", latents=latents, **kw)
    np.testing.assert_allclose(tiled("a pattern", latents=rolled, **kw),
                               np.roll(image, (2 * scale, 4 * scale), axis=(1, 2)), rtol=0, atol=1e-4)
    plain = pipelines["tiny-sd1"]
    assert np.abs(plain("a pattern", latents=rolled, **kw)
                  - np.roll(plain("a pattern", latents=latents, **kw), (2 * scale, 4 * scale), axis=(1, 2))).max() > 0.02


def test_the_engine_records_it_and_pngs_carry_it(tiled, pipelines, tmp_path, capsys):
    assert tiled.manifest.model.tiling and not pipelines["tiny-sd1"].manifest.model.tiling
    [image] = tiled("a", steps=1, width=64, height=64, progress=False)
    assert "Tiling: True" in image.info["parameters"]
    assert "Tiling" not in pipelines["tiny-sd1"]("a", steps=1, width=64, height=64,
                                                 progress=False)[0].info["parameters"]
    fields = infotext.parse(image.info["parameters"])[2]
    assert infotext.settings(fields)[1] == []  # read quietly
    assert infotext.tiling_warning(fields, True) is None
    assert "export one with ldm-export --tiling" in infotext.tiling_warning(fields, False)
    assert "this engine tiles" in infotext.tiling_warning({}, True)
    path = tmp_path / "tiled.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.info["parameters"])
    image.save(path, pnginfo=info)
    assert run_cli.main(["--engine", str(pipelines["tiny-sd1"].engine_dir), "--from-png", str(path), "--out",
                         str(tmp_path / "again.png"), "-q"]) == 0
    assert "this engine does not tile" in capsys.readouterr().err


def test_torch_engines_tile_as_onnx_runtimes(tiled, model_dirs, tmp_path):
    """The torch backend's exported programs carry the circular padding too (no AOTInductor
    compile here: minutes on a CPU)."""
    from ldm_deploy.export.build import export_engine
    from ldm_deploy.export.config import ExportConfig

    engine = export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "torch", ExportConfig(
        backend="torch", min_size=64, max_size=128, opt_size=64, max_batch=2, img2img=False, aoti=False, tiling=True))
    kw = dict(steps=3, seed=2, width=64, height=64, sampler="euler", output_type="np", progress=False)
    torch_pipe = Pipeline.load(engine)
    assert torch_pipe.manifest.model.tiling
    np.testing.assert_allclose(torch_pipe("a cat", **kw), tiled("a cat", **kw), rtol=0, atol=1e-4)


def test_a_refiner_must_tile_as_the_base_does(tiled, pipelines):
    from ldm_deploy.engine import refine
    from ldm_deploy.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="tiles .* and the refiner does not"):
        refine.switch(tiled, pipelines["tiny-sd2"], 0.8, None, None)


def test_from_png_with_a_model_exports_it_tiling(tiled, model_dirs, tmp_path):
    """As AUTOMATIC1111's pasted infotext ticks its Tiling box: --model's cached engine tiles."""
    [image] = tiled("a", steps=1, width=64, height=64, progress=False)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", image.info["parameters"])
    image.save(tmp_path / "tiled.png", pnginfo=info)
    out = tmp_path / "again.png"
    assert run_cli.main(["--model", str(model_dirs["tiny-sd1"]), "--from-png", str(tmp_path / "tiled.png"), "--out",
                         str(out), "--width", "256", "--height", "256", "-q"]) == 0  # the cache's least size
    assert "Tiling: True" in Image.open(out).info["parameters"]


def test_make_seamless_leaves_unpadded_convolutions(model_dirs):
    """Only convolutions that pad change (1x1 ones, and the VAE encoder's downsamplers, which pad
    by hand with zeros as the original model's do, have nothing to wrap)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dirs["tiny-sd1"] / "vae")
    count = make_seamless(vae)
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert count == sum(m.padding_mode == "circular" for m in convs) == sum(any(m.padding) for m in convs) > 0
    assert vae.quant_conv.padding_mode == "zeros"


def test_rng_field():
    """AUTOMATIC1111's "RNG" (its noise source): CPU is ours, read quietly; another is warned about."""
    base = {"Steps": "5", "Sampler": "Euler", "Seed": "1"}
    assert infotext.settings({**base, "RNG": "CPU"})[1] == []
    assert "NV random source" in infotext.settings({**base, "RNG": "NV"})[1][0]
