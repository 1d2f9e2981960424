"""SDXL refiners against diffusers: a refiner engine's img2img against
StableDiffusionXLImg2ImgPipeline (its text encoder alone, aesthetic scores in its size
conditioning), and the base + refiner ensemble against diffusers' two pipelines cut at
denoising_end / denoising_start, given the same generators, to 2e-3 max abs per pixel on [0, 1].
The tiny refiner's text encoder (48 wide, pooled 40) is the tiny base's second one's shape."""

from __future__ import annotations

import json
import logging
import shutil
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

from conftest import TEST_CONFIG, assert_not_saturated, diffusers_schedulers
from ldm_deploy import Pipeline
from ldm_deploy.errors import InvalidRequest, ModelSourceError
from ldm_deploy.export.build import export_engine
from ldm_deploy.export.config import ExportConfig
from ldm_deploy.export.random_model import make_random_model

TOL = 2e-3
SCHEDULERS = diffusers_schedulers()
W, H = 128, 96
PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"base": (folder, ours, diffusers'), "refiner": (...)}: a tiny SDXL base and refiner."""
    root = tmp_path_factory.mktemp("refiner")
    out = {}
    for name, preset, cls in (("base", "tiny-sdxl", StableDiffusionXLPipeline),
                              ("refiner", "tiny-sdxl-refiner", StableDiffusionXLImg2ImgPipeline),
                              ("other", "tiny-sdxl", StableDiffusionXLPipeline)):  # another SDXL base model
        folder = make_random_model(root / name, preset, seed=4 if name == "other" else 3)
        engine = export_engine(str(folder), root / f"{name}-engine", TEST_CONFIG)
        ref = cls.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        ref.original_config = dict(ref.scheduler.config)
        out[name] = folder, Pipeline.load(engine), ref
    return out


def scheduled(ref, sampler):
    """ref with the sampler's scheduler made from the model's config (not the last one's, whose
    options, Karras sigmas say, would stay)."""
    cls, options = SCHEDULERS[sampler]
    ref.scheduler = cls.from_config(ref.original_config, **options)
    return ref


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8))


def test_refiner_engine_records_its_conditioning(models):
    _, pipe, _ = models["refiner"]
    m = pipe.manifest.model
    assert (m.family, m.aesthetic, m.text_width, m.pooled_width, m.zero_negative) == ("sdxl", True, 48, 40, False)
    spec = {t.name: t for t in pipe.specs["unet_step"].inputs}
    assert spec["time_ids"].shape[-1] == 5 and len(spec["time_ids"].shape) == 3


@pytest.mark.parametrize("sampler, scores", [("euler", {}), ("dpmpp_2m_karras", {"aesthetic_score": 8.0}),
                                             ("euler_a", {"aesthetic_score": 4.0, "negative_aesthetic_score": 1.0})])
def test_refiner_img2img_matches_diffusers(models, sampler, scores):
    _, pipe, ref = models["refiner"]
    image = photo(1)
    expected = scheduled(ref, sampler)(PROMPT, negative_prompt="blurry", image=image, strength=0.5,
                                       num_inference_steps=8, guidance_scale=6.0, output_type="np",
                                       generator=torch.Generator().manual_seed(7), **scores).images
    got = pipe(PROMPT, negative_prompt="blurry", init_image=image, strength=0.5, steps=8, guidance=6.0,
               sampler=sampler, output_type="np", progress=False, generator=torch.Generator().manual_seed(7),
               **scores)
    assert_not_saturated(expected)
    assert np.abs(got - expected).max() < TOL


def test_aesthetic_scores_change_the_image(models):
    """The scores reach the U-Net: the negative one through the unconditional half."""
    _, pipe, _ = models["refiner"]
    draw = {k: pipe(PROMPT, init_image=photo(2), strength=0.6, steps=4, seed=1, output_type="np", progress=False,
                    **kw) for k, kw in (("default", {}), ("high", {"aesthetic_score": 9.0}),
                                        ("negative", {"negative_aesthetic_score": 0.5}))}
    assert np.abs(draw["default"] - draw["high"]).max() > 1e-3
    assert np.abs(draw["default"] - draw["negative"]).max() > 1e-3


