"""AUTOMATIC1111's request fields -> Pipeline keywords, as its API (1.10) reads them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from serve_http import b64

from ldm_deploy.engine.samplers import DISPLAY_NAMES
from ldm_deploy.errors import InvalidRequest
from ldm_deploy.serve import a1111_request as a1111

MODEL = SimpleNamespace(pooled_width=0, tiling=False, controlnets=({"name": "canny", "sha256": "0"},
                                                     {"name": "depth", "sha256": "1"}))
XL = SimpleNamespace(pooled_width=1280, tiling=False, controlnets=())


def seven():
    return 7


# AUTOMATIC1111 1.9+'s get_sampler_and_scheduler: no scheduler is "Automatic", each sampler's own
# default (DPM++ 2M: Karras); a schedule in the name is split off; aliases are k-diffusion's names.
@pytest.mark.parametrize("name,scheduler,ours", [
    ("Euler", None, "euler"), ("Euler a", None, "euler_a"), ("k_euler_a", None, "euler_a"),
    ("DPM++ 2M", None, "dpmpp_2m_karras"), ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),
    ("DPM++ 2M", "uniform", "dpmpp_2m"), ("DPM++ 2M", "Uniform", "dpmpp_2m"), ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
    ("DPM++ 2M", "karras", "dpmpp_2m_karras"), ("Euler", "karras", "euler_karras"), ("UniPC", None, "unipc"),
    ("DDIM", None, "ddim"), ("LCM", None, "lcm"), ("dpmpp_2m_sde", None, "dpmpp_2m_sde"), ("Heun", "Karras", "heun_karras"),
    ("dpmpp_2m", "karras", "dpmpp_2m_karras"), ("euler", "karras", "euler_karras"), ("dpmpp_2m_karras", "uniform", "dpmpp_2m"),
    ("DPM2", None, "dpm2"), ("DPM2 a", None, "dpm2_a"), ("k_dpm_2_a", "karras", "dpm2_a_karras"),
    ("DPM2 a Karras", None, "dpm2_a_karras"), ("k_dpm_2", "exponential", "dpm2_exponential"),
    ("DPM++ SDE", None, "dpmpp_sde_karras"), ("DPM++ SDE", "Uniform", "dpmpp_sde"), ("k_dpmpp_sde", "karras", "dpmpp_sde_karras"),
    ("DPM++ SDE", "exponential", "dpmpp_sde_exponential"), ("DPM++ 2S a", None, "dpmpp_2s_a_karras"),
    ("k_dpmpp_2s_a", "uniform", "dpmpp_2s_a"), ("DPM++ 2S a", "align_your_steps", "dpmpp_2s_a_ays"),
    ("DPM++ 3M SDE", None, "dpmpp_3m_sde_exponential"), ("Euler", "sgm_uniform", "euler_sgm_uniform"),
    ("DPM++ SDE", "SGM Uniform", "dpmpp_sde_sgm_uniform"), ("Euler a SGM Uniform", None, "euler_a_sgm_uniform"), ("k_dpmpp_3m_sde", "karras", "dpmpp_3m_sde_karras"),
    ("DPM++ 2M", "beta", "dpmpp_2m_beta"), ("Euler Beta", None, "euler_beta"), ("k_dpmpp_sde", "Beta", "dpmpp_sde_beta"),
    ("DPM++ 2M", "align_your_steps", "dpmpp_2m_ays"), ("Euler", "Align Your Steps", "euler_ays"),
    ("DPM++ 2M SDE Align Your Steps", None, "dpmpp_2m_sde_ays"),
])
def test_sampler_names(name, scheduler, ours):
    assert a1111.sampler(name, scheduler) == ours


def test_every_sampler_is_reachable_by_its_name_and_schedule():
    for key, display in DISPLAY_NAMES.items():
        base = a1111.base_name(display)
        schedule = display[len(base):].strip().lower() or "uniform"
        assert a1111.sampler(base, schedule) == key


def test_dpmpp_2m_sdes_own_schedule_is_exponential():
    """AUTOMATIC1111 1.9+'s "Automatic" schedule of DPM++ 2M SDE, what its clients send by default."""
    assert a1111.sampler("DPM++ 2M SDE", None) == a1111.sampler("DPM++ 2M SDE", "Automatic") == \
        a1111.sampler("DPM++ 2M SDE Exponential", None) == "dpmpp_2m_sde_exponential"
    assert a1111.sampler("DPM++ 2M", "exponential") == "dpmpp_2m_exponential"
    assert a1111.sampler("dpmpp_2m_sde_karras", "exponential") == "dpmpp_2m_sde_exponential"


