"""ControlNets inside the U-Net step against diffusers' ControlNet pipelines (txt2img, img2img,
inpainting, several ControlNets), given the same generators, to 2e-3 max abs per pixel."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from conftest import TEST_CONFIG, assert_not_saturated, diffusers_schedulers
from ldm_deploy import Pipeline
from ldm_deploy.cli import export as export_cli
from ldm_deploy.cli import run as run_cli
from ldm_deploy.errors import InvalidRequest, ModelSourceError
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.random_model import make_random_controlnet

TOL = 2e-3
SCHEDULERS = diffusers_schedulers()
W, H = 128, 96


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two random ControlNets for the tiny SD 1.x U-Net."""
    root = tmp_path_factory.mktemp("controlnets")
    return [make_random_controlnet(root / f"net{i}", "tiny-sd1", seed=5 + i) for i in range(2)]


@pytest.fixture(scope="module")
def engines(nets, model_dirs, tmp_path_factory):
    """Pipelines of the tiny SD 1.x model with the first ControlNet, and with both."""
    root = tmp_path_factory.mktemp("controlnet-engines")
    model = str(model_dirs["tiny-sd1"])
    return {n: Pipeline.load(export_engine(model, root / f"n{n}", replace(TEST_CONFIG, controlnets=tuple(
        str(p) for p in nets[:n])))) for n in (1, 2)}


@pytest.fixture(scope="module")
def reference(nets, model_dirs):
    base = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    loaded = [ControlNetModel.from_pretrained(p) for p in nets]
    out = {"one": loaded[0], "both": loaded, "config": dict(base.scheduler.config), "components": base.components}
    return out


def diffusers_run(reference, cls, controlnet, sampler, **kwargs) -> np.ndarray:
    pipe = cls(**{**reference["components"], "controlnet": controlnet})
    pipe.set_progress_bar_config(disable=True)
    scheduler, options = SCHEDULERS[sampler]
    pipe.scheduler = scheduler.from_config(reference["config"], **options)
    out = pipe(**{"output_type": "np", **kwargs}).images
    return out if isinstance(out, np.ndarray) else np.stack([np.asarray(im, np.float32) / 255 for im in out])


def pattern(seed: int) -> Image.Image:
    """A control image: black and white blobs, as edge or scribble maps are."""
    y, x = np.mgrid[0:H, 0:W]
    v = np.sin(x / (4.0 + seed)) * np.cos(y / (6.0 + seed))
    return Image.fromarray(((v > 0) * 255).astype(np.uint8)).convert("RGB")


@pytest.fixture(scope="module")
def init_image():
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x / W, y / H, 0.5 + 0.5 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


