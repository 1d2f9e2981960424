"""AUTOMATIC1111's img2img resize modes against its `modules/images.py: resize_image` (no upscaler
for img2img set, its default), written out below from its source, branch by branch, since the
web UI cannot be installed here."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_deploy.engine.resize_mode import fit
from ldm_deploy.errors import InvalidRequest


def web_ui_resize(mode, picture, width, height):
    """What stable-diffusion-webui 1.10's `images.resize_image(mode, picture, width, height)` does,
    step by step: mode 0 a Lanczos resize; 1 and 2 a Lanczos resize to sides it computes with
    floor division (1: the side that overflows, 2: the side that falls short), pasted on a black
    RGB canvas at (width // 2 - w // 2, height // 2 - h // 2); then, for 2, each band pasted as
    PIL's default resampling (bicubic) of a box of no height (no width) at the resized edge."""
    if mode == 0:
        return picture.resize((width, height), resample=Image.LANCZOS)
    wider = width / height < picture.width / picture.height  # (the picture wider than drawn)
    same = width / height == picture.width / picture.height
    keep_width = (not wider and not same) if mode == 1 else wider
    w = width if keep_width else picture.width * height // picture.height
    h = picture.height * width // picture.width if keep_width else height
    scaled = picture.resize((w, h), resample=Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, box=(width // 2 - w // 2, height // 2 - h // 2))
    if mode == 2 and not same:
        if wider:  # bands above and below
            band = height // 2 - h // 2
            canvas.paste(scaled.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(scaled.resize((width, band), box=(0, scaled.height, width, scaled.height)), box=(0, band + h))
        else:  # left and right
            band = width // 2 - w // 2
            canvas.paste(scaled.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(scaled.resize((band, height), box=(scaled.width, 0, scaled.width, height)), box=(band + w, 0))
    return canvas


# (picture width, height, drawn width, height): wider, taller, the same aspect, odd sides, enlarged
SIZES = [(640, 480, 512, 512), (480, 640, 512, 512), (100, 30, 56, 48), (61, 97, 64, 64), (97, 61, 64, 48),
         (333, 500, 512, 768), (500, 333, 768, 512), (1024, 768, 512, 384), (64, 64, 96, 64), (50, 50, 48, 64)]


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("sides", SIZES, ids=lambda s: "{}x{}-to-{}x{}".format(*s))
def test_crop_and_fill_are_the_web_uis(mode, sides):
    rng = np.random.default_rng(sum(sides) + mode)
    w, h, width, height = sides
    picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    got, want = fit(mode, picture, width, height), web_ui_resize(mode, picture, width, height)
    assert got.size == want.size == (width, height)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    # a greyscale mask the same way (the web UI's RGB canvas, back to grey, holds the same values)
    mask = Image.fromarray(((rng.random((h, w)) > 0.5) * 255).astype(np.uint8))
    assert np.array_equal(np.asarray(fit(mode, mask, width, height)),
                          np.asarray(web_ui_resize(mode, mask, width, height).convert("L")))


def test_just_resize_is_left_to_the_pipeline():
    """Modes 0 and 3 return the picture as it is: the pipeline's own Lanczos resize is mode 0's."""
    picture = Image.new("RGB", (100, 30), (10, 20, 30))
    assert fit(0, picture, 64, 64) is picture and fit(3, picture, 64, 64) is picture
    assert fit(1, picture, 100, 30) is picture  # (already the size drawn)


def test_fill_stretches_the_edges_into_the_bands():
    """Mode 2 of a wide picture into a square: the picture scaled to the width in the middle, the
    bands above and below made of its top and bottom rows (so a picture whose top rows are red
    and bottom rows blue gets red and blue bands)."""
    a = np.zeros((40, 80, 3), dtype=np.uint8)
    a[:20] = (255, 0, 0)
    a[20:] = (0, 0, 255)
    out = np.asarray(fit(2, Image.fromarray(a), 64, 64)).astype(int)
    assert (np.abs(out[:8] - (255, 0, 0)).max(), np.abs(out[-8:] - (0, 0, 255)).max()) == (0, 0)
    assert np.abs(out[20:28] - (255, 0, 0)).max() <= 2 and np.abs(out[36:44] - (0, 0, 255)).max() <= 2


def picture_and_mask(w: int, h: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(w * h)
    picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = Image.new("L", (w, h))
    mask.paste(255, (w // 4, h // 4, w // 2, h // 2))
    return picture, mask


@pytest.mark.parametrize("mode", ["crop-and-resize", "resize-and-fill", 1, 2])
def test_the_pipeline_fits_the_picture_and_its_blurred_mask(mode, pipelines):
    """img2img and inpainting with resize_mode draw what the picture (and the mask, blurred at its
    own size first, as AUTOMATIC1111 blurs it) fitted by the web UI's resize draws."""
    pipe = pipelines["tiny-sd1"]
    picture, mask = picture_and_mask(160, 96)
    number = mode if isinstance(mode, int) else {"crop-and-resize": 1, "resize-and-fill": 2}[mode]
    call = dict(steps=3, seed=4, width=64, height=64, progress=False, output_type="np")
    got = pipe("a cat", init_image=picture, resize_mode=mode, strength=0.6, **call)
    want = pipe("a cat", init_image=web_ui_resize(number, picture, 64, 64), strength=0.6, **call)
    assert np.array_equal(got, want)
    got = pipe("a cat", init_image=picture, mask=mask, mask_blur=4, resize_mode=mode, **call)
    blurred = web_ui_resize(number, mask.filter(ImageFilter.GaussianBlur(4)), 64, 64).convert("L")
    want = pipe("a cat", init_image=web_ui_resize(number, picture, 64, 64), mask=blurred, **call)
    assert np.array_equal(got, want)
    # an array mask is fitted as its black and white picture, and cut again
    got = pipe("a cat", init_image=picture, mask=np.asarray(mask) / 255.0, resize_mode=mode, **call)
    want = pipe("a cat", init_image=web_ui_resize(number, picture, 64, 64),
                mask=np.asarray(web_ui_resize(number, mask, 64, 64).convert("L")) >= 128, **call)
    assert np.array_equal(got, want)


def test_resize_modes_that_change_nothing_and_bad_ones(pipelines, caplog):
    pipe = pipelines["tiny-sd1"]
    pipe.warned = {w for w in pipe.warned if w[0] != "resize_mode"}  # (said once per pipeline)
    picture, mask = picture_and_mask(160, 96)
    call = dict(steps=2, seed=4, progress=False, output_type="np")
    plain = pipe("a cat", init_image=picture, width=64, height=64, **call)
    for mode in ("just-resize", 0, 3, "just-resize-latent"):  # (3: in pixels here)
        assert np.array_equal(pipe("a cat", init_image=picture, width=64, height=64, resize_mode=mode, **call), plain)
    # no size given: the picture's own aspect is drawn; mask_crop cuts the picture instead (as "Only masked");
    # each said once
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert np.array_equal(pipe("a cat", init_image=picture, resize_mode="crop-and-resize", **call),
                                  pipe("a cat", init_image=picture, **call))
            crop = dict(init_image=picture, mask=mask, mask_crop=8, width=64, height=64, **call)
            assert np.array_equal(pipe("a cat", resize_mode=1, **crop), pipe("a cat", **crop))
            pipe("a cat", resize_mode=2, steps=1, width=64, height=64, progress=False)
    for idle in ("neither width nor height is given", "mask_crop (--mask-crop) cuts the area around the mask",
                 "there is no init image"):
        assert caplog.text.count(idle) == 1, idle
    for mode, match in (("crop", "'crop-and-resize'"), (True, "0 to 3"), (4, "0 to 3")):
        with pytest.raises(InvalidRequest, match=match):
            pipe("a cat", init_image=picture, width=64, height=64, resize_mode=mode, **call)
    latents = pipe("a cat", steps=2, seed=1, width=64, height=64, progress=False, output_type="latent")
    with pytest.raises(InvalidRequest, match="init latents"):
        pipe("a cat", init_image=latents, width=64, height=64, resize_mode=2, **call)


def test_masks_of_every_mode_and_one_side_given(pipelines):
    """A palette or 1-bit mask is fitted as its grey picture (a palette's indices would turn black on
    a new canvas); a side not given is the picture's own, as the pipeline draws it."""
    pipe = pipelines["tiny-sd1"]
    picture, mask = picture_and_mask(160, 96)
    call = dict(init_image=picture, steps=2, seed=4, width=64, height=64, resize_mode=1, progress=False,
                output_type="np")
    grey = pipe("a cat", mask=mask, **call)
    for other in (mask.convert("P"), mask.convert("1")):
        assert np.array_equal(pipe("a cat", mask=other, **call), grey), other.mode
    # height not given: the picture's own (96), so crop-and-resize cuts 160x96 to 64x96's aspect
    got = pipe("a cat", **{**call, "height": None})
    want = pipe("a cat", **{**call, "init_image": web_ui_resize(1, picture, 64, 96), "height": None})
    assert got.shape == (1, 96, 64, 3) and np.array_equal(got, want)


def test_a_sliver_is_refused():
    with pytest.raises(InvalidRequest, match="too thin to resize-and-fill to 64x64: it scales to 64x0"):
        fit(2, Image.new("RGB", (2000, 1)), 64, 64)


def test_ldm_run_resize_mode(engine_dirs, tmp_path, capsys):
    from ldm_deploy.cli import run as run_cli

    picture, _ = picture_and_mask(160, 96)
    picture.save(tmp_path / "wide.png")
    out = tmp_path / "out.png"
    args = ["a cat", "--engine", str(engine_dirs["tiny-sd1"]), "--init-image", str(tmp_path / "wide.png"),
            "--width", "64", "--height", "64", "--steps", "2", "--seed", "3", "--quiet", "--out", str(out)]
    assert run_cli.main(args + ["--resize-mode", "resize-and-fill"]) == 0, capsys.readouterr().err
    from ldm_deploy import Pipeline

    want = Pipeline.load(engine_dirs["tiny-sd1"])("a cat", init_image=web_ui_resize(2, picture, 64, 64), width=64,
                                                  height=64, steps=2, seed=3, progress=False)[0]
    with Image.open(out) as got:
        assert np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(SystemExit) as exit:  # (argparse's refusal)
        run_cli.main(args + ["--resize-mode", "crop"])
    assert exit.value.code == 2 and "invalid choice: 'crop'" in capsys.readouterr().err
