"""AUTOMATIC1111's generation parameters read back (`ldm-run --from-png`): its format as it
documents and writes it, and our own PNGs drawn again to the pixel."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from ldm_deploy.cli import run as run_cli
from ldm_deploy.engine.infotext import AYS, model_warning, parse, sampler_fields, settings, upscaler_warning
from ldm_deploy.engine.manifest import ModelInfo
from ldm_deploy.engine.samplers import NoiseSchedule
from ldm_deploy.errors import UserError


def model_info(weights: str, checkpoint: str = "", loras: tuple = ()) -> ModelInfo:
    """An SD 1.x engine's ModelInfo with these hashes and merged LoRAs."""
    return ModelInfo(family="sd1", source="dreamshaper_8.safetensors", weights_sha256=weights,
                     prediction_type="epsilon", vae_scaling_factor=0.18215, latent_channels=4, text_length=77,
                     text_width=768, sample_size=64, noise_schedule=NoiseSchedule(), checkpoint_sha256=checkpoint,
                     loras=loras)

A1111 = ("masterpiece, a cat\non a (red:1.2) sofa\n"
         "Negative prompt: blurry, lowres\nworst quality\n"
         'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, '
         'Model hash: abcdef1234, Model: dreamshaper_8, Denoising strength: 0.5, Clip skip: 2, '
         'Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (nearest-exact), '
         'Lora hashes: "detail: 0123456789ab, style: ba9876543210", ENSD: 31337, Version: v1.10.1')


def test_parse_reads_automatic1111s_format():
    prompt, negative, fields = parse(A1111)
    assert prompt == "masterpiece, a cat\non a (red:1.2) sofa"
    assert negative == "blurry, lowres\nworst quality"
    assert fields["Lora hashes"] == "detail: 0123456789ab, style: ba9876543210"  # unquoted
    assert fields["Size"] == "512x768" and fields["Version"] == "v1.10.1" and len(fields) == 16
    assert parse("just a prompt\nNegative prompt: x") == ("just a prompt", "x", {})  # no field line
    assert parse("a: b, c\nSteps: 2") == ("a: b, c\nSteps: 2", "", {})  # under three fields: prompt