@pytest.mark.parametrize("sampler,guidance,scale,start,end", [
    ("ddim", 7.5, 1.0, 0.0, 1.0), ("euler_a", 7.5, 0.7, 0.2, 0.8), ("dpmpp_2m_karras", 1.0, 1.3, 0.0, 0.5),
    ("heun", 7.5, 0.5, 0.3, 1.0),
])
def test_txt2img_with_a_controlnet_matches_diffusers(sampler, guidance, scale, start, end, engines, reference):
    common = dict(prompt="a house by a lake", num_inference_steps=5, guidance_scale=guidance,
                  controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end)
    ref = diffusers_run(reference, StableDiffusionControlNetPipeline, reference["one"], sampler, image=pattern(0),
                        generator=torch.Generator().manual_seed(3), **common)
    got = engines[1](control_image=pattern(0), sampler=sampler, generator=torch.Generator().manual_seed(3),
                     output_type="np", progress=False, **common)
    assert got.shape == ref.shape == (1, H, W, 3)  # the control image's size
    assert_not_saturated(ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_two_controlnets_img2img_and_inpainting_match_diffusers(engines, reference, init_image):
    both = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
                control_guidance_end=[1.0, 0.75])
    common = dict(prompt="a red barn", num_inference_steps=4, num_images_per_prompt=2, **both)
    ref = diffusers_run(reference, StableDiffusionControlNetPipeline, reference["both"], "euler_a",
                        image=[pattern(0), pattern(3)], generator=torch.Generator().manual_seed(8), **common)
    got = engines[2](control_image=[pattern(0), pattern(3)], sampler="euler_a",
                     generator=torch.Generator().manual_seed(8), output_type="np", progress=False, **common)
    assert got.shape == (2, H, W, 3)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)

    common = dict(prompt="a red barn", num_inference_steps=6, strength=0.6, controlnet_conditioning_scale=0.9)
    ref = diffusers_run(reference, StableDiffusionControlNetImg2ImgPipeline, reference["one"], "dpmpp_2m_karras",
                        image=init_image, control_image=pattern(1), generator=torch.Generator().manual_seed(2),
                        **common)
    got = engines[1](init_image=init_image, control_image=pattern(1), sampler="dpmpp_2m_karras",
                     generator=torch.Generator().manual_seed(2), output_type="np", progress=False, **common)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)

    mask = np.zeros((H, W), np.uint8)
    mask[20:70, 30:100] = 255
    common = dict(prompt="a red barn", num_inference_steps=5, height=H, width=W)
    ref = diffusers_run(reference, StableDiffusionControlNetInpaintPipeline, reference["one"], "ddim",
                        image=init_image, mask_image=Image.fromarray(mask), control_image=pattern(2),
                        generator=torch.Generator().manual_seed(6), **common)
    got = engines[1](init_image=init_image, mask=mask, control_image=pattern(2), sampler="ddim",
                     generator=torch.Generator().manual_seed(6), output_type="np", progress=False, **common)
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_what_the_control_image_shows_steers_the_image(engines, reference):
    """The test ControlNets answer their image (another image: another picture), and two of them
    each get their own: swapping the images changes the result, as it does in diffusers."""
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    a = engines[1]("a house", control_image=pattern(0), seed=1, progress=False, **kw)
    b = engines[1]("a house", control_image=pattern(2), seed=1, progress=False, **kw)
    assert np.abs(a - b).max() > 0.05
    swapped = engines[2]("a house", control_image=[pattern(3), pattern(0)], sampler="ddim",
                         generator=torch.Generator().manual_seed(1), progress=False, **kw)
    ref = diffusers_run(reference, StableDiffusionControlNetPipeline, reference["both"], "ddim", prompt="a house",
                        image=[pattern(3), pattern(0)], generator=torch.Generator().manual_seed(1), **kw)
    np.testing.assert_allclose(swapped, ref, rtol=0, atol=TOL)
    straight = engines[2]("a house", control_image=[pattern(0), pattern(3)], sampler="ddim",
                          generator=torch.Generator().manual_seed(1), progress=False, **kw)
    assert np.abs(straight - swapped).max() > 0.05


def test_only_the_masked_area_cuts_the_control_image_too(engines, reference, init_image):
    """mask_crop: the control image is cut to the box and resized as the image is, as diffusers'
    ControlNet inpainting pipeline does with padding_mask_crop."""
    m = np.zeros((H, W), np.uint8)
    m[30:60, 40:90] = 255
    common = dict(prompt="a red barn", mask_image=Image.fromarray(m), padding_mask_crop=8, num_inference_steps=4,
                  height=64, width=64, controlnet_conditioning_scale=0.9)
    ref = diffusers_run(reference, StableDiffusionControlNetInpaintPipeline, reference["one"], "ddim",
                        image=init_image, control_image=pattern(0), generator=torch.Generator().manual_seed(6),
                        output_type="pil", **common)
    got = engines[1](init_image=init_image, control_image=pattern(0), sampler="ddim",
                     generator=torch.Generator().manual_seed(6), output_type="np", progress=False, **common)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1.5 / 255)  # 8-bit pastes: one level apart at most
    with pytest.raises(InvalidRequest, match="the control image is 64x48 and the image 128x96"):
        engines[1](init_image=init_image, control_image=pattern(0).resize((64, 48)), **common)


def test_without_a_control_image_the_engine_draws_as_the_model_alone(engines, pipelines):
    """A ControlNet given no image is off: scale 0, so the U-Net sees no residuals; one of two
    off (None) leaves the other's effect alone."""
    kw = dict(seed=4, steps=4, width=W, height=H, output_type="np", progress=False)
    np.testing.assert_allclose(engines[1]("a boat", **kw), pipelines["tiny-sd1"]("a boat", **kw), rtol=0, atol=1e-5)
    np.testing.assert_allclose(engines[2]("a boat", control_image=[pattern(0), None], **kw),
                               engines[1]("a boat", control_image=pattern(0), **kw), rtol=0, atol=1e-5)