@pytest.mark.parametrize("name,scheduler", [("LMS", "karras"), ("Euler a", "exponential"),
                                            ("Restart", None), ("nonsense", None), (3, None)])
def test_samplers_not_offered_are_refused(name, scheduler):
    if name == "LMS":  # not "its schedule is not offered": the sampler is not
        with pytest.raises(InvalidRequest, match="sampler 'LMS Karras' is not offered"):
            a1111.sampler(name, scheduler)
    # AUTOMATIC1111 draws an unknown name with DPM++ 2M
    with pytest.raises(InvalidRequest, match="is not offered here|is not offered with the|must be text"):
        a1111.sampler(name, scheduler)


def test_a_sampler_of_ours_on_another_schedule_says_which_it_walks():
    with pytest.raises(InvalidRequest, match=r"Euler a is not offered with the Exponential schedule here: its "
                                             r"schedules are SGM Uniform, Uniform \(scheduler \"automatic\""):
        a1111.sampler("Euler a", "exponential")
    with pytest.raises(InvalidRequest, match="TCD is not offered with the Karras schedule here: only its own walk"):
        a1111.sampler("TCD", "Karras")
    assert a1111.sampler("TCD", None) == a1111.sampler("tcd", "automatic") == "tcd"


def test_txt2img_defaults_are_its_api_defaults_but_the_size():
    options = a1111.txt2img({"prompt": "a cat"}, MODEL, (128, 96), seven)
    assert options == {"prompt": "a cat", "negative_prompt": None, "steps": 50, "guidance": 7.0, "seed": 7,
                       "num_images": 1, "sampler": "euler", "prompt_weighting": True, "clip_skip": 0,
                       "width": 128, "height": 96}


def test_txt2img_fields():
    body = {"prompt": "a", "negative_prompt": "b", "steps": 12, "cfg_scale": 5, "seed": 3, "batch_size": 2,
            "n_iter": 3, "width": 64, "height": 80, "sampler_name": "Euler a",
            "override_settings": {"CLIP_stop_at_last_layers": 2}, "eta": 0, "s_noise": 1, "save_images": False,
            "some_unknown_field": 1}
    options = a1111.txt2img(body, MODEL, (128, 128), seven)
    assert options == {"prompt": "a", "negative_prompt": "b", "steps": 12, "guidance": 5.0, "seed": 3,
                       "num_images": 6, "sampler": "euler_a", "prompt_weighting": True, "clip_skip": 1,
                       "width": 64, "height": 80}
    # AUTOMATIC1111 does not apply its clip skip to SDXL
    assert a1111.txt2img({"override_settings": {"CLIP_stop_at_last_layers": 2}}, XL, (1024, 1024),
                         seven)["clip_skip"] == 0