def test_settings_map_fields_to_options_and_say_what_differs():
    out, warnings = settings(parse(A1111)[2])
    assert model_warning(parse(A1111)[2], model_info("abcdef1234" + "0" * 54)) is None
    assert out == {"steps": 20, "guidance": 7.0, "seed": 1234, "width": 512, "height": 768, "clip_skip": 2,
                   "sampler": "dpmpp_2m_karras", "hires_scale": 2.0, "hires_steps": 10, "hires_strength": 0.5,
                   "hires_upscaler": "Latent (nearest-exact)"}
    # (its default noise source, the GPU's, writes no RNG field: said, as the image differs)
    assert warnings == ["the PNG names no noise source (RNG), so AUTOMATIC1111 drew its noise on the GPU, its default "
                        "source; here seeds draw its CPU source's noise (RNG: CPU), so the image will differ",
                        "the image's ENSD is not taken here, so the image may differ"]
    assert settings({**parse(A1111)[2], "RNG": "CPU"})[1] == warnings[1:]
    fields = {"Sampler": "Euler a", "Steps": "4", "Seed": "1", "Denoising strength": "0.3", "Emphasis": "None",
              "Model hash": "0123456789", "Hires upscale": "1.5", "Hires upscaler": "R-ESRGAN 4x+"}
    out, warnings = settings(fields | {"Steps": "many"}, given={"steps"})  # overridden: not read
    assert out == {"seed": 1, "prompt_weighting": False, "sampler": "euler_a", "hires_scale": 1.5,
                   "hires_strength": 0.3, "hires_upscaler": "R-ESRGAN 4x+"}
    # an upscale model: Lanczos stands in where the engine holds none of that name
    assert "hires upscaler 'R-ESRGAN 4x+' is not offered by this engine (one of Lanczos, Latent, " \
        in upscaler_warning(fields, out["hires_upscaler"], {})
    assert upscaler_warning(fields, out["hires_upscaler"], {"R-ESRGAN 4x+": {}}) is None
    assert upscaler_warning(fields, "Latent", {}) is None
    assert "drawn by a model with hash 0123456789 (unnamed); this engine's is ffffffffff" in \
        model_warning(fields, model_info("f" * 64))
    # AUTOMATIC1111 1.9's "Automatic" schedule is the sampler's own: Karras for DPM++ 2M
    assert settings({"Sampler": "DPM++ 2M", "Schedule type": "Automatic"})[0] == {"sampler": "dpmpp_2m_karras"}
    assert settings({"Sampler": "DPM++ 2M"})[0] == {"sampler": "dpmpp_2m"}  # before 1.9: uniform
    assert settings({"Denoising strength": "0.4", "Steps": "2", "Seed": "3"})[0]["strength"] == 0.4
    assert settings({"Sampler": "DPM++ 2M SDE", "Schedule type": "Automatic"})[0] == \
        {"sampler": "dpmpp_2m_sde_exponential"}  # its own: Exponential
    assert settings({"Sampler": "DPM++ 2S a", "Schedule type": "Automatic"})[0] == {"sampler": "dpmpp_2s_a_karras"}
    with pytest.raises(UserError, match=r"sampler 'LMS Karras' is not offered here; pass --sampler"):
        settings({"Sampler": "LMS", "Schedule type": "Karras"})
    assert settings({"Sampler": "DPM++ 2M", "Schedule type": "Exponential"}, given={"sampler"})[0] == {}
    with pytest.raises(UserError, match="the image's Steps is 'twenty', not a number"):
        settings({"Steps": "twenty"})
    cpu = {"RNG": "CPU"}  # (its CPU noise, ours)
    assert settings({"Mask blur": "4", **cpu}) == ({"mask_blur": 4.0}, [])  # AUTOMATIC1111's inpainting field
    assert settings({"Noise multiplier": "1.05", **cpu}) == ({"noise_multiplier": 1.05}, [])  # its img2img one
    # AUTOMATIC1111's UniPC is another variant than ours: read, with a warning; ours is ours
    out, warnings = settings({"Sampler": "UniPC", "Schedule type": "Karras"})
    assert out == {"sampler": "unipc_karras"} and "another variant" in warnings[0]
    assert settings({"Sampler": "UniPC", "Version": "ldm-deploy 0.1.0"}) == ({"sampler": "unipc"}, [])
    # so are its DPM2s (one noise level dropped) and DPM++ SDE (its Brownian noise drawn on its GPU)
    out, warnings = settings({"Sampler": "DPM2 a", "Schedule type": "Karras"})
    assert out == {"sampler": "dpm2_a_karras"} and "next-to-last noise level" in warnings[0]
    out, warnings = settings({"Sampler": "DPM++ SDE", "Schedule type": "Automatic"})
    assert out == {"sampler": "dpmpp_sde_karras"} and "Brownian noise" in warnings[0]
    out, warnings = settings({"Sampler": "DPM++ 3M SDE", "Schedule type": "Automatic"})
    assert out == {"sampler": "dpmpp_3m_sde_exponential"} and "diffusers' fresh noise" in warnings[0]
    assert "Brownian tree" in settings({"Sampler": "DPM++ 2M SDE Karras"})[1][0]
    assert settings({"Sampler": "DPM++ 2M Karras", **cpu}) == ({"sampler": "dpmpp_2m_karras"}, [])
    assert settings({"Sampler": "DPM++ 2M SDE Heun", **cpu})[1] == [  # named as the image names it
        "the image's DPM++ 2M SDE Heun is AUTOMATIC1111's, whose noise comes from a Brownian tree, where ours is "
        "diffusers' fresh noise each step, so the image will differ"]
    assert "timesteps are spaced otherwise" in settings({"Sampler": "LCM"})[1][0]
    out, warnings = settings({"Sampler": "Euler", "Schedule type": "SGM Uniform"})
    assert out == {"sampler": "euler_sgm_uniform"} and "near, so the image will differ a little" in warnings[0]
    assert settings({"Sampler": "DPM++ SDE", "Version": "ldm-deploy 0.1.0"}) == ({"sampler": "dpmpp_sde"}, [])
    # "Align Your Steps" (its 1.10+): its walk is near ours, not the same
    out, warnings = settings({"Sampler": "DPM++ 2M", "Schedule type": "Align Your Steps", **cpu})
    assert out == {"sampler": "dpmpp_2m_ays"} and warnings == [
        f"the image's Align Your Steps schedule is AUTOMATIC1111's, {AYS}"]
    assert settings({"Sampler": "Euler Align Your Steps", "Version": "ldm-deploy 0.1.0"}) == ({"sampler": "euler_ays"}, [])
    # but its DPM++ 3M SDE drops the next-to-last level, sigma_min: our walk; only its noise differs
    assert settings({"Sampler": "DPM++ 3M SDE", "Schedule type": "Align Your Steps", **cpu})[1] == [
        "the image's DPM++ 3M SDE is AUTOMATIC1111's, whose noise comes from a Brownian tree, where "
        "ours is diffusers' fresh noise each step, so the image will differ"]
    assert sampler_fields("DPM++ 2M Align Your Steps") == {"Sampler": "DPM++ 2M Align Your Steps"}
    # "Beta" (its 1.10+), as a field and in the name
    assert settings({"Sampler": "DPM++ 2M", "Schedule type": "Beta", **cpu}) == ({"sampler": "dpmpp_2m_beta"}, [])
    assert settings({"Sampler": "Euler Beta", **cpu}) == ({"sampler": "euler_beta"}, [])
    assert sampler_fields("DPM++ 2M SDE Beta") == {"Sampler": "DPM++ 2M SDE Beta"}
    # with the distribution it writes: ours read quietly, another one warned about (Forge: "Beta scheduler")
    beta = {"Sampler": "Euler", "Schedule type": "Beta", **cpu}
    assert settings({**beta, "Beta schedule alpha": "0.6", "Beta schedule beta": "0.6"}) == ({"sampler": "euler_beta"}, [])
    assert settings({**beta, "Beta schedule alpha": "0.5", "Beta scheduler beta": "0.7"})[1] == [
        "the image's Beta schedule has alpha 0.5 and beta 0.7; here it is Beta(0.6, 0.6) (AUTOMATIC1111's default, "
        "and diffusers'), so the image will differ"]
    assert "has alpha 0.6 and beta x" in settings({**beta, "Beta schedule beta": "x"})[1][0]
    assert "has alpha 0.9 and beta 0.6" in settings({**beta, "Beta schedule alpha": "0.6", "Beta scheduler alpha": "0.9"})[1][0]
    assert settings({**beta, "Schedule type": "Karras", "Beta schedule alpha": "0.5"})[1] == []  # not drawn with it


