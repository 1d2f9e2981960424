"""ComfyUI's PNGs read back (`ldm-run --from-png`): its graph, in the API format it writes into the
`prompt` text chunk, drawn as the same settings given on the command line draw."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_deploy.cli import run as run_cli
from ldm_deploy.engine import comfyui
from ldm_deploy.engine.infotext import settings
from ldm_deploy.errors import UserError


def graph(**sampler) -> dict:
    """ComfyUI's default text-to-image graph (as its "Save (API Format)" writes it)."""
    inputs = {"seed": 5, "steps": 3, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0,
              "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], **sampler}
    return {
        "3": {"class_type": "KSampler", "inputs": inputs},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SD1.5/dreamshaper_8.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "fog, rain", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def test_its_text_to_image_graph_reads_as_automatic1111s_fields():
    prompt, negative, fields, warnings = comfyui.read(json.dumps(graph()))
    assert (prompt, negative) == ("a lighthouse at dusk", "fog, rain")
    assert fields == {"Steps": "3", "CFG scale": "6.5", "Seed": "5", "Size": "96x64", "Version": "ComfyUI",
                      "Sampler": "DPM++ 2M Karras", "Model": "dreamshaper_8"}
    assert warnings == [comfyui.NEAR]
    out, more = settings(fields)
    assert out == {"steps": 3, "guidance": 6.5, "seed": 5, "width": 96, "height": 64, "sampler": "dpmpp_2m_karras"}
    assert more == []  # (AUTOMATIC1111's sampler reasons are not ComfyUI's)
    for name, scheduler, ours in (("euler_ancestral", "normal", "euler_a"), ("uni_pc", "exponential", "unipc_exponential"),
                                  ("dpmpp_3m_sde_gpu", "sgm_uniform", "dpmpp_3m_sde_sgm_uniform"),
                                  ("dpm_2_ancestral", "beta", "dpm2_a_beta"), ("ddim", "karras", "euler_karras"),
                                  ("euler", "simple", "euler_sgm_uniform"), ("lcm", "sgm_uniform", "lcm"),
                                  ("dpmpp_2s_ancestral", "karras", "dpmpp_2s_a_karras")):
        fields = comfyui.read(json.dumps(graph(sampler_name=name, scheduler=scheduler)))[2]
        assert settings(fields)[0]["sampler"] == ours, name


def test_what_it_reads_only_in_part_is_warned_about():
    g = graph(denoise=0.8, positive=["10", 0], model=["11", 0])
    g["5"]["inputs"]["batch_size"] = 4
    g["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a (red:1.3) house", "clip": ["11", 1]}}
    g["11"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors", "strength_model": 0.7,
                                                      "strength_clip": 0.7, "model": ["4", 0], "clip": ["4", 1]}}
    g["12"] = {**g["3"], "inputs": {**g["3"]["inputs"], "latent_image": ["13", 0]}}  # a second pass
    g["13"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "scale_by": 1.5}}
    prompt, _, fields, warnings = comfyui.read(json.dumps(g))
    assert prompt == "a (red:1.3) house <lora:detail:0.7>" and fields["Model"] == "dreamshaper_8"
    said = " | ".join(warnings)
    for part in ("toward the empty prompt's embedding", "its batch of 4 drew one noise for all",
                 "its denoise is 0.8", "samples 2 times; only node 3's", "LatentUpscaleBy is not drawn"):
        assert part in said, part
    advanced = graph()
    advanced["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{k: v for k, v in graph()["3"]["inputs"].items() if k not in ("seed", "denoise")},
        "noise_seed": 11, "add_noise": "enable", "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}}
    _, _, fields, warnings = comfyui.read(json.dumps(advanced))
    assert fields["Seed"] == "11" and "draws part of a walk" in warnings[-1]


def test_what_it_cannot_read_is_left_to_the_command_line():
    """A sampler or scheduler not offered, or a prompt not a CLIPTextEncode's: refused by name
    unless given; a graph with no text-to-image pass, or not a graph: refused."""
    for sampler, scheduler in (("dpm_fast", "normal"), ("euler", "kl_optimal"), ("euler_ancestral", "karras"),
                               (["12", 0], "normal")):
        fields = comfyui.read(json.dumps(graph(sampler_name=sampler, scheduler=scheduler)))[2]
        with pytest.raises(UserError, match="is not offered here; pass --sampler"):
            settings(fields)
        assert "sampler" not in settings(fields, given={"sampler"})[0]
    g = graph()
    g["6"]["class_type"] = "ConditioningSetArea"
    prompt, negative, _, warnings = comfyui.read(json.dumps(g))
    assert prompt is None and negative == "fog, rain"
    assert "its positive conditioning is not a CLIPTextEncode's text (it comes from ConditioningSetArea): not read" \
        in warnings
    g = graph()
    g["6"]["inputs"]["text"] = ["30", 0]  # its text from a PrimitiveNode
    g["30"] = {"class_type": "PrimitiveNode", "inputs": {"value": "a house"}}
    prompt, _, _, warnings = comfyui.read(json.dumps(g))
    assert prompt is None
    assert "its positive CLIPTextEncode's text is not written in it (it comes from PrimitiveNode): not read" in warnings
    g = graph(steps="x", cfg=None, seed=["20", 0])
    g["5"]["inputs"] = None
    _, _, fields, warnings = comfyui.read(json.dumps(g))
    assert not {"Steps", "CFG scale", "Seed", "Size"} & set(fields)
    assert ["its steps is 'x'", "its cfg is missing", "its seed is wired from node 20", "its width is missing"] == [
        w.split(",")[0] for w in warnings[1:5]]
    g = graph(latent_image=["8", 0])
    with pytest.raises(UserError, match="no KSampler starting from an EmptyLatentImage"):
        comfyui.read(json.dumps(g))
    for chunk in ("{", "[1, 2]", "a photo of a cat"):  # (another tool's "prompt" chunk)
        with pytest.raises(UserError, match="not ComfyUI's graph"):
            comfyui.read(chunk)
    g = graph()
    g["4"]["inputs"]["ckpt_name"], g["9"]["class_type"], g["6"]["inputs"] = 5, None, None
    g["3"]["inputs"]["denoise"], g["5"]["inputs"]["batch_size"] = None, "x"
    prompt, _, fields, warnings = comfyui.read(json.dumps(g))  # malformed, not a traceback
    assert prompt is None and "Model" not in fields and len(warnings) == 5


def test_a_comfyui_png_draws_what_its_settings_draw(engine_dirs, tmp_path, capsys):
    engine = str(engine_dirs["tiny-sd1"])
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph()))
    info.add_text("workflow", "{}")  # (its UI graph, which is not read)
    Image.new("RGB", (96, 64)).save(tmp_path / "comfy.png", pnginfo=info)
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", engine,
                         "--out", str(tmp_path / "again.png"), "-q"]) == 0
    assert comfyui.NEAR in capsys.readouterr().err
    assert run_cli.main(["a lighthouse at dusk", "--negative-prompt", "fog, rain", "--engine", engine, "--steps", "3",
                         "--guidance", "6.5", "--seed", "5", "--width", "96", "--height", "64", "--sampler",
                         "dpmpp_2m_karras", "--out", str(tmp_path / "given.png"), "-q"]) == 0
    again, given = Image.open(tmp_path / "again.png"), Image.open(tmp_path / "given.png")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(given))
    assert again.info["parameters"] == given.info["parameters"]
    # what it cannot read: the reason, exit 2, no traceback; given on the command line, it draws
    info = PngImagePlugin.PngInfo()
    odd = graph(sampler_name="dpm_adaptive", positive=["10", 0])
    odd["10"] = {"class_type": "ConditioningCombine", "inputs": {}}
    info.add_text("prompt", json.dumps(odd))
    Image.new("RGB", (8, 8)).save(tmp_path / "odd.png", pnginfo=info)
    assert run_cli.main(["--from-png", str(tmp_path / "odd.png"), "--engine", engine]) == 2
    err = capsys.readouterr().err
    assert "it gives no prompt that can be read here; give one" in err and "Traceback" not in err
    assert run_cli.main(["a lighthouse", "--from-png", str(tmp_path / "odd.png"), "--engine", engine]) == 2
    err = capsys.readouterr().err
    assert "\"ComfyUI's 'dpm_adaptive' with scheduler 'karras'\" is not offered here" in err and "Traceback" not in err
    assert run_cli.main(["a lighthouse", "--from-png", str(tmp_path / "odd.png"), "--engine", engine, "--sampler",
                         "euler", "--out", str(tmp_path / "odd-again.png"), "-q"]) == 0