@pytest.mark.parametrize("sampler, switch", [("euler", 0.8), ("dpmpp_2m", 0.6), ("euler_a", 0.7)])
def test_base_and_refiner_match_diffusers_ensemble(models, sampler, switch):
    """diffusers' documented ensemble: the base to denoising_end with output_type="latent", the
    refiner from denoising_start on those latents, one generator going on through both."""
    _, base, ref_base = models["base"]
    _, refiner, ref_refiner = models["refiner"]
    lat = np.random.default_rng(4).standard_normal((2, 4, H // 8, W // 8)).astype(np.float32)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    handed = scheduled(ref_base, sampler)(PROMPT, negative_prompt="blurry", num_inference_steps=10, guidance_scale=6.0,
                                          width=W, height=H, num_images_per_prompt=2, latents=torch.from_numpy(lat),
                                          denoising_end=switch, output_type="latent", generator=gens).images
    expected = scheduled(ref_refiner, sampler)([PROMPT] * 2, negative_prompt=["blurry"] * 2, image=handed,
                                               num_inference_steps=10, guidance_scale=6.0, denoising_start=switch,
                                               output_type="latent", generator=gens).images.numpy()
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    got = base(PROMPT, negative_prompt="blurry", steps=10, guidance=6.0, width=W, height=H, num_images=2,
               latents=lat, sampler=sampler, refiner=refiner, refiner_switch_at=switch, output_type="latent",
               progress=False, generator=gens)
    assert got.shape == expected.shape == (2, 4, H // 8, W // 8)
    # The final latents: |x| reaches 40 with these random U-Nets, where float32 rounding is ~4e-6
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_the_two_calls_by_hand_equal_the_refiner_option(models):
    """denoising_end with output_type="latent", then denoising_start with those latents, one per
    image: what refiner= runs (here past the refiner's largest batch, 2); its PNGs carry
    AUTOMATIC1111's Refiner fields."""
    _, base, _ = models["base"]
    _, refiner, _ = models["refiner"]
    handed = base(PROMPT, seed=5, steps=8, width=W, height=H, num_images=3, denoising_end=0.75, output_type="latent",
                  progress=False)
    assert handed.shape == (3, 4, H // 8, W // 8)
    by_hand = refiner([PROMPT] * 3, seed=[5, 6, 7], steps=8, init_image=handed, denoising_start=0.75,
                      output_type="np", progress=False)
    pngs = base(PROMPT, seed=5, steps=8, width=W, height=H, num_images=3, refiner=refiner, refiner_switch_at=0.75,
                progress=False)
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in pngs]), (by_hand * 255).round().astype(np.uint8))
    png = pngs[0]
    text = png.info["parameters"]
    assert f"Refiner: refiner [{refiner.manifest.model.weights_sha256[:10]}], Refiner switch at: 0.75" in text
    assert f"Model hash: {base.manifest.model.weights_sha256[:10]}, Model: base" in text


def test_refiner_defaults_switch_at_0_8(models):
    _, base, _ = models["base"]
    _, refiner, _ = models["refiner"]
    [png] = base(PROMPT, seed=1, steps=5, width=W, height=H, refiner=refiner, progress=False)
    assert "Refiner switch at: 0.8" in png.info["parameters"]