def test_a_png_draws_again_to_the_pixel(engine_dirs, tmp_path, capsys, caplog):
    engine = str(engine_dirs["tiny-sd1"])
    first = tmp_path / "a.png"
    assert run_cli.main(["a (lighthouse:1.2) [at dusk|at dawn]", "--engine", engine, "--steps", "3",
                         "--sampler", "heun", "--clip-skip", "2", "--seed", "5", "--width", "96", "--height", "64",
                         "--negative-prompt", "fog, rain", "--hires-scale", "2", "--hires-upscaler", "latent",
                         "--hires-steps", "2", "--out", str(first), "-q"]) == 0, capsys.readouterr().err
    again = tmp_path / "b.png"
    with caplog.at_level(logging.WARNING):
        assert run_cli.main(["--from-png", str(first), "--engine", engine, "--out", str(again), "-q"]) == 0
    assert not caplog.text  # nothing it cannot take
    a, b = Image.open(first), Image.open(again)
    assert a.info["parameters"] == b.info["parameters"] and a.size == (192, 128)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Options given override the image's; the prompt too.
    assert run_cli.main(["a tree", "--from-png", str(first), "--engine", engine, "--steps", "2",
                         "--out", str(again), "-q"]) == 0
    text = Image.open(again).info["parameters"]
    assert text.startswith("a tree\nNegative prompt: fog, rain\nSteps: 2, Sampler: Heun") and "Clip skip: 2" in text


def test_each_image_of_a_masked_batch_draws_again_with_its_crop(engine_dirs, tmp_path, capsys, caplog):
    """Image 2 of an inpainted batch of 3 (seed 7, the second call on an engine of batch 2) drawn
    again from its PNG, which gives its seed and Only masked's padding (--mask-crop) and Mask blur
    back, to the pixel and without a warning."""
    engine = str(engine_dirs["tiny-sd1"])
    y, x = np.mgrid[0:96, 0:128]
    Image.fromarray(np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8)).save(tmp_path / "init.png")
    Image.fromarray(((abs(x - 70) < 20) & (abs(y - 40) < 16)).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    images = ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]
    assert run_cli.main(["a red door", *images, "--engine", engine, "--steps", "3", "--sampler", "euler_a",
                         "--seed", "5", "--num-images", "3", "--mask-crop", "8", "--mask-blur", "2", "--width", "64",
                         "--height", "64", "--strength", "0.7", "--out", str(tmp_path / "a.png"), "-q"]) == 0, \
        capsys.readouterr().err
    first = tmp_path / "a-2.png"
    assert "Seed: 7," in Image.open(first).info["parameters"]
    assert "Inpaint area: Only masked, Masked area padding: 8" in Image.open(first).info["parameters"]
    again = tmp_path / "b.png"
    with caplog.at_level(logging.WARNING):
        assert run_cli.main(["--from-png", str(first), *images, "--engine", engine, "--out", str(again), "-q"]) == 0
    assert not caplog.text
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert settings({"Inpaint area": "Only masked"})[0] == {"mask_crop": 32}  # AUTOMATIC1111's default padding
    # the ControlNet extension's older fields: lowercase, starting/ending as a pair
    older = "preprocessor: canny, model: control_canny [abcd1234], weight: 0.5, starting/ending: (0.1, 0.9)"
    assert settings({"ControlNet 0": older})[0]["png_controls"] == {0: (0.5, 0.1, 0.9)}
    # --mask-crop none: the whole picture, over the PNG's Only masked
    assert run_cli.main(["--from-png", str(first), *images, "--engine", engine, "--mask-crop", "none", "--out",
                         str(again), "-q"]) == 0
    assert "Inpaint area" not in Image.open(again).info["parameters"]