def img2img_graph(**sampler) -> dict:
    """ComfyUI's image-to-image graph: its LoadImage's picture, VAEEncoded, sampled from."""
    g = graph(**{"latent_image": ["10", 0], **sampler})
    del g["5"]
    g["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    g["11"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png", "upload": "image"}}
    return g


def test_its_image_to_image_graph_reads_as_the_steps_it_draws():
    """ComfyUI draws `steps` steps, the last of int(steps / denoise): read as that walk's Steps and the
    strength whose int(Steps x strength) is `steps` (diffusers' img2img, ours), at every count."""
    from ldm_deploy.engine.samplers.schedule import img2img_start

    prompt, _, fields, warnings = comfyui.read(json.dumps(img2img_graph(steps=20, denoise=0.7)))
    assert prompt == "a lighthouse at dusk" and "Size" not in fields
    assert (fields["Steps"], fields["Denoising strength"]) == ("28", "0.7143")
    assert "its image-to-image pass starts from LoadImage's 'photo.png': give that image with --init-image" \
        in warnings[1] and "so the noise and the image differ more than a little" in warnings[2]
    out, _ = settings(fields)
    assert (out["steps"], out["strength"]) == (28, 0.7143)
    for steps in range(1, 60):
        for denoise in [*np.linspace(0.02, 1, 50), 1 / 3, 2 / 3, 0.999]:
            fields = comfyui.read(json.dumps(img2img_graph(steps=steps, denoise=float(denoise))))[2]
            if steps / denoise >= 1001:  # (past a model's timesteps: not read, test_what_its_image_...)
                assert "Denoising strength" not in fields
                continue
            total, strength = int(fields["Steps"]), float(fields["Denoising strength"])
            assert total == int(steps / denoise) and total - img2img_start(total, strength) == min(steps, total), \
                (steps, denoise)
    # KSamplerAdvanced: `steps` from start_at_step on
    g = img2img_graph()
    g["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{k: v for k, v in g["3"]["inputs"].items() if k not in ("seed", "denoise")}, "steps": 20,
        "noise_seed": 11, "add_noise": "enable", "start_at_step": 6, "end_at_step": 10000}}
    fields, warnings = comfyui.read(json.dumps(g))[2:]
    assert (fields["Steps"], fields["Denoising strength"]) == ("20", "0.7") and len(warnings) == 3
    g["3"]["inputs"]["end_at_step"] = 15  # (leaves noise over for another pass): not read
    fields, warnings = comfyui.read(json.dumps(g))[2:]
    assert "Denoising strength" not in fields and "draws a part of a walk" in warnings[1]
    for denoise in (0, 1.5, "x", None):
        fields, warnings = comfyui.read(json.dumps(img2img_graph(denoise=denoise)))[2:]
        assert "Denoising strength" not in fields and f"its denoise is {comfyui.describe(denoise)}" in warnings[1]
    # a graph with a text-to-image pass is read by it (its hires pass from a VAEEncode aside)
    g = graph()
    g.update({k: v for k, v in img2img_graph().items() if k in ("10", "11")})
    g["12"] = {**g["3"], "inputs": {**g["3"]["inputs"], "latent_image": ["10", 0]}}
    fields, warnings = comfyui.read(json.dumps(g))[2:]
    assert fields["Size"] == "96x64" and "Denoising strength" not in fields
    assert "samples 2 times; only node 3's text-to-image pass is drawn" in warnings[-1]
    g = img2img_graph()
    g["11"]["class_type"] = "LoadImageMask"  # (no picture: a mask)
    with pytest.raises(UserError, match="no KSampler starting from an EmptyLatentImage or a VAEEncode"):
        comfyui.read(json.dumps(g))