@pytest.mark.parametrize("kwargs, message", [
    ({"refiner_switch_at": 0.8}, "give the refiner too"),
    ({"refiner": "refiner"}, "refiner must be a loaded Pipeline"),
    ({"refiner": True, "refiner_switch_at": 1.5}, "from 0 (the refiner draws it all) to 1 (it draws nothing), "
                                                   "got 1.5"),
    ({"refiner": True, "denoising_end": 0.5}, "leave denoising_start and denoising_end out"),
    ({"refiner": True, "hires_scale": 2}, "a refiner does not go with masks, the hires fix or ControlNets"),
    ({"refiner": True, "sampler": "heun"}, "two U-Net calls a step"),
    ({"refiner": True, "aesthetic_score": "high"}, "aesthetic_score must be a number"),
    ({"refiner": True, "width": 1024}, "width 1024 is outside this engine's range"),
    ({"denoising_start": 0.5}, "give them as init_image"),
    ({"denoising_start": 0.5, "init_image": np.zeros((1, 4, 12, 16), np.float32),
      "latents": np.zeros((1, 4, 12, 16), np.float32)}, "leave latents out"),
    ({"denoising_start": 0.6, "denoising_end": 0.5, "init_image": np.zeros((1, 4, 12, 16), np.float32)},
     "denoising_start (0.6) must be less than denoising_end (0.5)"),
    ({"denoising_end": 0.5, "hires_scale": 2}, "denoising_start / denoising_end does not go with masks"),
    ({"aesthetic_score": 6.0}, "this engine's model takes none"),
])
def test_refiner_errors(models, kwargs, message):
    _, base, _ = models["base"]
    if kwargs.get("refiner") is True:
        kwargs["refiner"] = models["refiner"][1]
    size = {"width": kwargs.pop("width", W), "height": H} if "init_image" not in kwargs else {}
    with pytest.raises(InvalidRequest) as e:
        base(PROMPT, steps=kwargs.pop("steps", 6), progress=False, **size, **kwargs)
    assert message in str(e.value)


def test_refiner_refuses_networks_made_for_base_models(models, tmp_path):
    folder, _, _ = models["refiner"]
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(ModelSourceError) as e:
        export_engine(str(folder), tmp_path / "e", ExportConfig(loras=((str(lora), 1.0),)))
    assert "is an SDXL refiner; --lora is not offered for refiners" in str(e.value)