def test_control_settings_are_checked(engines, pipelines, tmp_path):
    with pytest.raises(InvalidRequest, match="no ControlNet; export one"):
        pipelines["tiny-sd1"]("x", control_image=pattern(0), steps=2, progress=False)
    with pytest.raises(InvalidRequest, match="no ControlNet; export one .* to use control images and their settings"):
        pipelines["tiny-sd1"]("x", control_scale=0.5, steps=2, progress=False)  # (not "no control image given")
    for kw, message in [(dict(control_image=pattern(0)), "has 2 ControlNets: give a list of 2"),
                        (dict(control_image=[pattern(0)]), "1 control images for this engine's 2"),
                        (dict(control_image=[pattern(0), None], control_scale=[1.0]), "control_scale: 1 values"),
                        (dict(control_image=[pattern(0), None], control_start=0.5, control_end=0.5), "0 <= start < end"),
                        (dict(control_image=[pattern(0), None], control_scale=float("nan")), "finite number"),
                        (dict(control_image=[tmp_path / "missing.png", None]), "cannot read the control image"),
                        (dict(control_image=[[1, 2], None]), "a control image must be"),
                        (dict(control_scale=0.5), "no control image is given: pass control_image="),
                        (dict(control_end=0.5, init_image=pattern(0)), "no control image is given"),
                        (dict(control_image=[pattern(0).resize((40, 40)), None]),
                         "the control image is 40x40, and its width 40 is outside")]:
        with pytest.raises(InvalidRequest, match=message):
            engines[2]("x", steps=2, progress=False, **kw)


def test_controlnets_that_do_not_fit_are_refused(nets, model_dirs, tmp_path):
    from diffusers import UNet2DConditionModel

    from ldm_deploy.export.random_model import unet_config

    unet = UNet2DConditionModel(**unet_config("tiny-sd1"))
    odd = {"grey": ControlNetModel.from_unet(unet, conditioning_channels=1),
           "shrinks4": ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96)),
           "shuffle": ControlNetModel.from_unet(unet)}
    odd["shuffle"].register_to_config(global_pool_conditions=True)
    for name, net in odd.items():
        net.save_pretrained(tmp_path / name)
    for given, message in [(nets[0], "made for another model: its cross_attention_dim is 32, the U-Net.s 48"),
                           (tmp_path / "nothing", "does not exist"),
                           (tmp_path / "grey", "takes 1-channel control images"),
                           (tmp_path / "shrinks4", "shrinks its image 4 times, this model's VAE 8 times"),
                           (tmp_path / "shuffle", "pools its image globally")]:
        config = replace(TEST_CONFIG, controlnets=(str(given),))
        model = model_dirs["tiny-sd2" if given == nets[0] else "tiny-sd1"]
        with pytest.raises(ModelSourceError, match=message):
            export_engine(str(model), tmp_path / "e", config)


