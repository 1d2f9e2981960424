"""The hires fix with an upscale model exported into the engine (ldm-export --upscaler): diffusers'
txt2img, its 8-bit image through the model as AUTOMATIC1111 tiles it, then diffusers' img2img; and
the model's name through ldm-run, its PNGs and ldm-serve."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TEST_CONFIG, diffusers_schedulers
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file
from serve_http import call, pixels, running, unb64

from ldm_deploy import Pipeline
from ldm_deploy.cli import run as run_cli
from ldm_deploy.engine import upscale
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.upscale_nets import Compact, RRDBNet

TOL = 2e-3


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """name -> (torch network, its file): a 2x SRVGGNetCompact, and a 4x RRDBNet under the name
    AUTOMATIC1111 gives Real-ESRGAN's model (the weights' own checks are test_upscalers.py's)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("upscalers")
    out = {}
    for name, net in (("2x-Compact", Compact(3, 8, 2, 2)), ("R-ESRGAN 4x+", RRDBNet(3, 3, 8, 1, 8, 2))):
        path = root / f"{name.replace(' ', '_')}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        out[name] = (net.eval(), path)
    return out


@pytest.fixture(scope="module")
def engine(model_dirs, nets, tmp_path_factory):
    # the first named by its file (2x-Compact.safetensors), the second as FILE:NAME names it
    specs = ((str(nets["2x-Compact"][1]), None), (str(nets["R-ESRGAN 4x+"][1]), "R-ESRGAN 4x+"))
    return export_engine(str(model_dirs["tiny-sd1"]), tmp_path_factory.mktemp("eng") / "up",
                         replace(TEST_CONFIG, upscalers=specs))


@pytest.fixture(scope="module")
def pipe(engine):
    return Pipeline.load(engine)


class TorchModel:
    """The torch network as engine/upscale.py calls a model."""

    def __init__(self, name, net):
        self.name, self.net, self.scale = name, net, net.scale

    def __call__(self, x):
        with torch.no_grad():
            return self.net(torch.from_numpy(x)).numpy()


def test_hires_fix_enlarges_with_the_model_then_redraws(pipe, nets, model_dirs):
    t2i = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                  requires_safety_checker=False)
    t2i.set_progress_bar_config(disable=True)
    i2i = StableDiffusionImg2ImgPipeline(**t2i.components)
    cls, kw = diffusers_schedulers()["euler"]
    for p in (t2i, i2i):
        p.scheduler = cls.from_config(t2i.scheduler.config, **kw)
    assert pipe.manifest.upscalers["2x-Compact"]["scale"] == 2
    for name, scale, size in (("2x-Compact", 1.5, (96, 96)), ("R-ESRGAN 4x+", 2, (128, 128))):
        ours = pipe("a lighthouse", seed=21, steps=3, width=64, height=64, sampler="euler", hires_scale=scale,
                    hires_steps=4, hires_strength=0.6, hires_upscaler=name, progress=False)[0]
        first = t2i("a lighthouse", num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
                    generator=torch.Generator().manual_seed(21)).images[0]
        # AUTOMATIC1111's passes and tiles (test_upscalers.py checks those), here with the torch network
        enlarged = upscale.resize(first, *size, TorchModel(name, nets[name][0]))
        assert enlarged.size == size and ours.size == size
        want = i2i("a lighthouse", image=enlarged, strength=4.5 / 6, num_inference_steps=6, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(21), output_type="np").images[0]
        # Our 8-bit image against diffusers' floats, as the Lanczos hires test (test_parity.py)
        np.testing.assert_allclose(np.asarray(ours, np.float32) / 255, want, rtol=0, atol=TOL + 0.5 / 255)
        assert f"Hires upscaler: {name}," in ours.info["parameters"]


def test_exported_graphs_run_the_networks(pipe, nets):
    """Through AUTOMATIC1111's tiles (192 px, overlapping by 8: an 80 x 64 image padded into one, a
    400 x 300 one in six), the engine's graphs give the torch networks' images, but for a level of
    8-bit rounding here and there."""
    rng = np.random.default_rng(0)
    for size in ((80, 64), (400, 300)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for name in nets:
            got = upscale.one_pass(image, upscale.Upscaler(pipe.engine_dir, name, pipe.manifest.upscalers[name]))
            want = upscale.one_pass(image, TorchModel(name, nets[name][0]))
            assert got.size == want.size == tuple(s * nets[name][0].scale for s in size)
            assert np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).max() <= 1