def test_ldm_run_refiner_and_from_png(models, tmp_path, capsys):
    from ldm_deploy.cli import run as run_cli

    _, base, _ = models["base"]
    _, refiner, _ = models["refiner"]
    out, again, plain = tmp_path / "a.png", tmp_path / "again.png", tmp_path / "plain.png"
    args = ["--engine", str(base.engine_dir), PROMPT, "--steps", "6", "--width", str(W), "--height", str(H),
            "--seed", "4", "--sampler", "euler", "-q"]
    assert run_cli.main(args + ["--refiner", str(refiner.engine_dir), "--refiner-switch-at", "0.7",
                                "--aesthetic-score", "7", "--out", str(out)]) == 0
    api = base(PROMPT, steps=6, width=W, height=H, seed=4, sampler="euler", refiner=refiner, refiner_switch_at=0.7,
               aesthetic_score=7.0, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))
    # drawn again from its PNG: the switch read back (the aesthetic score is not written, as in AUTOMATIC1111)
    assert run_cli.main(["--engine", str(base.engine_dir), "--from-png", str(out), "--refiner",
                         str(refiner.engine_dir), "--aesthetic-score", "7", "--out", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(api))
    capsys.readouterr()
    assert run_cli.main(["--engine", str(base.engine_dir), "--from-png", str(out), "--out", str(plain), "-q"]) == 0
    assert "finished by the refiner refiner [" in capsys.readouterr().err  # and drawn without it
    assert "Refiner" not in Image.open(plain).info["parameters"]
    assert run_cli.main(args + ["--refiner-switch-at", "0.5", "--out", str(plain)]) == 2
    assert "give --refiner ENGINE too" in capsys.readouterr().err


def test_export_cli_takes_a_refiner_folder(models, tmp_path):
    from ldm_deploy.cli import export as export_cli

    folder, pipe, _ = models["refiner"]
    assert export_cli.main(["--model", str(folder), "--out", str(tmp_path / "e"), "--min-size", "64",
                            "--max-size", "128"]) == 0
    again = Pipeline.load(tmp_path / "e")
    assert again.manifest.model.aesthetic
    np.testing.assert_array_equal(
        again(PROMPT, init_image=photo(3), strength=0.5, steps=3, seed=2, output_type="np", progress=False),
        pipe(PROMPT, init_image=photo(3), strength=0.5, steps=3, seed=2, output_type="np", progress=False))


def test_served_refiner_checkpoint(models):
    """AUTOMATIC1111's API: refiner_checkpoint names another served engine, refiner_switch_at where it
    takes over; the image is the API's with that refiner."""
    from serve_http import call, running, unb64

    from ldm_deploy.serve.engines import Engines

    _, base, _ = models["base"]
    _, refiner, _ = models["refiner"]
    engines = Engines.read([base.engine_dir, refiner.engine_dir], lambda d, verify=True: Pipeline.load(d, verify=verify),
                           keep=2)
    with running(engines) as server:
        url = server.url + "/sdapi/v1/txt2img"
        body = {"prompt": PROMPT, "steps": 6, "seed": 3, "width": W, "height": H, "sampler_name": "Euler",
                "refiner_checkpoint": "refiner", "refiner_switch_at": 0.7}
        status, answer, _ = call(url, "POST", body)
        assert status == 200, answer
        api = base(PROMPT, steps=6, seed=3, width=W, height=H, sampler="euler", guidance=7.0, refiner=refiner,
                   refiner_switch_at=0.7, prompt_weighting=True, progress=False)[0]
        served = unb64(answer["images"][0])
        assert np.array_equal(np.asarray(served), np.asarray(api))
        assert f"Refiner: refiner [{refiner.manifest.model.weights_sha256[:10]}], Refiner switch at: 0.7" in \
            served.info["parameters"]
        status, answer, _ = call(url, "POST", {**body, "refiner_checkpoint": "nowhere"})
        assert status == 422 and "checkpoint 'nowhere' is not served here" in json.dumps(answer)
        status, answer, _ = call(url, "POST", {**body, "refiner_checkpoint": "None"})  # A1111's "no refiner"
        assert status == 200 and "Refiner" not in unb64(answer["images"][0]).info["parameters"]
        status, answer, _ = call(url, "POST", {**body, "refiner_checkpoint": "base"})  # the request's own model
        assert status == 200 and "Refiner" not in unb64(answer["images"][0]).info["parameters"]
        # no refiner_switch_at: AUTOMATIC1111's API switches before the first step
        status, answer, _ = call(url, "POST", {k: v for k, v in body.items() if k != "refiner_switch_at"})
        alone = refiner(PROMPT, steps=6, seed=3, width=W, height=H, sampler="euler", guidance=7.0,
                        prompt_weighting=True, progress=False)[0]
        assert status == 200 and np.array_equal(np.asarray(unb64(answer["images"][0])), np.asarray(alone))
    one = Engines.read([base.engine_dir, refiner.engine_dir], lambda d, verify=True: Pipeline.load(d, verify=verify))
    with running(one) as server:
        status, answer, _ = call(server.url + "/sdapi/v1/txt2img", "POST", body)
        assert status == 422 and "--keep-loaded 2" in json.dumps(answer)


def test_ldm_run_refiner_given_as_a_model_is_exported_to_the_cache(models, tmp_path, monkeypatch, capsys):
    from ldm_deploy.cli import run as run_cli

    monkeypatch.setenv("LDM_DEPLOY_CACHE", str(tmp_path / "cache"))
    folder, refiner, _ = models["refiner"]
    _, base, _ = models["base"]
    out = tmp_path / "a.png"
    args = ["--engine", str(base.engine_dir), PROMPT, "--steps", "4", "--width", "256", "--height", "256",
            "--seed", "1", "--sampler", "euler", "-q", "--out", str(out)]
    assert run_cli.main(args + ["--refiner", str(folder)]) == 0, capsys.readouterr().err
    assert list((tmp_path / "cache" / "engines").iterdir())[0].name.startswith("refiner-")
    api = base(PROMPT, steps=4, width=256, height=256, seed=1, sampler="euler", refiner=refiner, progress=False)[0]
    assert np.abs(np.asarray(Image.open(out)).astype(int) - np.asarray(api)).max() <= 1  # the same weights
    capsys.readouterr()
    assert run_cli.main(args + ["--refiner", str(tmp_path / "nowhere")]) == 2
    assert f"--refiner {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    # a sampler the switch would split: said before the refiner's export (and the base's load)
    shutil.rmtree(tmp_path / "cache")
    assert run_cli.main(args[:-5] + ["--sampler", "dpmpp_2s_a", "--refiner", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "--sampler dpmpp_2s_a takes two U-Net calls a step" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_any_model_of_the_family_refines_and_others_are_refused(models, pipelines, caplog):
    """As in AUTOMATIC1111, the refiner may be any model of the family, and the base's own model
    is no refiner (the walk is not switched); one of another latent space is refused, as are
    aesthetic scores for a refiner that takes none."""
    _, base, _ = models["base"]
    _, other, _ = models["other"]
    kwargs = dict(steps=6, seed=2, width=W, height=H, sampler="euler", progress=False)
    [alone] = base(PROMPT, **kwargs)
    with caplog.at_level("WARNING"):
        [same] = base(PROMPT, **kwargs, refiner=Pipeline.load(base.engine_dir), refiner_switch_at=0.5)
    assert np.array_equal(np.asarray(alone), np.asarray(same)) and "Refiner" not in same.info["parameters"]
    assert "the refiner given is this engine's own model (the same weights)" in caplog.text  # (said, not silent)
    [refined] = base(PROMPT, **kwargs, refiner=other, refiner_switch_at=0.5)
    handed = base(PROMPT, **kwargs, denoising_end=0.5, output_type="latent")
    by_hand = other(PROMPT, steps=6, seed=2, sampler="euler", init_image=handed, denoising_start=0.5,
                    output_type="np", progress=False)
    assert np.array_equal(np.asarray(refined), (by_hand[0] * 255).round().astype(np.uint8))
    assert "Refiner: other [" in refined.info["parameters"]
    with pytest.raises(InvalidRequest, match="this refiner's model takes none"):
        base(PROMPT, **kwargs, refiner=other, aesthetic_score=7.0)
    with pytest.raises(InvalidRequest, match="draws in another latent space"):
        base(PROMPT, **kwargs, refiner=pipelines["tiny-sd1"])


def test_a_switch_that_leaves_one_model_no_step_lets_the_other_draw_alone(models, caplog):
    """AUTOMATIC1111 never switches where the base's part is the whole walk (1, or 4 LCM steps at
    0.8: timesteps 999..259), and switches before the first step where it is empty (0, or img2img
    at a low strength, whose first step is past the switch): then the refiner draws it all."""
    _, base, _ = models["base"]
    _, refiner, _ = models["refiner"]
    kwargs = dict(steps=4, seed=3, width=W, height=H, output_type="np", progress=False)
    for sampler, at in (("euler", 1.0), ("lcm", 0.8)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            np.testing.assert_array_equal(base(PROMPT, sampler=sampler, refiner=refiner, refiner_switch_at=at,
                                               **kwargs), base(PROMPT, sampler=sampler, **kwargs))
        # said where a switch was asked for (1: never, as asked)
        assert ("a switch at 0.8 leaves it none of this 4-step lcm walk" in caplog.text) == (at < 1)
    np.testing.assert_array_equal(base(PROMPT, sampler="euler", refiner=refiner, refiner_switch_at=0.0, **kwargs),
                                  refiner(PROMPT, sampler="euler", **kwargs))
    image = photo(5)
    low = dict(steps=30, seed=3, init_image=image, strength=0.2, sampler="euler", progress=False)
    [refined], [alone] = base(PROMPT, refiner=refiner, **low), refiner(PROMPT, **low)
    np.testing.assert_array_equal(np.asarray(refined), np.asarray(alone))
    louder = {**low, "noise_multiplier": 1.1}  # AUTOMATIC1111's img2img noise multiplier goes with it
    [refined_louder], [alone_louder] = base(PROMPT, refiner=refiner, **louder), refiner(PROMPT, **louder)
    np.testing.assert_array_equal(np.asarray(refined_louder), np.asarray(alone_louder))
    assert not np.array_equal(np.asarray(refined_louder), np.asarray(refined))
    text = refined.info["parameters"]  # as AUTOMATIC1111 writes it: the base's model, switched at once
    assert f"Model hash: {base.manifest.model.weights_sha256[:10]}, Model: base" in text
    assert "Refiner: refiner [" in text and "Refiner switch at: 0.8" in text


def test_variations_go_on_into_the_refiner(models):
    """Variation seeds vary the base's start noise; the refiner's part starts from its latents, and
    where it draws alone it varies its own start noise as the base would have."""
    _, base, _ = models["base"]
    _, refiner, _ = models["refiner"]
    kwargs = dict(steps=4, seed=3, width=W, height=H, sampler="euler", output_type="np", progress=False,
                  variation_seed=8, variation_strength=0.3, num_images=2)
    handed = base(PROMPT, denoising_end=0.5, **{**kwargs, "output_type": "latent"})
    by_hand = refiner([PROMPT] * 2, seed=[3, 3], steps=4, sampler="euler", init_image=handed, denoising_start=0.5,
                      output_type="np", progress=False)
    np.testing.assert_array_equal(base(PROMPT, refiner=refiner, refiner_switch_at=0.5, **kwargs), by_hand)
    np.testing.assert_array_equal(base(PROMPT, refiner=refiner, refiner_switch_at=0.0, **kwargs),
                                  refiner(PROMPT, **kwargs))
    assert not np.array_equal(refiner(PROMPT, **kwargs), refiner(PROMPT, **{**kwargs, "variation_strength": 0.0,
                                                                            "variation_seed": None}))


def test_prompt_editing_counts_the_refiners_steps_from_the_walks_start():
    """The refiner's part of a walk of 10 steps, switched at 0.8, is its steps 8 and 9: there
    [dog:cat:0.5] reads "cat", as AUTOMATIC1111's step counter, which runs on across the switch."""
    from ldm_deploy.engine import text
    from ldm_deploy.engine.request import Request

    req = Request(prompts=("a [dog:cat:0.5]",), negative_prompts=("",), seeds=(1,), steps=10, guidance=7.0,
                  sampler="euler", width=64, height=64, strength=1.0, prompt_weighting=True)
    assert text.step_texts(["", "a [dog:cat:0.5]"], req, 2, offset=8) == [("", "a cat")] * 2
    assert text.step_texts(["", "a [dog:cat:0.5]"], req, 2) == [("", "a dog")] * 2


def test_embeddings_the_refiner_lacks_are_said_once(caplog):
    """The base's embedding words in a prompt, which a refiner without them reads as plain words."""
    from types import SimpleNamespace

    from ldm_deploy.engine.refine import warn_embeddings

    base = SimpleNamespace(embeddings=({"word": "xlemb"}, {"word": "style-a"}))
    refiner = SimpleNamespace(manifest=SimpleNamespace(model=SimpleNamespace(embeddings=({"word": "style-a"},))),
                              warned=set())
    req = SimpleNamespace(prompts=("a xlemb fox, style-a",), negative_prompts=("",))
    with caplog.at_level(logging.WARNING):
        warn_embeddings(base, refiner, req)
        warn_embeddings(base, refiner, req)
    assert caplog.text.count("the refiner does not hold the embedding xlemb (") == 1
    caplog.clear()
    warn_embeddings(base, SimpleNamespace(manifest=refiner.manifest, warned=set()),
                    SimpleNamespace(prompts=("a xlembed fox",), negative_prompts=("",)))
    assert not caplog.text  # (another word)