def inpaint_graph(how: str, **sampler) -> dict:
    """ComfyUI's inpainting graphs: its LoadImage's picture and the mask painted on it (its output 1)
    encoded by VAEEncodeForInpaint, or VAEEncoded and given the mask by SetLatentNoiseMask, or by
    InpaintModelConditioning, through which the prompts' conditioning passes too."""
    g = img2img_graph(**{"denoise": 1.0, **sampler})
    if how == "VAEEncodeForInpaint":
        g["10"] = {"class_type": how, "inputs": {"pixels": ["11", 0], "vae": ["4", 2], "mask": ["11", 1],
                                                 "grow_mask_by": 6}}
    elif how == "SetLatentNoiseMask":
        g["12"] = {"class_type": how, "inputs": {"samples": ["10", 0], "mask": ["11", 1]}}
        g["3"]["inputs"]["latent_image"] = ["12", 0]
    else:
        g["12"] = {"class_type": how, "inputs": {"positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2],
                                                 "pixels": ["11", 0], "mask": ["11", 1], "noise_mask": True}}
        g["3"]["inputs"].update(positive=["12", 0], negative=["12", 1], latent_image=["12", 2])
        del g["10"]
    return g


@pytest.mark.parametrize("how", ["VAEEncodeForInpaint", "SetLatentNoiseMask", "InpaintModelConditioning"])
def test_its_inpainting_graphs_read_as_image_to_image_with_a_mask(how):
    prompt, negative, fields, warnings = comfyui.read(json.dumps(inpaint_graph(how, steps=20, denoise=0.7)))
    assert (prompt, negative) == ("a lighthouse at dusk", "fog, rain")
    assert fields == comfyui.read(json.dumps(img2img_graph(steps=20, denoise=0.7)))[2]
    assert (fields["Steps"], fields["Denoising strength"]) == ("28", "0.7143")
    assert warnings[1] == (
        "its inpainting pass starts from LoadImage's 'photo.png' and a mask: give them with --init-image and --mask "
        "(without the picture, a text-to-image is drawn; without the mask, the whole picture is redrawn); its mask "
        "is the transparent part of LoadImage's 'photo.png' (ComfyUI keeps a mask painted in its editor in the "
        "picture's alpha channel; make a mask image of it, white where the picture is transparent)")
    assert "keeps the unmasked part by its own blending" in warnings[2]
    assert ("grows the mask by 6 px" in warnings[3]) == (how == "VAEEncodeForInpaint")
    assert "draws the seed's noise first" in warnings[-1] and not any("not drawn here" in w for w in warnings)
    # a mask from another channel, or from a node not read
    g = inpaint_graph(how)
    g["13"] = {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}}
    node = "12" if how != "VAEEncodeForInpaint" else "10"
    g[node]["inputs"]["mask"] = ["13", 0]
    warnings = comfyui.read(json.dumps(g))[3]
    assert warnings[1].endswith("its mask is the 'red' channel of LoadImageMask's 'mask.png' (white: redrawn)")
    assert not any("not drawn here" in w for w in warnings)
    g["14"] = {"class_type": "GrowMask", "inputs": {"mask": ["13", 0], "expand": 8}}
    g[node]["inputs"]["mask"] = ["14", 0]
    warnings = comfyui.read(json.dumps(g))[3]
    assert warnings[1].endswith("its mask is a mask from GrowMask, not read here")
    assert warnings[-1] == "its graph's GrowMask, LoadImageMask are not drawn here, so the image may differ"
    if how == "InpaintModelConditioning":
        g = inpaint_graph(how)
        g["12"]["inputs"]["noise_mask"] = False
        assert "has noise_mask off, so it redraws the unmasked part too" in comfyui.read(json.dumps(g))[3][3]
    if how == "VAEEncodeForInpaint":  # under a SetLatentNoiseMask too; grow_mask_by 0 grows nothing
        g = inpaint_graph(how)
        g["10"]["inputs"]["grow_mask_by"] = 0
        g["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["11", 1]}}
        g["3"]["inputs"]["latent_image"] = ["12", 0]
        warnings = comfyui.read(json.dumps(g))[3]
        assert warnings[3].startswith("its VAEEncodeForInpaint encodes the picture with the masked part grey; here "
                                      "the mask is taken as given and") and "not drawn here" not in warnings[-1]


def test_a_comfyui_inpainting_png_draws_with_its_picture_and_mask(engine_dirs, tmp_path, capsys):
    engine = str(engine_dirs["tiny-sd1"])
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(inpaint_graph("SetLatentNoiseMask", steps=3, denoise=0.6)))
    Image.new("RGB", (96, 64)).save(tmp_path / "comfy.png", pnginfo=info)
    images = ["--init-image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png")]
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", engine, *images,
                         "--out", str(tmp_path / "again.png"), "-q"]) == 0
    assert "its inpainting pass starts from LoadImage's 'photo.png' and a mask" in capsys.readouterr().err
    assert run_cli.main(["a lighthouse at dusk", "--negative-prompt", "fog, rain", "--engine", engine, "--steps", "5",
                         "--strength", "0.6", "--guidance", "6.5", "--seed", "5", "--sampler", "dpmpp_2m_karras",
                         *images, "--out", str(tmp_path / "given.png"), "-q"]) == 0
    again, given = np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "given.png"))
    np.testing.assert_array_equal(again, given)
    # (the mask is drawn with: without it, its image-to-image)
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", engine, *images[:2],
                         "--out", str(tmp_path / "whole.png"), "-q"]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "whole.png")), given)


