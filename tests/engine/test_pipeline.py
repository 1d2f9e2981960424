"""Pipeline behaviour that users rely on: seeds, batches, shapes, guidance skipping."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm_deploy.engine.backends.onnxruntime import OnnxRuntimeBackend

KW = dict(steps=3, width=64, height=64, output_type="np", progress=False)


def test_same_seed_same_image_different_seed_different_image(pipelines):
    pipe = pipelines["tiny-sd1"]
    a = pipe("a red circle", seed=1, sampler="euler_a", **KW)
    b = pipe("a red circle", seed=1, sampler="euler_a", **KW)
    c = pipe("a red circle", seed=2, sampler="euler_a", **KW)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_from_pretrained_is_load(engine_dirs, pipelines):
    """diffusers' name for loading, as its users type it: the same engine, the same image."""
    from ldm_deploy import Pipeline

    pipe = Pipeline.from_pretrained(engine_dirs["tiny-sd1"])
    assert isinstance(pipe, Pipeline) and pipe.manifest == pipelines["tiny-sd1"].manifest
    kw = dict(seed=3, steps=2, width=64, height=64, output_type="np", progress=False)
    assert np.array_equal(pipe("a cat", **kw), pipelines["tiny-sd1"]("a cat", **kw))


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "ddim"])
def test_batch_equals_single_runs(pipelines, sampler):
    pipe = pipelines["tiny-sd2"]
    both = pipe("a blue square", seed=10, num_images=2, sampler=sampler, **KW)
    first = pipe("a blue square", seed=10, sampler=sampler, **KW)
    second = pipe("a blue square", seed=11, sampler=sampler, **KW)
    np.testing.assert_allclose(both, np.concatenate([first, second]), atol=1e-5, rtol=0)


def test_more_images_than_the_engine_batch_run_in_chunks(pipelines):
    pipe = pipelines["tiny-sd1"]  # max batch 2
    five = pipe("x", seed=3, num_images=5, **KW)
    last = pipe("x", seed=7, **KW)
    assert five.shape == (5, 64, 64, 3)
    np.testing.assert_allclose(five[4:], last, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(256, 256), (320, 448), (512, 512)])
def test_one_engine_serves_many_sizes(pipelines, size):
    w, h = size
    out = pipelines["tiny-sd1"]("a house", seed=0, steps=2, width=w, height=h, output_type="pil", progress=False)
    assert out[0].size == (w, h)


def test_guidance_at_most_one_runs_only_the_conditional_half(pipelines, monkeypatch):
    pipe = pipelines["tiny-sd1"]
    seen = []
    real_run = OnnxRuntimeBackend.run

    def spy(self, component, run):
        if "state" in run.inputs:
            seen.append(tuple(run.inputs["text_embeddings"].shape()[:2]))
        return real_run(self, component, run)

    monkeypatch.setattr(OnnxRuntimeBackend, "run", spy)
    pipe("x", seed=0, guidance=1.0, num_images=2, **KW)
    assert seen == [(1, 2)] * 3  # (cfg, batch)
    seen.clear()
    pipe("x", seed=0, guidance=7.5, num_images=2, **KW)
    assert seen == [(2, 2)] * 3


def test_latents_returned_are_the_last_steps_and_stay_so(pipelines):
    """output_type="latent" returns a copy of the last step's output: ONNX Runtime's numpy() of a
    CPU OrtValue is a view that does not keep the buffer alive, and once freed its first bytes
    were reused (the same call then returned other numbers each time). Uploads copy likewise."""
    pipe = pipelines["tiny-sd1"]
    be = pipe.backend
    value = be.upload(np.arange(6, dtype=np.float32))
    host = be.download(value)
    assert host.flags.owndata and host.tolist() == [0, 1, 2, 3, 4, 5]
    # upload copies too: a CPU OrtValue would wrap the array, and two uploads of it be one buffer
    array = np.zeros(3, np.float32)
    first, second = be.upload(array), be.upload(array)
    array[0] = 5
    assert be.download(first).tolist() == be.download(second).tolist() == [0, 0, 0]
    kw = dict(steps=3, seed=5, width=128, height=96, output_type="latent", progress=False)
    first = pipe("a boat", **kw)
    for _ in range(3):
        np.testing.assert_array_equal(pipe("a boat", **kw), first)


def test_pil_output_carries_parameters(pipelines):
    im = pipelines["tiny-sd1"]("a cat", negative_prompt="dog", seed=5, steps=2, width=64, height=64, progress=False)[0]
    text = im.info["parameters"]
    assert text.startswith("a cat\nNegative prompt: dog\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 5")


def test_long_prompt_is_truncated_with_a_warning(pipelines, caplog):
    pipelines["tiny-sd1"]("word " * 100, seed=0, **KW)  # two chunks of the engine's four
    assert "cut off" not in caplog.text
    pipelines["tiny-sd1"]("word " * 400, seed=0, **KW)
    assert "the prompt needs 6 chunks of 75 tokens" in caplog.text and "this engine takes 4" in caplog.text