def test_names_through_ldm_run_pngs_and_serve(pipe, engine, engine_dirs, tmp_path, capsys):
    with pytest.raises(InvalidRequest, match=r"unknown hires upscaler '4x-Nope'; choose one of Lanczos, .*, "
                                             r"2x-Compact, R-ESRGAN 4x\+"):
        pipe("x", width=64, height=64, steps=2, hires_scale=2, hires_upscaler="4x-Nope", progress=False)
    with pytest.raises(InvalidRequest, match=r"unknown hires upscaler \['2x-Compact'\]"):
        pipe("x", width=64, height=64, steps=2, hires_scale=2, hires_upscaler=["2x-Compact"], progress=False)
    out = tmp_path / "a.png"
    args = [str(x) for x in ("--engine", engine, "a red house", "--steps", 2, "--width", 64, "--height", 64,
                             "--seed", 5, "--sampler", "euler", "--hires-scale", 1.5,
                             "--hires-upscaler", "2x-Compact", "--out", out)]
    assert run_cli.main(args) == 0
    again = tmp_path / "b.png"
    assert run_cli.main(["--engine", str(engine), "--from-png", str(out), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert "Hires upscaler: 2x-Compact" in Image.open(again).text["parameters"]
    # An engine without that model: Lanczos stands in, with a warning that says how to add it
    capsys.readouterr()
    assert run_cli.main(["--engine", str(engine_dirs["tiny-sd1"]), "--from-png", str(out), "--out",
                         str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert "hires upscaler '2x-Compact' is not offered by this engine" in err
    assert "ldm-export --upscaler FILE[:NAME]" in err
    assert "Hires upscaler: Lanczos" in Image.open(tmp_path / "c.png").text["parameters"]
    with running(pipe) as server:
        listed = call(server.url + "/sdapi/v1/upscalers")[1]
        assert [(u["name"], u["scale"]) for u in listed] == [("Lanczos", 4), ("2x-Compact", 2), ("R-ESRGAN 4x+", 4)]
        body = {"prompt": "a cat", "steps": 2, "seed": 2, "width": 64, "height": 64, "enable_hr": True,
                "hr_scale": 1.5, "hr_upscaler": "2x-Compact", "hr_second_pass_steps": 2, "denoising_strength": 0.6}
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
        assert status == 200, answer
        want = pipe("a cat", steps=2, guidance=7.0, seed=2, sampler="euler", width=64, height=64, hires_scale=1.5,
                    hires_steps=2, hires_strength=0.6, hires_upscaler="2x-Compact", prompt_weighting=True,
                    progress=False)
        assert np.array_equal(pixels([unb64(answer["images"][0])]), pixels(want))
        assert "Hires upscaler: 2x-Compact" in json.loads(answer["info"])["infotexts"][0]


def test_a_comfyui_png_that_enlarges_with_a_model_draws_with_the_engines(engine, tmp_path):
    """ComfyUI's hires fix through ImageUpscaleWithModel of "2x-Compact.safetensors" (then no resize):
    --from-png draws what --hires-upscaler 2x-Compact at 2x draws."""
    from test_comfyui import hires_graph, with_upscale_model

    g = with_upscale_model(hires_graph(latent=False, sampler_name="euler", scheduler="normal"),
                           "upscale_models/2x-Compact.safetensors", None)
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(g))
    Image.new("RGB", (192, 128)).save(tmp_path / "comfy.png", pnginfo=info)
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", str(engine),
                         "--out", str(tmp_path / "again.png"), "-q"]) == 0
    assert run_cli.main(["a lighthouse at dusk", "--negative-prompt", "fog, rain", "--engine", str(engine), "--steps",
                         "3", "--guidance", "6.5", "--seed", "5", "--width", "96", "--height", "64", "--sampler",
                         "dpmpp_2m_karras", "--hires-scale", "2", "--hires-upscaler", "2x-Compact",
                         "--hires-steps", "2", "--hires-strength", "0.5", "--hires-sampler", "euler",
                         "--out", str(tmp_path / "given.png"), "-q"]) == 0
    again, given = Image.open(tmp_path / "again.png"), Image.open(tmp_path / "given.png")
    assert again.size == (192, 128) and np.array_equal(np.asarray(again), np.asarray(given))
    assert again.text["parameters"] == given.text["parameters"]


def test_serve_extras_enlarge_as_automatic1111s(pipe):
    """/sdapi/v1/extra-single-image and extra-batch-images: by a factor or to a size (cropped about
    the centre), a second upscaler blended over the first, "None" doing nothing; what is not offered
    refused. Each answer is what engine/upscale.py makes of the image, with its postprocessing text."""
    from serve_http import b64

    model = upscale.Upscaler(pipe.engine_dir, "2x-Compact", pipe.manifest.upscalers["2x-Compact"])
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Seed: 1")
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG", pnginfo=info)
    sent = base64.b64encode(buffer.getvalue()).decode()
    with running(pipe) as server:
        url = server.url + "/sdapi/v1/extra-single-image"
        status, answer, _ = call(url, "POST", {"image": sent, "upscaling_resize": 2, "upscaler_1": "2x-Compact"})
        assert status == 200, answer
        got = Image.open(io.BytesIO(base64.b64decode(answer["image"])))
        assert np.array_equal(np.asarray(got), np.asarray(upscale.upscale(photo, 2, model)))
        assert got.text["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: 2x-Compact"
        assert got.text["parameters"] == "a cat\nSteps: 2, Seed: 1"  # the input's, kept
        assert answer["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: 2x-Compact</p>"
        # to 100 x 60: by max(100/80, 60/64) = 1.25 (to 96 x 80, cut to 8s), then cropped about the centre
        status, answer, _ = call(url, "POST", {"image": b64(photo), "resize_mode": 1, "upscaling_resize_w": 100,
                                               "upscaling_resize_h": 60, "upscaler_1": "2x-Compact",
                                               "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.25})
        assert status == 200, answer
        enlarged = [upscale.upscale(photo, 1.25, model), upscale.lanczos(photo, 1.25)]
        assert enlarged[0].size == enlarged[1].size == (96, 80)
        fitted = []
        for im in enlarged:
            canvas = Image.new("RGB", (100, 60))
            canvas.paste(im, (50 - 48, 30 - 40))
            fitted.append(canvas)
        got = Image.open(io.BytesIO(base64.b64decode(answer["image"])))
        assert np.array_equal(np.asarray(got), np.asarray(Image.blend(*fitted, 0.25)))
        assert got.text["postprocessing"] == ("Postprocess upscale to: 100x60, Postprocess crop to: 100x60, "
                                              "Postprocess upscaler: 2x-Compact, Postprocess upscaler 2: Lanczos")
        status, answer, _ = call(url, "POST", {"image": b64(photo), "upscaler_1": "None"})
        assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"])))),
                                                np.asarray(photo))
        status, answer, _ = call(server.url + "/sdapi/v1/extra-batch-images", "POST",
                                 {"imageList": [{"data": b64(photo), "name": "a.png"}] * 2, "upscaler_1": "lanczos",
                                  "upscaling_resize": 1.5})
        assert status == 200 and len(answer["images"]) == 2
        want = np.asarray(photo.resize((120, 96), resample=Image.LANCZOS))  # 80 x 64 by 1.5, already in 8s
        assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(a)))), want) for a in answer["images"])
        assert answer["html_info"] == "<p>Postprocess upscale by: 1.5, Postprocess upscaler: Lanczos</p>"
        # "None" with a transparent PNG an earlier Extras wrote: made RGB (as AUTOMATIC1111), its old text dropped
        info.add_text("postprocessing", "Postprocess upscale by: 4.0")
        buffer = io.BytesIO()
        Image.new("RGBA", (24, 16), (10, 20, 30, 0)).save(buffer, format="PNG", pnginfo=info)
        status, answer, _ = call(url, "POST", {"image": base64.b64encode(buffer.getvalue()).decode()})
        got = Image.open(io.BytesIO(base64.b64decode(answer["image"])))
        assert status == 200 and got.mode == "RGB" and got.getpixel((3, 3)) == (10, 20, 30)
        assert got.text == {"parameters": "a cat\nSteps: 2, Seed: 1"} and answer["html_info"] == "<p></p>"
        # sizes: under 8 pixels a side once cut to 8s; over 40 megapixels on the way (the 4x model's
        # pass makes 6400 x 6400 of 1600 x 1600 before Lanczos brings it to 3200 x 3200)
        status, answer, _ = call(url, "POST", {"image": b64(photo.resize((6, 6))), "upscaling_resize": 1.25,
                                               "upscaler_1": "Lanczos"})
        assert status == 422 and "comes to 0x0" in answer["detail"] and "8 pixels a side" in answer["detail"]
        status, answer, _ = call(url, "POST", {"image": b64(Image.new("RGB", (1600, 1600))), "upscaling_resize": 2,
                                               "upscaler_1": "Lanczos", "upscaler_2": "R-ESRGAN 4x+",
                                               "extras_upscaler_2_visibility": 0.5})
        assert status == 422 and "a 6400x6400 image on the way" in answer["detail"], answer
        for body, match in (({"upscaler_1": "4x-Nope"}, "upscaler_1 '4x-Nope' is not offered; choose one of None, "
                                                        "Lanczos, 2x-Compact, R-ESRGAN 4x+"),
                            ({"upscaler_1": "Lanczos", "gfpgan_visibility": 1}, "face restoration"),
                            ({"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode must be 0"),
                            ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, "up to 8 times"),
                            ({"upscaler_1": "Lanczos", "image": "not base64!"}, "not valid base64")):
            status, answer, _ = call(url, "POST", {"image": b64(photo), **body})
            assert status == 422 and match in answer["detail"], answer