def test_export_and_run_from_the_command_line(nets, model_dirs, engines, tmp_path, capsys):
    out = tmp_path / "engine"
    code = export_cli.main(["--model", str(model_dirs["tiny-sd1"]), "--controlnet", str(nets[0]), "--out", str(out),
                            "--min-size", "64", "--max-size", "256", "--no-img2img"])
    assert code == 0
    pattern(0).save(tmp_path / "edges.png")
    code = run_cli.main(["a house", "--engine", str(out), "--control-image", str(tmp_path / "edges.png"),
                         "--control-scale", "0.8", "--control-end", "0.6", "--steps", "3", "--seed", "1",
                         "--out", str(tmp_path / "o.png"), "--quiet"])
    assert code == 0
    pipe = Pipeline.load(out)
    assert pipe.manifest.model.controlnets[0]["name"] == nets[0].name
    want = pipe("a house", control_image=pattern(0), control_scale=0.8, control_end=0.6, steps=3, seed=1,
                progress=False)[0]
    with Image.open(tmp_path / "o.png") as got:
        assert got.size == (W, H) and np.array_equal(np.asarray(got), np.asarray(want))
        # the extension's name of it: the stem and AUTOMATIC1111's old hash (SHA-256 of 64 KiB at 1 MiB, 8 digits)
        weights = next(nets[0].glob("*.safetensors")).read_bytes()
        old = hashlib.sha256(weights[0x100000:0x110000]).hexdigest()[:8]
        assert f'ControlNet 0: "Module: none, Model: {nets[0].name} [{old}], Weight: 0.8, Guidance Start: 0.0, ' \
               'Guidance End: 0.6"' in got.info["parameters"]
    # --from-png with the control image draws it again, with the PNG's weight and guidance; without
    # it, says what is missing
    again = tmp_path / "again.png"
    code = run_cli.main(["--from-png", str(tmp_path / "o.png"), "--engine", str(out), "--control-image",
                         str(tmp_path / "edges.png"), "--out", str(again), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and "not taken" not in err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(want))
    code = run_cli.main(["--from-png", str(tmp_path / "o.png"), "--engine", str(out), "--out", str(again), "--quiet"])
    assert code == 0 and "drawn with ControlNet 0, whose control image is not in the PNG" in capsys.readouterr().err


def test_hires_fix_steers_the_second_pass_too(engines):
    """The hires fix's redraw gets the ControlNet and its image (resized to the new size), as
    AUTOMATIC1111 runs it: the same as the first pass, enlarged, redrawn by hand with them."""
    from ldm_deploy.engine import hires

    pipe = engines[1]
    kw = dict(steps=4, seed=3, control_image=pattern(1), control_scale=0.9, progress=False)
    got = pipe("a tower", width=64, height=64, hires_scale=2, hires_strength=0.6, output_type="np", **kw)
    first = pipe("a tower", width=64, height=64, output_type="pil", **kw)[0]
    steps, strength = hires.img2img_steps(hires.Hires(2, 0, 0.6, hires.UPSCALER), 4)
    want = pipe("a tower", init_image=first.resize((128, 128), Image.LANCZOS), strength=strength, width=128,
                height=128, output_type="np", _hires_pass=(4, 4), **{**kw, "steps": steps})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    unsteered = pipe("a tower", init_image=first.resize((128, 128), Image.LANCZOS), strength=strength, width=128,
                     height=128, output_type="np", _hires_pass=(4, 4), steps=steps, seed=3, progress=False)
    assert np.abs(got - unsteered).max() > 0.01


def test_run_with_a_model_and_a_controlnet_exports_it_into_the_cache(nets, model_dirs, tmp_path):
    pattern(0).resize((256, 256)).save(tmp_path / "edges.png")  # cached engines take 256 px and more
    args = ["a house", "--model", str(model_dirs["tiny-sd1"]), "--controlnet", str(nets[0]), "--control-image",
            str(tmp_path / "edges.png"), "--steps", "2", "--seed", "1", "--quiet"]
    assert run_cli.main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert run_cli.main([*args, "--control-scale", "0", "--out", str(tmp_path / "b.png")]) == 0
    plain = ["a house", "--model", str(model_dirs["tiny-sd1"]), "--steps", "2", "--seed", "1", "--quiet",
             "--width", "256", "--height", "256", "--out", str(tmp_path / "c.png")]
    assert run_cli.main(plain) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.int16) for n in "abc")
    assert np.abs(a - b).max() > 10 and np.abs(b - c).max() <= 1  # scale 0: the model alone
    with Image.open(tmp_path / "a.png") as im:
        assert f"Model: {nets[0].name} [" in im.info["parameters"] and "], Weight: 1.0" in im.info["parameters"]


@pytest.mark.parametrize("layout", ["original", "control_model", "diffusers"])
def test_single_file_controlnets_load_the_same_weights(layout, nets, engines, model_dirs, tmp_path):
    """One file, as AUTOMATIC1111's models/ControlNet holds them (the original release's names, with
    or without control_model.) or with diffusers' names: the same ControlNet as its folder, so the
    same image; a file of something else is named and refused."""
    from safetensors.torch import save_file

    from ldm_checkpoint import controlnet_state

    net = ControlNetModel.from_pretrained(nets[0])
    state = ({k: v.contiguous() for k, v in net.state_dict().items()} if layout == "diffusers" else
             controlnet_state(net, "control_model." if layout == "control_model" else ""))
    save_file(state, str(tmp_path / "control_sd15_test.safetensors"))
    pipe = Pipeline.load(export_engine(str(model_dirs["tiny-sd1"]), tmp_path / "e", replace(
        TEST_CONFIG, controlnets=(str(tmp_path / "control_sd15_test.safetensors"),), img2img=False)))
    kw = dict(control_image=pattern(0), steps=3, seed=2, output_type="np", progress=False)
    np.testing.assert_allclose(pipe("a house", **kw), engines[1]("a house", **kw), rtol=0, atol=1e-6)
    assert pipe.manifest.model.controlnets[0]["name"] == "control_sd15_test.safetensors"