def test_init_image_from_an_array_is_the_same_as_from_pil(pipelines):
    """img2img takes an (H, W, 3) array (uint8, or floats in [0, 1] as output_type="np" gives)
    as diffusers does, with the same result as the PIL image of the same pixels."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kw = dict(KW, seed=3, strength=0.5)
    pipe = pipelines["tiny-sd1"]
    expected = pipe("x", init_image=Image.fromarray(pixels), **kw)
    np.testing.assert_array_equal(pipe("x", init_image=pixels, **kw), expected)
    np.testing.assert_array_equal(pipe("x", init_image=pixels / 255.0, **kw), expected)


def test_sixteen_bit_greyscale_init_image_keeps_its_tones(tmp_path):
    """PIL's own conversion clips 16-bit values at 255 (a mid grey became white)."""
    from PIL import Image

    from ldm_deploy.engine.images import open_image

    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert np.asarray(open_image(tmp_path / "g16.png"))[0, 0].tolist() == [117] * 3  # 30000/65535*255


def test_a_files_exif_orientation_is_read_as_diffusers_load_image_reads_it(pipelines, tmp_path):
    """A phone's JPEG stored 96x64 and turned by EXIF (Orientation 6: 90 degrees clockwise) is
    drawn upright, 64x96, from the very pixels diffusers' load_image gives."""
    from diffusers.utils import load_image

    y, x = np.mgrid[0:64, 0:96]
    stored = Image.fromarray(np.stack([x * 2, y * 3, (x * y) % 256], -1).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(str(tmp_path / "phone.jpg"))
    assert upright.size == (64, 96)
    kw = dict(steps=3, output_type="np", progress=False, seed=3, strength=0.5)  # drawn at the image's size
    pipe = pipelines["tiny-sd1"]
    got = pipe("x", init_image=str(tmp_path / "phone.jpg"), **kw)
    assert got.shape[1:3] == (96, 64)
    np.testing.assert_array_equal(got, pipe("x", init_image=upright, **kw))


@pytest.mark.parametrize("pixels,expected", [
    (np.full((4, 4, 3), 100, np.int64), 100),  # integers within 0..255: 8-bit
    (np.full((4, 4), 30000, np.uint16), 117),  # 16-bit
    (np.full((4, 4, 3), 0.5), 128),  # floats in [0, 1], as output_type="np" gives
    (np.full((4, 4, 3), -0.5), 64),  # any negative: [-1, 1], as diffusers' processor reads it
    (np.full((4, 4, 3), 100.0), 100),  # floats beyond 1: 0..255
    (Image.fromarray(np.full((4, 4), 100, np.int32)), 100),  # mode "I" holding 8-bit values
    (Image.fromarray(np.full((4, 4), 0.5, np.float32)), 128),  # mode "F"
    (Image.new("LA", (4, 4), (9, 255)), 9),
], ids=["int64", "uint16", "float01", "float-11", "float255", "mode-I", "mode-F", "mode-LA"])
def test_init_image_values(pixels, expected):
    from ldm_deploy.engine.images import as_init_image

    assert np.asarray(as_init_image(pixels))[0, 0].tolist() == [expected] * 3


@pytest.mark.parametrize("kw,message", [
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(seed=-3), "seed must be 0 or more"),
    (dict(seed=2**64), "seed must be below 2**64"), (dict(seed=2**64 - 1, num_images=2), "got 18446744073709551616"),
    (dict(seed=1e30), "seed must be below 2**64"),  # (a whole float, as JSON may send one)
    (dict(width=64.5), "width must be a whole number"),
    (dict(num_images=0), "num_images must be a whole number of at least 1"),
    (dict(init_image=[1, 2, 3]), "init_image must be a path, a PIL image, an (H, W, 3) array or (1, C, h, w) latents; got list"),
    (dict(guidance=float("inf")), "guidance must be a finite number"),
    (dict(width=float("inf")), "width must be a whole number"),
    (dict(init_image=np.full((64, 64, 3), -1)), "negative pixel values"),
    (dict(init_image=np.full((64, 64, 3), -2.0)), "pixel values from -2 to -2; pass floats in [0, 1] (or [-1, 1])"),
    (dict(prompt=None), "prompt must be text or a list of texts, got NoneType"),
    (dict(prompt="a \udcff cat"), "prompt is not valid text: it holds bytes that are not UTF-8"),  # (argv's)
    (dict(negative_prompt=[None]), "negative_prompt[0] must be text, got NoneType"),
    (dict(negative_prompt=["a", "b"]), "2 negative prompts for 1 prompts"),
    (dict(guidance="7"), "guidance must be a number, got '7'"),
    (dict(steps=2.5), "steps must be a whole number, got 2.5"),
    (dict(latents=[[1.0]]), "latents must be a 4-dimensional (B, C, H/8, W/8) array"),
    (dict(prompt="(" * 1000 + "cat" + ")" * 1000, prompt_weighting=True), "weighs a word past what a float can hold"),
    (dict(progress="yes"), "progress must be True, False or a function"),
])
def test_bad_requests(pipelines, kw, message):
    from ldm_deploy.errors import InvalidRequest

    kw = {"prompt": "x", **KW, **kw}
    with pytest.raises(InvalidRequest) as e:
        pipelines["tiny-sd1"](**kw)
    assert message in str(e.value)