def test_extras_of_an_engine_not_loaded_check_its_file(engine, tmp_path):
    """ldm-serve's Extras with an engine not loaded: its upscale model's file checked against the
    manifest first (503 where damaged), then run as the loaded engine's would be."""
    import shutil

    from ldm_deploy.engine.manifest import read_manifest
    from ldm_deploy.serve.a1111_extras import Extras
    from ldm_deploy.serve.engines import Engines
    from ldm_deploy.serve.server import HttpError

    copy = shutil.copytree(engine, tmp_path / "engine")
    manifest = read_manifest(copy)
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    body = {"upscaler_1": "2x-Compact", "upscaling_resize": 2}
    out, info = Extras(Engines({"tiny": manifest}, {"tiny": copy})).process(photo, body)
    model = upscale.Upscaler(engine, "2x-Compact", manifest.upscalers["2x-Compact"])
    assert np.array_equal(np.asarray(out), np.asarray(upscale.upscale(photo, 2, model)))
    assert info == {"Postprocess upscale by": 2.0, "Postprocess upscaler": "2x-Compact"}
    graph = copy / manifest.upscalers["2x-Compact"]["file"]
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(HttpError, match="the upscale model 2x-Compact's file .* is missing or damaged; re-export"):
        Extras(Engines({"tiny": manifest}, {"tiny": copy})).process(photo, body)


def test_a_progress_function_hears_the_models_tiles(pipe):
    """The model's tiles repeat the first pass's step counts to a progress function (ldm-serve's),
    which may stop the call there: before the second pass draws."""
    heard = []
    call = dict(seed=21, steps=3, width=64, height=64, sampler="euler", hires_scale=2, hires_steps=4,
                hires_strength=0.5, hires_upscaler="R-ESRGAN 4x+")
    pipe("a lighthouse", **call, progress=lambda *c: heard.append(c))
    # 64 px is one of AUTOMATIC1111's 192 px tiles; then the second pass's 4 hires steps
    assert heard == [(1, 3), (2, 3), (3, 3), (3, 3), (1, 4), (2, 4), (3, 4), (4, 4)]

    class Stop(Exception):
        pass

    def stop_at_a_tile(done, total):
        heard.append((done, total))
        if len(heard) == 4:
            raise Stop

    heard.clear()
    with pytest.raises(Stop):
        pipe("a lighthouse", **call, progress=stop_at_a_tile)
    assert heard == [(1, 3), (2, 3), (3, 3), (3, 3)]