def test_hires_fields():
    base = {"prompt": "a", "enable_hr": True, "width": 64, "height": 64}
    options = a1111.txt2img(base, MODEL, (128, 128), seven)
    assert (options["hires_scale"], options["hires_steps"], options["hires_strength"], options["hires_upscaler"]) \
        == (2.0, 0, 0.75, "Latent")  # its defaults: the Latent upscaler, txt2img's denoising strength 0.75
    options = a1111.txt2img({**base, "hr_resize_x": 96, "hr_resize_y": 96, "hr_upscaler": "Lanczos",
                             "hr_second_pass_steps": 5, "denoising_strength": 0.5}, MODEL, (128, 128), seven)
    assert (options["hires_scale"], options["hires_steps"], options["hires_strength"], options["hires_upscaler"]) \
        == (1.5, 5, 0.5, "Lanczos")
    with pytest.raises(InvalidRequest, match="evenly"):
        a1111.txt2img({**base, "hr_resize_x": 96, "hr_resize_y": 128}, MODEL, (128, 128), seven)
    with pytest.raises(InvalidRequest, match="hr_upscaler"):
        a1111.txt2img({**base, "hr_upscaler": "R-ESRGAN 4x+"}, MODEL, (128, 128), seven)
    # an upscale model the engine holds (ldm-export --upscaler), by its exact name
    assert a1111.txt2img({**base, "hr_upscaler": "R-ESRGAN 4x+"}, MODEL, (128, 128), seven,
                         upscalers=("R-ESRGAN 4x+",))["hires_upscaler"] == "R-ESRGAN 4x+"
    with pytest.raises(InvalidRequest, match=r"'4x-Other' is not offered; choose one of Lanczos, .*, R-ESRGAN 4x\+"):
        a1111.txt2img({**base, "hr_upscaler": "4x-Other"}, MODEL, (128, 128), seven, upscalers=("R-ESRGAN 4x+",))
    options = a1111.txt2img({**base, "hr_prompt": "other", "hr_negative_prompt": "", "hr_sampler_name": "DPM++ 2M",
                             "hr_scheduler": "karras"}, MODEL, (128, 128), seven)
    assert (options["hires_prompt"], options["hires_sampler"]) == ("other", "dpmpp_2m_karras")
    assert "hires_negative_prompt" not in options  # "": the first pass's
    assert "hires_sampler" not in a1111.txt2img({**base, "hr_sampler_name": "Use same sampler"}, MODEL, (128, 128),
                                                seven)
    with pytest.raises(InvalidRequest, match="not offered"):
        a1111.txt2img({**base, "hr_sampler_name": "Restart"}, MODEL, (128, 128), seven)
    # its 1.9+: the hires sampler and scheduler each the first pass's where not given
    for extra, want in (({"hr_scheduler": "karras"}, "euler_karras"),
                        ({"scheduler": "karras", "hr_sampler_name": "Heun"}, "heun_karras"),
                        ({"sampler_name": "DPM++ 2M", "scheduler": "karras", "hr_scheduler": "exponential"},
                         "dpmpp_2m_exponential"),
                        ({"hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler"}, None),
                        ({"scheduler": "karras", "hr_sampler_name": "Euler"}, None)):  # as the first pass
        assert a1111.txt2img({**base, **extra}, MODEL, (128, 128), seven).get("hires_sampler") == want, extra


@pytest.mark.parametrize("field,value", [("restore_faces", True),
                                         ("styles", ["mine"]), ("script_name", "x/y/z plot"),
                                         ("alwayson_scripts", {"ADetailer": {"args": []}})])
def test_what_is_not_offered_is_refused_by_name(field, value):
    with pytest.raises(InvalidRequest, match=field.split("_")[0] if field != "alwayson_scripts" else "ADetailer"):
        a1111.txt2img({"prompt": "a", field: value}, MODEL, (128, 128), seven)


@pytest.mark.parametrize("body,match", [({"steps": 2.5}, "steps"), ({"cfg_scale": "7"}, "cfg_scale"),
                                        ({"batch_size": 0}, "batch_size"), ({"prompt": 3}, "prompt"),
                                        ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "CLIP")])
def test_bad_values(body, match):
    with pytest.raises(InvalidRequest, match=match):
        a1111.txt2img(body, MODEL, (128, 128), seven)