def test_clip_text_encode_sdxl_reads_where_both_encoders_get_one_text():
    g = graph()
    g["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "text_g": "a fox", "text_l": "a fox", "width": 96, "height": 64, "target_width": 96, "target_height": 64,
        "crop_w": 0, "crop_h": 0, "clip": ["4", 1]}}
    prompt, _, _, warnings = comfyui.read(json.dumps(g))
    assert prompt == "a fox" and warnings == [comfyui.NEAR]
    g["6"]["inputs"].update(width=1024, height=1024, target_width=1024, target_height=1024)  # (its defaults)
    prompt, _, _, warnings = comfyui.read(json.dumps(g))
    assert prompt == "a fox" and "conditions on size 1024x1024, target 1024x1024, crop (0, 0); here" in warnings[1]
    g["6"]["inputs"]["text_l"] = "snow"
    prompt, _, _, warnings = comfyui.read(json.dumps(g))
    assert prompt is None and "gives SDXL's two encoders other texts (text_g, text_l): not read" in warnings[1]
    g["6"]["inputs"]["text_l"] = ["12", 0]
    prompt, _, _, warnings = comfyui.read(json.dumps(g))
    assert prompt is None and "text_g is 'a fox' and text_l wired from node 12: not read" in warnings[1]


def test_a_comfyui_image_to_image_png_draws_with_its_init_image(engine_dirs, tmp_path, capsys):
    engine = str(engine_dirs["tiny-sd1"])
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(img2img_graph(steps=3, denoise=0.6)))
    Image.new("RGB", (96, 64)).save(tmp_path / "comfy.png", pnginfo=info)
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", engine, "--init-image",
                         str(tmp_path / "photo.png"), "--out", str(tmp_path / "again.png"), "-q"]) == 0
    assert "LoadImage's 'photo.png'" in capsys.readouterr().err
    assert run_cli.main(["a lighthouse at dusk", "--negative-prompt", "fog, rain", "--engine", engine, "--steps", "5",
                         "--strength", "0.6", "--guidance", "6.5", "--seed", "5", "--sampler", "dpmpp_2m_karras",
                         "--init-image", str(tmp_path / "photo.png"), "--out", str(tmp_path / "given.png"), "-q"]) == 0
    again, given = Image.open(tmp_path / "again.png"), Image.open(tmp_path / "given.png")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(given))
    assert again.info["parameters"] == given.info["parameters"] and "Denoising strength: 0.6" in given.info["parameters"]
    # without its picture: drawn from text, as said
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", engine, "--width", "96", "--height",
                         "64", "--out", str(tmp_path / "text.png"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "give that image with --init-image (without it, a text-to-image is drawn)" in err
    assert "the PNG's Denoising strength applies to img2img only (with --init-image); ignored" in err


def hires_graph(latent: bool = True, **second) -> dict:
    """ComfyUI's two-pass ("hires fix") graph: the first pass's latents enlarged (or its image,
    decoded, enlarged and encoded again), then sampled again at `second`'s settings."""
    g = graph()
    inputs = {**g["3"]["inputs"], "steps": 2, "denoise": 0.5, **second}
    if latent:
        g["13"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact",
                                                               "scale_by": 1.5}}
        inputs["latent_image"] = ["13", 0]
    else:
        g["13"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
        g["14"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["13", 0], "upscale_method": "lanczos",
                                                            "scale_by": 1.5}}
        g["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["4", 2]}}
        inputs["latent_image"] = ["15", 0]
    g["12"] = {"class_type": "KSampler", "inputs": inputs}
    g["8"]["inputs"]["samples"] = ["12", 0]
    return g


def test_its_hires_fix_reads_as_automatic1111s():
    _, _, fields, warnings = comfyui.read(json.dumps(hires_graph()))
    assert warnings == [comfyui.NEAR]
    out, _ = settings(fields)
    assert {k: v for k, v in out.items() if k.startswith("hires")} == {
        "hires_scale": 1.5, "hires_steps": 2, "hires_strength": 0.5, "hires_upscaler": "Latent (nearest-exact)"}
    _, _, fields, warnings = comfyui.read(json.dumps(hires_graph(latent=False)))
    assert settings(fields)[0]["hires_upscaler"] == "Lanczos" and warnings == [comfyui.NEAR]
    # its own sampler and prompts
    g = hires_graph(sampler_name="euler_ancestral", scheduler="normal", positive=["20", 0], seed=9)
    g["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk, sharp", "clip": ["4", 1]}}
    _, _, fields, warnings = comfyui.read(json.dumps(g))
    out = settings(fields)[0]
    assert (out["hires_sampler"], out["hires_prompt"]) == ("euler_a", "a lighthouse at dusk, sharp")
    assert "hires_negative_prompt" not in out and "its hires fix (node 12) has seed 9, here the first pass's (5)" \
        in warnings
    g = hires_graph()
    del g["13"]["inputs"]["scale_by"]
    g["13"].update(class_type="LatentUpscale", inputs={**g["13"]["inputs"], "width": 144, "height": 96, "crop": "disabled"})
    assert settings(comfyui.read(json.dumps(g))[2])[0]["hires_scale"] == 1.5
    # what is not read: said, and the first pass drawn alone
    for change, why in (({"upscale_method": "area"}, "it has upscale_method 'area', not offered here"),
                        ({"scale_by": ["30", 0]}, "a size not read here (scale_by wired from node 30)")):
        g = hires_graph()
        g["13"]["inputs"].update(change)
        _, _, fields, warnings = comfyui.read(json.dumps(g))
        assert "Hires upscale" not in fields and why in warnings[1] and "LatentUpscaleBy" in warnings[-1]
    for second, why in (({"denoise": 0}, "it has steps 2 and denoise 0, not read"),
                        ({"sampler_name": "dpm_fast"}, "draws with ComfyUI's 'dpm_fast' with scheduler 'karras'")):
        _, _, fields, warnings = comfyui.read(json.dumps(hires_graph(**second)))
        assert why in warnings[1]
    assert "Hires sampler" not in fields and "Hires upscale" in fields