def test_single_file_controlnets_that_are_not_or_do_not_fit_are_refused(nets, model_dirs, tmp_path):
    from safetensors.torch import save_file

    from ldm_checkpoint import controlnet_state

    state = controlnet_state(ControlNetModel.from_pretrained(nets[0]))
    save_file({"emb_params": torch.zeros(2, 32)}, str(tmp_path / "embedding.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("zero_convs.0.")}, str(tmp_path / "cut.safetensors"))
    save_file(state, str(tmp_path / "net.safetensors"))
    (tmp_path / "net.pth").write_bytes(b"\x80\x02pickle")  # a pickle's protocol byte
    for name, model, message in [("embedding.safetensors", "tiny-sd1", "is not a ControlNet"),
                                 ("cut.safetensors", "tiny-sd1", "does not fit this model's U-Net: the checkpoint "
                                                                 "lacks 2 ControlNet weight"),
                                 ("net.safetensors", "tiny-sd2", "does not fit this model's U-Net"),
                                 ("net.pth", "tiny-sd1", "pickle")]:
        config = replace(TEST_CONFIG, controlnets=(str(tmp_path / name),), img2img=False)
        with pytest.raises(ModelSourceError, match=message):
            export_engine(str(model_dirs[model]), tmp_path / "e", config)


def test_control_images_are_prepared_as_diffusers_prepares_them():
    """Resized in their own mode (RGBA with its alpha premultiplied, as PIL resizes it), then made
    RGB, in [0, 1]: diffusers' control image processor, for colour, transparent and grey images."""
    from diffusers.image_processor import VaeImageProcessor

    from ldm_deploy.engine.controls import Control

    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
    for image in (rgba.convert("RGB"), rgba, rgba.convert("L")):
        want = processor.preprocess(image, height=96, width=128).numpy()  # (1, 3, H, W)
        got, _ = Control.of(image, 1.0, 0.0, 1.0, 1).inputs(1, 128, 96, 1)
        np.testing.assert_array_equal(got[0], want)


def test_served_controlnet_units(engines):
    """ldm-serve takes the ControlNet extension's units (AUTOMATIC1111's alwayson_scripts), each
    naming its model, and draws what the Pipeline draws given those images and settings."""
    from serve_http import b64, call, pixels, running, unb64

    from ldm_deploy.serve.a1111_controlnet import slot_of

    pipe = engines[2]
    names = [c["name"] for c in pipe.manifest.model.controlnets]
    units = [{"enabled": True, "image": b64(pattern(2)), "module": "none", "model": f"{names[1]} [0123abcd]",
              "weight": 1.2, "guidance_start": 0.2, "guidance_end": 0.8, "resize_mode": "Just Resize"},
             {"enabled": True, "image": b64(pattern(1)), "model": names[0], "weight": 0.6}]
    body = {"prompt": "a house", "steps": 4, "seed": 3, "width": W, "height": H, "sampler_name": "Euler",
            "alwayson_scripts": {"controlnet": {"args": units}}}
    with running(pipe) as server:
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
        listed = call(server.url + "/controlnet/model_list")[1]["model_list"]
    assert status == 200, answer
    # the extension's names ("name [old hash]"), which a unit may send back as they are
    assert listed == [c["a1111_name"] for c in pipe.manifest.model.controlnets]
    assert [slot_of(name, names, "unit") for name in listed] == [0, 1]
    want = pipe("a house", steps=4, seed=3, width=W, height=H, sampler="euler", guidance=7.0, prompt_weighting=True,
                control_image=[pattern(1), pattern(2)], control_scale=[0.6, 1.2], control_start=[0.0, 0.2],
                control_end=[1.0, 0.8], progress=False)
    assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
    assert "ControlNet 1" in want[0].info["parameters"]