def test_img2img_fields():
    init = Image.new("RGB", (96, 64), (10, 20, 30))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (10, 10, 40, 40))
    options = a1111.img2img({"prompt": "a", "init_images": [b64(init)], "mask": "data:image/png;base64," + b64(mask),
                             "inpainting_mask_invert": 1, "inpainting_fill": 1}, MODEL, (128, 128), seven)
    assert "width" not in options and "height" not in options  # the image's size
    assert options["strength"] == 0.75 and options["mask_blur"] == 4 and options["mask_crop"] == 0
    assert options["init_image"].tobytes() == init.tobytes()
    assert options["mask"].getpixel((20, 20)) == 0 and options["mask"].getpixel((80, 50)) == 255  # inverted
    options = a1111.img2img({"init_images": [b64(init)], "mask": b64(mask), "inpaint_full_res": False,
                             "mask_blur_x": 2, "mask_blur_y": 2, "inpainting_fill": 1}, MODEL, (128, 128), seven)
    assert "mask_crop" not in options and options["mask_blur"] == 2
    plain = a1111.img2img({"init_images": [b64(init)], "denoising_strength": 0.3}, MODEL, (128, 128), seven)
    assert "mask" not in plain and plain["strength"] == 0.3


def test_masks_as_it_reads_them():
    grey = Image.new("L", (4, 1))
    grey.putdata([0, 128, 129, 255])
    assert np.asarray(a1111.binary_mask(grey)).ravel().tolist() == [0, 128, 129, 255]  # soft: cut later at 0.5
    strokes = Image.new("RGBA", (4, 1), (0, 0, 0, 0))  # strokes on a transparent layer: its alpha, cut
    strokes.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 129), (0, 0, 0, 128)])
    assert np.asarray(a1111.binary_mask(strokes)).ravel().tolist() == [0, 255, 255, 0]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))  # opaque: its grey
    assert np.asarray(a1111.binary_mask(opaque)).ravel().tolist() == [255, 255]


def test_masked_content():
    body = {"init_images": [b64(Image.new("RGB", (64, 64)))], "mask": b64(Image.new("L", (64, 64), 255))}
    assert a1111.img2img(body, MODEL, (128, 128), seven)["masked_content"] == "fill"  # its API's default
    assert a1111.img2img({**body, "inpainting_fill": 1}, MODEL, (128, 128), seven)["masked_content"] == "original"
    assert a1111.img2img({**body, "inpainting_fill": 2}, MODEL, (128, 128), seven)["masked_content"] == "latent noise"
    assert a1111.img2img({**body, "inpainting_fill": 3}, MODEL, (128, 128), seven)["masked_content"] == \
        "latent nothing"


def test_tiling_is_the_engines():
    """An engine tiles or not (ldm-export --tiling): a request asking otherwise is refused."""
    tiles = SimpleNamespace(pooled_width=0, tiling=True, controlnets=())
    for model, asked in ((MODEL, None), (MODEL, False), (tiles, None), (tiles, True)):
        assert "tiling" not in a1111.txt2img({"prompt": "a", "tiling": asked}, model, (128, 128), seven)
    with pytest.raises(InvalidRequest, match="does not tile; export one with ldm-export --tiling"):
        a1111.txt2img({"prompt": "a", "tiling": True}, MODEL, (128, 128), seven)
    with pytest.raises(InvalidRequest, match="this engine tiles"):
        a1111.txt2img({"prompt": "a", "tiling": False}, tiles, (128, 128), seven)
    with pytest.raises(InvalidRequest, match="does not tile"):  # its Tiling option, AUTOMATIC1111 1.6+
        a1111.txt2img({"prompt": "a", "override_settings": {"tiling": True}}, MODEL, (128, 128), seven)
    assert "tiling" not in a1111.txt2img({"prompt": "a", "override_settings": {"tiling": True}}, tiles, (128, 128),
                                         seven)
    with pytest.raises(InvalidRequest, match="tiling must be true or false"):
        a1111.txt2img({"prompt": "a", "tiling": "yes"}, MODEL, (128, 128), seven)