def with_upscale_model(g: dict, file: str, scale_node: dict | None) -> dict:
    """hires_graph(latent=False) with ComfyUI's upscale model (UpscaleModelLoader of `file`,
    ImageUpscaleWithModel) between its VAEDecode and its ImageScale(By) (or none: the model's image
    encoded as it is)."""
    g["16"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": file}}
    g["17"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["16", 0], "image": ["13", 0]}}
    if scale_node is None:
        del g["14"]
        g["15"]["inputs"]["pixels"] = ["17", 0]
    else:
        g["14"] = {**scale_node, "inputs": {**scale_node["inputs"], "image": ["17", 0]}}
    return g


def test_its_hires_fix_with_an_upscale_model_reads_by_the_models_name():
    by = {"class_type": "ImageScaleBy", "inputs": {"upscale_method": "lanczos", "scale_by": 0.375}}
    sized = {"class_type": "ImageScale", "inputs": {"upscale_method": "bilinear", "width": 144, "height": 0,
                                                    "crop": "disabled"}}
    for file, scale_node, upscaler, scale in (
        (r"ESRGAN\4x-UltraSharp.pth", by, "4x-UltraSharp", 1.5),  # 4x the model, 0.375 the resize
        ("RealESRGAN_x2plus.pth", None, "RealESRGAN_x2plus", 2.0),  # encoded as the model enlarged it
        ("BSRGAN.pth", sized, "BSRGAN", 1.5),  # its scale unknown, but 144 px wide is 1.5x
    ):
        _, _, fields, warnings = comfyui.read(json.dumps(with_upscale_model(hires_graph(latent=False), file,
                                                                            scale_node)))
        out = settings(fields)[0]
        assert (out["hires_upscaler"], out["hires_scale"]) == (upscaler, scale)
        assert warnings[0] == comfyui.NEAR and len(warnings) == 2
        assert f"enlarges with the upscale model {upscaler!r} in ComfyUI's tiles" in warnings[1]
        assert ("then resizes with bilinear" in warnings[1]) == (scale_node is sized)
    # not read: a model whose scale its name does not say, before a resize by a factor; a model from another node
    g = with_upscale_model(hires_graph(latent=False), "BSRGAN.pth", by)
    _, _, fields, warnings = comfyui.read(json.dumps(g))
    assert "Hires upscale" not in fields and "a size not read here (the upscale model 'BSRGAN''s scale, not in its " \
        "name)" in warnings[1]
    g["17"]["inputs"]["upscale_model"] = ["4", 0]
    _, _, fields, warnings = comfyui.read(json.dumps(g))
    assert "Hires upscale" not in fields and "enlarges with an upscale model not read here" in warnings[1]
    # ImageScale to 0 x 0 after the model keeps the model's size; without a model and a method, said so
    zero = {"class_type": "ImageScale", "inputs": {"upscale_method": "bicubic", "width": 0, "height": 0,
                                                   "crop": "disabled"}}
    _, _, fields, warnings = comfyui.read(json.dumps(with_upscale_model(hires_graph(latent=False), "4xNomos8kSC.pth",
                                                                        zero)))
    assert (settings(fields)[0]["hires_upscaler"], settings(fields)[0]["hires_scale"]) == ("4xNomos8kSC", 4.0)
    assert "then resizes" not in warnings[1]
    g = hires_graph(latent=False)
    del g["14"]["inputs"]["upscale_method"]
    _, _, fields, warnings = comfyui.read(json.dumps(g))
    assert "Hires upscale" not in fields and "has upscale_method missing, not offered here" in warnings[1]