def test_a_pngs_bad_value_is_said_to_be_the_pngs(engine_dirs, tmp_path, capsys):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 0, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Version: ldm-deploy")
    Image.new("RGB", (64, 64)).save(tmp_path / "bad.png", pnginfo=info)
    code = run_cli.main(["--from-png", str(tmp_path / "bad.png"), "--engine", str(engine_dirs["tiny-sd1"]), "-q"])
    assert code == 2 and "--steps (the PNG's) must be at least 1, got 0" in capsys.readouterr().err


def test_from_png_needs_parameters(engine_dirs, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code = run_cli.main(["--from-png", str(tmp_path / "plain.png"), "--engine", str(engine_dirs["tiny-sd1"])])
    err = capsys.readouterr().err
    assert code == 2 and "it has no generation parameters" in err and "Traceback" not in err
    code = run_cli.main(["--engine", str(engine_dirs["tiny-sd1"])])
    assert code == 2 and "give a prompt, or --from-png" in capsys.readouterr().err


def test_the_model_hash_is_the_checkpoints_and_merged_loras_are_checked_against_the_pngs():
    """AUTOMATIC1111's "Model hash" names the checkpoint whatever VAE and LoRAs went with it (its
    "Lora hashes" name those): an engine with a LoRA merged writes and compares its checkpoint's, and
    says where it merges a LoRA the image was not drawn with."""
    detail = {"name": "detail", "weight": 0.7, "sha256": "9" * 64, "a1111_hash": "0123456789ab"}
    merged = model_info("e" * 64, checkpoint="abcdef1234" + "5" * 54, loras=(detail,))
    assert merged.model_hash == "abcdef1234" and model_info("f" * 64).model_hash == "ffffffffff"  # (older: weights')
    fields = parse(A1111)[2]  # (Lora hashes: detail, style)
    assert model_warning(fields, merged) is None
    assert model_warning({k: v for k, v in fields.items() if k != "Lora hashes"}, merged) == (
        "this engine merges the LoRA detail (ldm-export --lora), which the image's Lora hashes do not name: it was "
        "drawn without, so it will differ")
    # named otherwise in the prompt (an alias, a renamed file): its hash is the one
    assert model_warning({**fields, "Lora hashes": "details-v2: 0123456789AB"}, merged) is None
    old = {**detail, "a1111_hash": None}  # (an engine from before LoRAs' hashes: not checked)
    assert model_warning({"Model hash": "abcdef1234"}, model_info("e" * 64, "abcdef1234" + "5" * 54, (old,))) is None
    assert "this engine's is abcdef1234" in model_warning({"Model hash": "0000000000"}, merged)
    # ComfyUI's graph names its checkpoint (ckpt_name, maybe in a folder) and hashes nothing: names compared
    plain = model_info("e" * 64)  # (source dreamshaper_8.safetensors)
    assert model_warning({"Model": "sd15\\dreamshaper_8.safetensors"}, plain) is None
    assert "drawn with the checkpoint v1-5-pruned.ckpt; this engine's model is dreamshaper_8" in \
        model_warning({"Model": "v1-5-pruned.ckpt"}, plain)


def test_hires_sampler_fields_as_automatic1111_pastes_them():
    """Its get_hr_sampler_and_scheduler: the hires sampler and schedule type each the first
    pass's where the hires field is missing; hires prompts round-trip through its quoting."""
    from ldm_deploy.engine.hires import quote

    base = {"Sampler": "Euler", "Steps": "4", "Seed": "1", "Hires upscale": "2", "RNG": "CPU"}
    assert settings({**base, "Hires schedule type": "Karras"})[0]["hires_sampler"] == "euler_karras"
    assert settings({**base, "Sampler": "DPM++ 2M", "Schedule type": "Karras",
                     "Hires sampler": "Euler"})[0]["hires_sampler"] == "euler_karras"
    assert "hires_sampler" not in settings(base)[0]
    # a hires sampler whose AUTOMATIC1111 images differ here is warned about as the first pass's is
    out, warnings = settings({**base, "Hires sampler": "DPM2 a", "Hires schedule type": "Karras"})
    assert out["hires_sampler"] == "dpm2_a_karras"
    assert warnings == ["the image's hires sampler DPM2 a is AUTOMATIC1111's, which drops the next-to-last noise "
                        "level of one step more than diffusers' KDPM2 schedulers here, so the image will differ"]
    assert settings({**base, "Sampler": "UniPC", "Hires sampler": "UniPC"})[1] == [  # the same one: once
        "the image's UniPC is AUTOMATIC1111's, which runs another variant (bh1, order 3) than diffusers' UniPC here, "
        "so the image will differ"]
    assert settings({**base, "Hires sampler": "DPM2", "Version": "ldm-deploy 0.1.0"})[1] == []
    # (nor another sampler's with the same reason)
    warnings = settings({**base, "Sampler": "DPM++ 2M SDE", "Hires sampler": "DPM++ 2M SDE Karras"})[1]
    assert len(warnings) == 1 and "Brownian tree" in warnings[0]
    for text in ('"red car"', 'a "b" c, d', "x: y\nz", ' padded ', 'plain'):
        line = f"Steps: 4, Seed: 1, Hires upscale: 2, Hires prompt: {quote(text)}, Hires negative prompt: n"
        out = settings(parse(f"p\n{line}")[2])[0]
        assert (out["hires_prompt"], out["hires_negative_prompt"]) == (text, "n"), text


def test_a_uniform_sampler_with_its_own_schedule_says_uniform(pipelines):
    """AUTOMATIC1111 1.9+ reads "Sampler: DPM++ 2M" alone as its Automatic schedule (Karras): a
    uniform one of those says so; one without such a default, or with a schedule, needs nothing."""
    pipe = pipelines["tiny-sd1"]
    kw = dict(steps=2, width=64, height=64, seed=1, progress=False)
    text = pipe("x", sampler="dpmpp_2m", hires_scale=1.5, hires_sampler="dpmpp_sde", **kw)[0].info["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale" in text
    assert "Hires sampler: DPM++ SDE, Hires schedule type: Uniform" in text
    out, _ = settings(parse(text)[2])
    assert (out["sampler"], out["hires_sampler"]) == ("dpmpp_2m", "dpmpp_sde")
    for sampler in ("dpmpp_2m_karras", "euler"):
        assert "Schedule type" not in pipe("x", sampler=sampler, **kw)[0].info["parameters"]
    # Beta in the name (its 1.10+ reads it so), with its distribution as AUTOMATIC1111 writes it, for
    # either pass
    for first, hires in (("euler_beta", None), ("euler", "dpmpp_2m_beta")):
        text = pipe("x", sampler=first, hires_scale=1.5, hires_sampler=hires, **kw)[0].info["parameters"]
        assert "Beta schedule alpha: 0.6, Beta schedule beta: 0.6" in text
        out, warnings = settings(parse(text)[2])
        assert (out["sampler"], out.get("hires_sampler"), warnings) == (first, hires, [])
    assert "Sampler: Euler Beta," in pipe("x", sampler="euler_beta", **kw)[0].info["parameters"]
    assert "Beta schedule" not in pipe("x", sampler="euler", **kw)[0].info["parameters"]
    # "SGM Uniform" apart, as AUTOMATIC1111 1.9+ writes it (it would cut "Euler a SGM Uniform" at " Uniform")
    text = pipe("x", sampler="euler_a_sgm_uniform", hires_scale=1.5, hires_sampler="dpmpp_2m_karras",
                **kw)[0].info["parameters"]
    assert "Sampler: Euler a, Schedule type: SGM Uniform, CFG scale" in text
    assert "Hires sampler: DPM++ 2M Karras," in text  # its schedule in its name: not the first pass's
    out, _ = settings(parse(text)[2])
    assert (out["sampler"], out["hires_sampler"]) == ("euler_a_sgm_uniform", "dpmpp_2m_karras")
    for hires in ("euler", "ddim"):  # no schedule in its name: said apart, not read as the first pass's
        text = pipe("x", sampler="euler_a_sgm_uniform", hires_scale=1.5, hires_sampler=hires, **kw)[0].info["parameters"]
        assert "Hires schedule type: Uniform" in text
        assert settings(parse(text)[2])[0]["hires_sampler"] == hires