def test_variation_fields():
    """subseed / subseed_strength / seed_resize_from_w, _h as AUTOMATIC1111 reads them: the
    variation seed only with a strength (-1: a random one), the resize only where both sides > 0."""
    options = a1111.txt2img({"prompt": "a", "subseed": 12, "subseed_strength": 0.25, "seed_resize_from_w": 512,
                             "seed_resize_from_h": 768}, MODEL, (128, 128), seven)
    assert (options["variation_seed"], options["variation_strength"], options["seed_resize_from"]) == \
        (12, 0.25, (512, 768))
    options = a1111.txt2img({"prompt": "a", "subseed": -1, "subseed_strength": 0.5}, MODEL, (128, 128), seven)
    assert options["variation_seed"] == 7 and "seed_resize_from" not in options  # seven() draws 7
    for body, match in (({"subseed_strength": 2}, "0 to 1"), ({"subseed_strength": 0.2, "subseed": "x"}, "subseed"),
                        ({"seed_resize_from_w": 4, "seed_resize_from_h": 4}, "8 to 16384"),
                        ({"subseed_strength": "0.2"}, "subseed_strength")):
        with pytest.raises(InvalidRequest, match=match):
            a1111.txt2img({"prompt": "a", **body}, MODEL, (128, 128), seven)
    for body in ({"subseed": 12}, {"subseed_strength": 0, "seed_resize_from_w": 512},
                 {"seed_resize_from_w": -1, "seed_resize_from_h": -1}):
        options = a1111.txt2img({"prompt": "a", **body}, MODEL, (128, 128), seven)
        assert not {"variation_seed", "variation_strength", "seed_resize_from"} & set(options)


@pytest.mark.parametrize("extra,match", [
    ({"init_images": []}, "init_images"), ({"init_images": ["not base64!"]}, "base64"),
    ({"init_images": [b64(Image.new("RGB", (8, 8))), b64(Image.new("RGB", (8, 8), 9))]}, "several"),
    ({"resize_mode": 4}, "resize and fill"), ({"resize_mode": 1.5}, "resize and fill"), ({"mask_blur_x": 3}, "differ"),
    ({"mask": b64(Image.new("L", (32, 32)))}, "Only masked"),
    ({"inpainting_fill": 4}, "latent nothing"), ({"enable_hr": True}, "txt2img"),
    ({"init_images": [b64(Image.new("L", (8000, 6000)))]}, "megapixels"),
    ({"init_images": ["http://example.com/a.png"]}, "URL"),
])
def test_img2img_refusals(extra, match):
    body = {"init_images": [b64(Image.new("RGB", (96, 64)))], "mask": b64(Image.new("L", (96, 64))), **extra}
    with pytest.raises(InvalidRequest, match=match):
        a1111.img2img(body, MODEL, (128, 128), seven)


def test_resize_modes_are_the_pipelines():
    """resize_mode 1 and 2 go to the pipeline, which fits the picture and the mask, blurred first, as
    the web UI does (tests/engine/test_resize_mode.py); "Only masked" takes the picture as sent, as
    the web UI does (it cuts the area around the mask instead); 0 and 3 are the pipeline's own resize."""
    image = Image.new("RGB", (96, 64), (9, 9, 9))
    mask = Image.new("L", (96, 64), 255)
    for mode in (0, 1, 2, 3, 2.0):
        body = {"init_images": [b64(image)], "resize_mode": mode, "width": 64, "height": 64}
        options = a1111.img2img(body, MODEL, (128, 128), seven)
        assert options["init_image"].tobytes() == image.tobytes() and options.get("resize_mode") == (
            mode if mode in (1, 2) else None)
        options = a1111.img2img({**body, "mask": b64(mask), "inpaint_full_res": False}, MODEL, (128, 128), seven)
        assert options["mask"].tobytes() == mask.tobytes() and options.get("resize_mode") == (
            mode if mode in (1, 2) else None)
        options = a1111.img2img({**body, "mask": b64(mask)}, MODEL, (128, 128), seven)
        assert "resize_mode" not in options and options["mask_crop"] == 0 and options["width"] == 64