def test_upscale_models_scales_read_from_their_names():
    for name, scale in (("4x-UltraSharp", 4), ("4x_NMKD-Siax_200k", 4), ("4xNomos8kSC", 4), ("2xHFA2kCompact", 2),
                        ("RealESRGAN_x4plus", 4), ("RealESRGAN_x2plus", 2), ("realesr-general-x4v3", 4),
                        ("BSRGAN", None), ("8x_NMKD-Superscale_150000_G", 8), ("4x-foo-2x", None), ("x16", None),
                        ("14x", None)):
        assert comfyui.name_scale(name) == scale, name


def test_a_comfyui_hires_png_draws_what_its_settings_draw(engine_dirs, tmp_path):
    engine = str(engine_dirs["tiny-sd1"])
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(hires_graph(sampler_name="euler", scheduler="normal")))
    Image.new("RGB", (144, 96)).save(tmp_path / "comfy.png", pnginfo=info)
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", engine,
                         "--out", str(tmp_path / "again.png"), "-q"]) == 0
    assert run_cli.main(["a lighthouse at dusk", "--negative-prompt", "fog, rain", "--engine", engine, "--steps", "3",
                         "--guidance", "6.5", "--seed", "5", "--width", "96", "--height", "64", "--sampler",
                         "dpmpp_2m_karras", "--hires-scale", "1.5", "--hires-upscaler", "Latent (nearest-exact)",
                         "--hires-steps", "2", "--hires-strength", "0.5", "--hires-sampler", "euler",
                         "--out", str(tmp_path / "given.png"), "-q"]) == 0
    again, given = Image.open(tmp_path / "again.png"), Image.open(tmp_path / "given.png")
    assert again.size == (144, 96)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(given))
    assert again.info["parameters"] == given.info["parameters"]