def test_torch_latents_are_taken_as_diffusers_takes_them(pipelines):
    import torch

    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    pipe = pipelines["tiny-sd1"]
    np.testing.assert_array_equal(pipe("x", latents=latents, **KW), pipe("x", latents=latents.numpy(), **KW))


def test_seed_minus_one_is_random(pipelines):
    pipe = pipelines["tiny-sd1"]
    seeds = {pipe("x", seed=-1, **dict(KW, output_type="pil"))[0].info["parameters"].split("Seed: ")[1][:12]
             for _ in range(2)}
    assert len(seeds) == 2


def test_model_name_in_parameters():
    from ldm_deploy.engine.infotext import model_name

    assert model_name("/x/ldm_deploy/shapes/model") == "shapes"
    assert model_name("runwayml/stable-diffusion-v1-5") == "stable-diffusion-v1-5"
    assert model_name("/models/tiny-sd1") == "tiny-sd1"
    assert model_name("org/model") == "model"  # a hub id: its own name


def test_unused_negative_prompt_is_warned_about_once(engine_dirs, caplog):
    import logging

    from ldm_deploy import Pipeline

    pipe = Pipeline.load(engine_dirs["tiny-sd1"])  # its own: the shared ones may have warned already
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            pipe("a cat", negative_prompt="dog", guidance=1.0, steps=1, width=64, height=64,
                                  output_type="np", progress=False)
    assert caplog.text.count("negative prompt has no effect") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for guidance in (1.5, 7.5, 7.5):  # LCM-LoRA's guidance is 1-2: 7.5 is a slip worth a word
            pipe("a cat", guidance=guidance, steps=1, sampler="lcm", width=64, height=64, output_type="np",
                 progress=False)
    assert caplog.text.count("the lcm sampler is made for LCM-LoRA models") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for guidance in (1.0, 7.5, 7.5):  # TCD-LoRA's too
            pipe("a cat", guidance=guidance, steps=1, sampler="tcd", width=64, height=64, output_type="np",
                 progress=False)
    assert caplog.text.count("the tcd sampler is made for TCD-LoRA models") == 1


def test_a_vae_encoder_replaced_after_loading_is_refused(engine_dirs, tmp_path):
    """ldm-export --force over an engine in use: the VAE encoder, loaded at the first img2img, is
    refused where its bytes are no longer those the manifest held (another model's), and taken
    where they are (the same export again)."""
    import shutil

    from ldm_deploy import Pipeline
    from ldm_deploy.errors import EngineError

    engine = tmp_path / "engine"
    shutil.copytree(engine_dirs["tiny-sd1"], engine)
    kw = dict(KW, seed=1, strength=0.5, init_image=np.full((64, 64, 3), 0.5, np.float32))
    pipe = Pipeline.load(engine)
    graph = engine / "vae_encoder.onnx"
    shutil.copy(graph, tmp_path / "same.onnx")
    (tmp_path / "same.onnx").replace(graph)  # new file, same bytes
    first = pipe("x", **kw)
    other = Pipeline.load(engine)
    with open(graph, "ab") as f:
        f.write(b"\0")  # another graph now
    with pytest.raises(EngineError, match="vae_encoder.onnx has changed since .* was loaded"):
        other("x", **kw)
    assert first.shape == (1, 64, 64, 3)


def test_a_call_written_for_diffusers_gets_what_diffusers_returns(pipelines):
    """`.images`, return_dict=False's (images, None), eta=0.0 and .to("cuda") as diffusers has them."""
    from ldm_deploy.errors import InvalidRequest

    pipe = pipelines["tiny-sd1"].to("cuda")
    kw = dict(num_inference_steps=2, guidance_scale=7.5, width=64, height=64, progress=False,
              generator=__import__("torch").Generator().manual_seed(3))
    out = pipe("a cat", **kw)
    assert out.images[0] is out[0] and out.nsfw_content_detected is None
    kw["generator"].manual_seed(3)
    images, nsfw = pipe("a cat", return_dict=False, eta=0.0, **kw)
    assert nsfw is None and np.array_equal(np.asarray(images[0]), np.asarray(out.images[0]))
    with pytest.raises(InvalidRequest, match="DDIM runs with eta 0 here"):
        pipe("a cat", eta=1.0, **kw)