def test_a_transparent_init_image_is_laid_over_white():
    """As AUTOMATIC1111's img2img flattens it (its img2img background colour, white by default):
    the colour under fully transparent pixels does not show, half-transparent ones are blended."""
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[..., 0] = 200  # red under it all
    a[:, 4:, 3] = 255  # the right half opaque, the left transparent
    a[0, 0, 3] = 128
    init = a1111.img2img({"init_images": [b64(Image.fromarray(a, "RGBA"))]}, MODEL, (128, 128), seven)["init_image"]
    got = np.asarray(init)
    assert init.mode == "RGB" and (got[1:, :4] == 255).all() and (got[:, 4:] == (200, 0, 0)).all()
    assert np.abs(got[0, 0].astype(int) - (228, 127, 127)).max() <= 1  # halfway to white


def test_a_mask_of_another_size_is_fitted_as_the_image_unless_only_masked():
    """AUTOMATIC1111 resizes a mask of another size to width x height, as it does the image (here
    the pipeline does); "Only masked" (inpaint_full_res) cuts the image by the mask, so there they
    must agree."""
    mask = Image.new("L", (48, 32))
    body = {"init_images": [b64(Image.new("RGB", (96, 64)))], "mask": b64(mask), "inpaint_full_res": False}
    options = a1111.img2img(body, MODEL, (128, 128), seven)
    assert options["mask"].tobytes() == mask.tobytes() and "mask_crop" not in options
    with pytest.raises(InvalidRequest, match="inpaint_full_res false"):
        a1111.img2img({**body, "inpaint_full_res": True}, MODEL, (128, 128), seven)