def test_its_lora_loaders_become_automatic1111s_tags(engine_dirs, tmp_path, capsys):
    """Each LoRA loader between the checkpoint and the sampler is the tag AUTOMATIC1111 writes
    (text encoder weight first), which ldm-run checks against the LoRAs merged into the engine."""
    g = graph(model=["11", 0])
    g["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "styles\\ink.safetensors", "strength_model": 0.8,
                                                      "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}}
    g["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "detail.pt", "strength_model": 0.5,
                                                               "model": ["10", 0]}}
    assert comfyui.read(json.dumps(g))[0] == "a lighthouse at dusk <lora:ink:0:0.8> <lora:detail:0:0.5>"
    g["6"]["inputs"]["clip"] = ["10", 1]  # the prompt's encoder through the loader: its clip weight counts
    prompt, _, fields, warnings = comfyui.read(json.dumps(g))
    assert prompt == "a lighthouse at dusk <lora:ink:0.8> <lora:detail:0:0.5>" and fields["Model"] == "dreamshaper_8"
    assert warnings == [comfyui.NEAR]
    g["10"]["inputs"]["strength_clip"] = "x"
    g["10"]["inputs"]["model"] = ["11", 0]  # (a cycle)
    prompt, _, fields, warnings = comfyui.read(json.dumps(g))
    assert prompt == "a lighthouse at dusk <lora:detail:0:0.5>" and "Model" not in fields
    assert "its LoraLoader loads 'styles\\\\ink.safetensors' at 0.8 (model) and 'x' (clip), not read" in warnings[1]
    # drawn: the engine holds no LoRA, which is said with the --lora that merges it
    info = PngImagePlugin.PngInfo()
    g = graph(model=["10", 0])
    g["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "ink.safetensors", "strength_model": 0.8,
                                                      "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}}
    g["6"]["inputs"]["clip"] = ["10", 1]
    info.add_text("prompt", json.dumps(g))
    Image.new("RGB", (96, 64)).save(tmp_path / "comfy.png", pnginfo=info)
    assert run_cli.main(["--from-png", str(tmp_path / "comfy.png"), "--engine", str(engine_dirs["tiny-sd1"]),
                         "--steps", "1", "--out", str(tmp_path / "again.png"), "-q"]) == 0
    assert "export it with --lora ink.safetensors:0.8" in capsys.readouterr().err
    assert Image.open(tmp_path / "again.png").info["parameters"].startswith("a lighthouse at dusk <lora:ink:0.8>\n")


def test_its_hires_fix_is_read_as_comfyui_sizes_and_models_it():
    """ComfyUI's sizes (whole latent pixels; 0: the other side's aspect), the pass that can be read
    among several, LoRAs on each pass, and the nodes left over named."""
    from ldm_deploy.engine.hires import target_size

    for first, node, target in (((1216, 832), {"class_type": "LatentUpscale", "width": 1696, "height": 1160},
                                 (1696, 1160)),
                                ((768, 512), {"class_type": "LatentUpscaleBy", "scale_by": 1.3}, (1000, 664)),
                                ((512, 768), {"class_type": "LatentUpscale", "width": 0, "height": 1152}, (768, 1152))):
        g = hires_graph()
        g["5"]["inputs"].update(width=first[0], height=first[1])
        g["13"] = {"class_type": node.pop("class_type"), "inputs": {
            "samples": ["3", 0], "upscale_method": "bilinear", "crop": "disabled", **node}}
        fields, warnings = comfyui.read(json.dumps(g))[2:]
        assert target_size(*first, float(fields["Hires upscale"]), 8) == target and warnings == [comfyui.NEAR], node
    g = hires_graph()
    g["13"]["inputs"]["scale_by"] = 12
    fields, warnings = comfyui.read(json.dumps(g))[2:]
    assert "Hires upscale" not in fields and "enlarges by 12, outside (1, 8] here: not drawn" in warnings[1]
    # an unreadable second pass (area) before a readable one: the readable one
    g = hires_graph()
    g["0"] = {"class_type": "KSampler", "inputs": {**g["12"]["inputs"], "latent_image": ["1", 0]}}
    g["1"] = {"class_type": "LatentUpscaleBy", "inputs": {**g["13"]["inputs"], "upscale_method": "area"}}
    g = {"0": g.pop("0"), "1": g.pop("1"), **g}
    fields, warnings = comfyui.read(json.dumps(g))[2:]
    assert fields["Hires upscaler"] == "Latent (nearest-exact)" and "samples 3 times" in warnings[1]
    assert "LatentUpscaleBy is not drawn" in warnings[-1]
    # one LoRA on both passes: no hires prompt of its own; another on the hires pass alone: said
    g = hires_graph()
    g["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "ink.safetensors", "strength_model": 0.8,
                                                      "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}}
    g["3"]["inputs"]["model"] = g["12"]["inputs"]["model"] = ["10", 0]
    g["6"]["inputs"]["clip"] = ["10", 1]
    prompt, _, fields, warnings = comfyui.read(json.dumps(g))
    assert prompt.endswith("<lora:ink:0.8>") and "Hires prompt" not in fields and warnings == [comfyui.NEAR]
    g["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "x.safetensors", "strength_model": 1,
                                                               "model": ["10", 0]}}
    g["12"]["inputs"]["model"] = ["11", 0]
    warnings = comfyui.read(json.dumps(g))[3]
    assert "its hires fix (node 12) draws with another checkpoint or LoRAs than the first pass" in warnings[1]
    # a LoRA loader on no pass read, an image scaled after decoding, a weight not a number: named
    g = hires_graph(latent=False)
    g["9"]["inputs"]["images"] = ["16", 0]
    g["16"] = {"class_type": "ImageScaleBy", "inputs": {"image": ["8", 0], "upscale_method": "bicubic", "scale_by": 2}}
    g["17"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "y.safetensors", "model": ["4", 0]}}
    g["10"] = {**g["17"], "inputs": {**g["17"]["inputs"], "strength_model": float("nan"), "strength_clip": 1}}
    g["3"]["inputs"]["model"] = ["10", 0]
    prompt, _, fields, warnings = comfyui.read(json.dumps(g))
    assert fields["Hires upscaler"] == "Lanczos" and "<lora" not in prompt
    assert "its LoraLoader loads 'y.safetensors' at nan (model) and 0.0 (clip), not read" in warnings[1]
    assert "its graph's ImageScaleBy, LoraLoader are not drawn here" in warnings[-1]


def test_what_its_image_to_image_graph_cannot_give_is_said():
    """Values past any walk, a wired add_noise, an image not loaded from a file: not read, with why."""
    for change, why in (({"denoise": 1e-320}, "draws 3 steps of a walk of inf"),
                        ({"denoise": 0.002}, "of a walk of 1500, more than a model's 1000 timesteps"),
                        ({"steps": float("inf")}, "its steps is inf, not read")):
        fields, warnings = comfyui.read(json.dumps(img2img_graph(**change)))[2:]
        assert "Denoising strength" not in fields and why in " | ".join(warnings), change
    g = img2img_graph()
    g["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **{k: v for k, v in g["3"]["inputs"].items() if k not in ("seed", "denoise")}, "noise_seed": 1,
        "add_noise": ["9", 0], "start_at_step": 1, "end_at_step": 10000}}
    fields, warnings = comfyui.read(json.dumps(g))[2:]
    assert "Denoising strength" not in fields and "draws a part of a walk" in warnings[1]
    assert "draws the seed's noise first" in warnings[-1]
    g = img2img_graph()
    g["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0]}}  # (another sampler's result)
    with pytest.raises(UserError, match="or a VAEEncode of a LoadImage"):
        comfyui.read(json.dumps(g))


def test_its_tiled_vae_nodes_read_as_the_plain_ones_and_advise_vae_tiling():
    g = graph()
    g["8"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["4", 2], "tile_size": 512,
                                                         "overlap": 64}}
    _, _, fields, warnings = comfyui.read(json.dumps(g))
    assert fields == comfyui.read(json.dumps(graph()))[2]
    assert warnings == [comfyui.NEAR, "its VAEDecodeTiled runs the VAE in ComfyUI's tiles (tile_size 512); here it "
                        "runs whole, or with --vae-tiling in diffusers' tiles (of the model's size, or "
                        "--vae-tile-size), near ComfyUI's"]
    # a hires fix decoded and encoded in tiles reads as one decoded and encoded whole
    g = hires_graph(latent=False)
    g["13"]["class_type"], g["15"]["class_type"] = "VAEDecodeTiled", "VAEEncodeTiled"
    g["13"]["inputs"]["tile_size"] = 768
    _, _, fields, warnings = comfyui.read(json.dumps(g))
    assert fields == comfyui.read(json.dumps(hires_graph(latent=False)))[2] and fields["Hires upscaler"] == "Lanczos"
    assert len(warnings) == 2 and warnings[1].startswith("its VAEDecodeTiled and VAEEncodeTiled run the VAE in "
                                                         "ComfyUI's tiles (tile_size 768, missing);")
    # an image-to-image pass from a VAEEncodeTiled of a LoadImage's picture
    g = img2img_graph(steps=20, denoise=0.7)
    g["10"]["class_type"] = "VAEEncodeTiled"
    fields, warnings = comfyui.read(json.dumps(g))[2:]
    assert (fields["Steps"], fields["Denoising strength"]) == ("28", "0.7143")
    assert fields == comfyui.read(json.dumps(img2img_graph(steps=20, denoise=0.7)))[2]
    assert "VAEEncodeTiled runs the VAE in ComfyUI's tiles" in warnings[-1]
    g["9"]["class_type"] = ["not", "a name"]  # malformed: not a traceback
    assert comfyui.read(json.dumps(g))[2] == fields