def test_controlnet_crop_and_resize_cuts_the_middle():
    """The ControlNet extension's "Crop and Resize": its image made to cover the size drawn, the
    middle cut out (as resize mode 1); its "Resize and Fill" pads otherwise than img2img's."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8))  # 100x50
    unit = {"enabled": True, "image": b64(image), "model": "canny", "resize_mode": "Crop and Resize"}
    control = a1111.txt2img({"alwayson_scripts": {"controlnet": {"args": [unit]}}, "width": 50, "height": 50},
                            MODEL, (64, 64), seven)["control_image"][0]
    assert control.tobytes() == image.crop((25, 0, 75, 50)).tobytes()  # no scaling: the middle
    # the extension rounds the scaled sides (67x48 to cover 52x52: 72.58 -> 73, where img2img's resize
    # mode floors them) and cuts at floor((73 - 52) / 2)
    image = Image.fromarray(rng.integers(0, 256, (48, 67, 3), dtype=np.uint8))
    unit = {**unit, "image": b64(image)}
    control = a1111.txt2img({"alwayson_scripts": {"controlnet": {"args": [unit]}}, "width": 52, "height": 52},
                            MODEL, (64, 64), seven)["control_image"][0]
    assert control.tobytes() == image.resize((73, 52), resample=Image.LANCZOS).crop((10, 0, 62, 52)).tobytes()


def test_controlnet_units():
    edges, depth = Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (99, 99, 99))
    units = [{"enabled": True, "image": b64(edges), "module": "none", "model": "canny [abcd1234]", "weight": 0.5,
              "guidance_start": 0.1, "guidance_end": 0.9, "resize_mode": "Just Resize"},
             {"enabled": False, "image": b64(depth), "model": "depth"},
             {"input_image": {"image": b64(depth)}, "model": "depth", "guidance": 0.7}]  # older names
    options = a1111.txt2img({"alwayson_scripts": {"ControlNet": {"args": units}}}, MODEL, (64, 64), seven)
    assert [p.getpixel((0, 0)) for p in options["control_image"]] == [(255, 255, 255), (99, 99, 99)]
    assert options["control_scale"] == [0.5, 1.0] and options["control_start"] == [0.1, 0.0]
    assert options["control_end"] == [0.9, 0.7]


@pytest.mark.parametrize("unit,match", [
    ({"module": "canny", "model": "canny"}, "preprocessors"), ({"model": "openpose"}, "not in this engine"),
    ({}, "name its model"), ({"model": "canny", "control_mode": "ControlNet is more important"}, "control_mode"),
    ({"model": "canny", "resize_mode": "Resize and Fill"}, "pads"), ({"module": 5}, "preprocessors"),
    ({"model": "canny", "resize_mode": [1]}, "resize_mode"), ({"model": "canny", "control_mode": True}, "control_mode"),
])
def test_controlnet_unit_refusals(unit, match):
    unit = {"enabled": True, "image": b64(Image.new("RGB", (64, 32))), **unit}
    with pytest.raises(InvalidRequest, match=match):
        a1111.txt2img({"alwayson_scripts": {"controlnet": {"args": [unit]}}}, MODEL, (64, 64), seven)


def test_noise_multiplier_is_img2imgs():
    from PIL import Image

    body = {"prompt": "a cat", "init_images": [b64(Image.new("RGB", (64, 64), "red"))]}
    assert a1111.img2img(body, MODEL, (128, 128), seven)["noise_multiplier"] == 1.0
    assert a1111.img2img({**body, "initial_noise_multiplier": 1.05}, MODEL, (128, 128), seven)["noise_multiplier"] == 1.05
    # its override_settings come after its request has taken the setting: no effect there, none here
    settings = {"override_settings": {"initial_noise_multiplier": 0.9}}
    assert a1111.img2img({**body, **settings}, MODEL, (128, 128), seven)["noise_multiplier"] == 1.0
    with pytest.raises(InvalidRequest, match="initial_noise_multiplier must be a finite number"):
        a1111.img2img({**body, "initial_noise_multiplier": "high"}, MODEL, (128, 128), seven)
    # txt2img ignores it, and keeps its options those of OpenAI's endpoint (the worker batches them)
    assert "noise_multiplier" not in a1111.txt2img({"prompt": "a", "initial_noise_multiplier": 1.1}, MODEL,
                                                   (128, 128), seven)


def test_styles_are_merged_into_the_prompts_and_the_hires_ones():
    from ldm_deploy.engine.styles import Style

    saved = {"Noir": Style("Noir", "film noir still of {prompt}", "colour"), "Sharp": Style("Sharp", "sharp", "")}
    body = {"prompt": "a cat", "styles": ["Noir", "Sharp"], "enable_hr": True, "hr_prompt": "a black cat",
            "hr_negative_prompt": "blur"}
    options = a1111.txt2img(body, MODEL, (128, 128), seven, saved)
    assert (options["prompt"], options["negative_prompt"]) == ("film noir still of a cat, sharp", "colour")
    assert (options["hires_prompt"], options["hires_negative_prompt"]) == ("film noir still of a black cat, sharp",
                                                                           "blur, colour")
    options = a1111.txt2img({"prompt": "a cat", "styles": ["Sharp"]}, MODEL, (128, 128), seven, saved)
    assert (options["prompt"], options["negative_prompt"]) == ("a cat, sharp", None)  # none: still none
    assert a1111.txt2img({"prompt": "a cat", "styles": []}, MODEL, (128, 128), seven, saved)["prompt"] == "a cat"
    with pytest.raises(InvalidRequest, match="styles is a list of style names, got 5"):
        a1111.txt2img({"prompt": "a cat", "styles": 5}, MODEL, (128, 128), seven, saved)
    with pytest.raises(InvalidRequest, match="no style named 'Pop'"):
        a1111.txt2img({"prompt": "a cat", "styles": ["Pop"]}, MODEL, (128, 128), seven, saved)
    with pytest.raises(InvalidRequest, match="this server has no saved styles .*--styles-file"):
        a1111.txt2img({"prompt": "a cat", "styles": ["Pop"]}, MODEL, (128, 128), seven)
