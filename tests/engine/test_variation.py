"""AUTOMATIC1111's variation seeds ("Variation seed", "Variation strength", "Resize seed from").

The oracle for the noise is a torch version of its ImageRNG.first (modules/rng.py) with its CPU
random source, written here from its code; for the images, diffusers given that noise as
`latents` and a generator that goes on from there as ours does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import assert_not_saturated, diffusers_schedulers
from ldm_deploy.cli import run as run_cli
from ldm_deploy.engine import infotext, noise
from ldm_deploy.engine.request import Request
from ldm_deploy.engine.torch_random import TorchCpuRandom
from ldm_deploy.errors import InvalidRequest

TOL = 2e-3
W, H = 128, 96


def a1111_slerp(val, low, high):
    """Its slerp of two (C, h, w) tensors: norms and dot products along dim 1."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def a1111_first(shape, seeds, subseeds, strength, resize_h=0, resize_w=0):
    """Its ImageRNG(shape (C, h, w), ...).first() with randn_source "CPU": (B, C, h, w)."""
    def randn(seed, s):
        return torch.randn(s, generator=torch.Generator().manual_seed(seed))

    small = shape if resize_h <= 0 or resize_w <= 0 else (shape[0], resize_h // 8, resize_w // 8)
    out = []
    for i, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        sub = randn(subseeds[i], small) if strength else None
        x = randn(seed, small) if small != shape else torch.randn(shape, generator=generator)
        if sub is not None:
            x = a1111_slerp(strength, x, sub)
        if small != shape:
            full = torch.randn(shape, generator=generator)
            dx, dy = (shape[2] - small[2]) // 2, (shape[1] - small[1]) // 2
            w = small[2] if dx >= 0 else small[2] + 2 * dx
            h = small[1] if dy >= 0 else small[1] + 2 * dy
            tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
            full[:, ty:ty + h, tx:tx + w] = x[:, sy:sy + h, sx:sx + w]
            x = full
        out.append(x)
    return torch.stack(out)


def request(seeds, variation_seeds=(), strength=0.0, resize=None, width=W, height=H) -> Request:
    n = len(seeds)
    return Request(prompts=("x",) * n, negative_prompts=("",) * n, seeds=tuple(seeds), steps=1, guidance=7.5,
                   sampler="euler", width=width, height=height, strength=1.0, variation_seeds=tuple(variation_seeds),
                   variation_strength=strength, seed_resize_from=resize)


@pytest.mark.parametrize("strength,resize", [
    (0.3, None), (1.0, None), (0.05, None),
    (0.0, (96, 64)),  # drawn smaller: pasted into the middle
    (0.0, (200, 152)),  # larger: its middle cut out
    (0.6, (72, 120)),  # narrower and taller, odd differences in latents, and varied
])
def test_noise_is_automatic1111s(strength, resize):
    seeds, subseeds, shape = (11, 11), (40, 41), (2, 4, H // 8, W // 8)
    req = request(seeds, subseeds if strength else (), strength, resize)
    ours = noise.start(noise.seeded(seeds), shape, req)
    want = a1111_first(shape[1:], seeds, subseeds, strength, *(resize[::-1] if resize else (0, 0)))
    np.testing.assert_allclose(ours, want.numpy(), rtol=0, atol=2e-5)
    assert not np.allclose(ours[0], ours[1]) if strength else np.array_equal(ours[0], ours[1])


def test_a_variation_seed_equal_to_the_seed_takes_its_linear_branch():
    """Its slerp falls back to low * t + high * (1 - t) where the two noises point alike."""
    shape = (1, 4, 8, 8)
    ours = noise.start(noise.seeded([5]), shape, request([5], [5], 0.3, width=64, height=64))
    np.testing.assert_allclose(ours, a1111_first(shape[1:], [5], [5], 0.3).numpy(), rtol=0, atol=2e-5)


def test_the_variation_is_drawn_where_the_start_noise_is_in_its_seeds_stream():
    """img2img's start noise comes after the image's VAE sample (diffusers' order): the variation
    seed's noise, and the seed's at another size, are drawn at that place in their streams."""
    def after_sample(seed, shape):
        g = TorchCpuRandom(seed)
        g.standard_normal((1, 4, 12, 16))
        return g.standard_normal((1,) + shape)[0]

    for strength, resize in ((1.0, None), (0.3, (96, 64))):
        gens = noise.seeded([5, 5])
        for g in gens:
            g.standard_normal((1, 4, 12, 16))  # the image's sample
        x = noise.start(gens, (2, 4, 12, 16), request([5, 5], [9, 10], strength, resize))
        small = (4, 8, 12) if resize else (4, 12, 16)
        for i, v in enumerate((9, 10)):
            own = noise.slerp(strength, after_sample(5, small), after_sample(v, small))
            np.testing.assert_array_equal(x[i, :, 2:10, 2:14] if resize else x[i], own)


def test_seeds_of_a_batch_of_variations(pipelines):
    """As AUTOMATIC1111 draws a batch with a variation strength: every image the seed, variation
    seeds going up; without a strength, seeds going up."""
    seeds, varied = noise.variation(7, 20, 0.1, None, 3, None, None)
    assert seeds == (7, 7, 7) and varied["variation_seeds"] == (20, 21, 22)
    seeds, varied = noise.variation(7, None, 0.0, None, 3, None, None)
    assert seeds == (7, 8, 9) and varied["variation_seeds"] == ()
    seeds, varied = noise.variation([3, 9], [1, 2], 0.5, [64, 32], 2, None, None)  # lists: as given
    assert seeds == (3, 9) and varied == {"variation_seeds": (1, 2), "variation_strength": 0.5,
                                          "seed_resize_from": (64, 32)}
    assert len(set(noise.variation(7, -1, 0.2, None, 1, None, None)[1]["variation_seeds"])) == 1  # random


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras"])
def test_images_are_diffusers_given_that_noise(sampler, model_dirs, pipelines):
    """Two variations of seed 11 (variation seeds 40, 41), its noise drawn at 96x64 and pasted:
    each diffusers' image given the noise as latents and the seed's generator past its first draw
    (Euler a's step noise goes on from there)."""
    cls, options = diffusers_schedulers()[sampler]
    ref = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = cls.from_config(ref.scheduler.config, **options)
    got = pipelines["tiny-sd1"]("a lighthouse", seed=11, variation_seed=40, variation_strength=0.3, num_images=2,
                                seed_resize_from=(96, 64), steps=4, width=W, height=H, sampler=sampler,
                                output_type="np", progress=False)
    start = a1111_first((4, H // 8, W // 8), [11, 11], [40, 41], 0.3, 64, 96)
    for i in range(2):
        generator = torch.Generator().manual_seed(11)
        torch.randn((1, 4, H // 8, W // 8), generator=generator)  # the start noise's draw
        want = ref("a lighthouse", num_inference_steps=4, guidance_scale=7.5, height=H, width=W,
                   latents=start[i:i + 1].clone(), generator=generator, output_type="np").images
        assert_not_saturated(want)
        np.testing.assert_allclose(got[i:i + 1], want, rtol=0, atol=TOL)
    assert np.abs(got[0] - got[1]).mean() > 0.01  # two variations


def test_full_strength_is_the_variation_seeds_image(pipelines):
    """Strength 1 is the variation seed's noise: without step noise, its seed's image."""
    pipe = pipelines["tiny-sd1"]
    kw = dict(steps=3, width=64, height=64, sampler="dpmpp_2m", output_type="np", progress=False)
    np.testing.assert_allclose(pipe("a", seed=5, variation_seed=9, variation_strength=1.0, **kw),
                               pipe("a", seed=9, **kw), rtol=0, atol=1e-5)
    close = pipe("a", seed=5, variation_seed=9, variation_strength=0.05, **kw)
    assert np.abs(close - pipe("a", seed=5, **kw)).max() < np.abs(close - pipe("a", seed=9, **kw)).max()


def test_init_latents_at_full_strength_are_the_variation_seeds_image(pipelines):
    pipe = pipelines["tiny-sd1"]
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kw = dict(init_image=latents, strength=0.7, steps=3, sampler="dpmpp_2m", output_type="np", progress=False)
    np.testing.assert_allclose(pipe("a", seed=5, variation_seed=9, variation_strength=1.0, **kw),
                               pipe("a", seed=9, **kw), rtol=0, atol=1e-5)


def test_a_batch_of_inpainting_variations_varies_one_noise(pipelines):
    """Each image draws the image's sample from its own generator, then its start noise: with
    variations, every image of one seed shares its noise (here at a strength too small to show:
    the images are one, but for rounding)."""
    pipe = pipelines["tiny-sd1"]
    image = np.full((64, 64, 3), 0.4, np.float32)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    got = pipe("a", init_image=image, mask=mask, strength=0.7, seed=1, num_images=3, variation_seed=3,
               variation_strength=1e-6, steps=2, sampler="euler_a", output_type="np", progress=False)
    assert np.abs(got[1:] - got[0]).max() < 1e-4  # three images, past the engine's batch of 2
    assert np.abs(got[0] - pipe("a", init_image=image, mask=mask, strength=0.7, seed=1, steps=2, sampler="euler_a",
                                output_type="np", progress=False)[0]).max() < 1e-4  # and the seed's image


def test_a_batch_past_the_engines_is_each_images_own(pipelines):
    pipe = pipelines["tiny-sd1"]
    kw = dict(seed=5, variation_strength=0.4, steps=2, width=64, height=64, sampler="euler_a", output_type="np",
              progress=False, seed_resize_from=(48, 96))
    three = pipe("a", variation_seed=9, num_images=3, **kw)  # chunks of 2 and 1
    np.testing.assert_allclose(three[2:], pipe("a", variation_seed=11, **kw), rtol=0, atol=1e-4)
    np.testing.assert_allclose(three[1:2], pipe("a", variation_seed=10, **kw), rtol=0, atol=1e-4)


def test_img2img_inpainting_and_the_hires_fix_vary_their_start_noise(pipelines, monkeypatch):
    """Every start noise is varied: img2img's and inpainting's added noise, the hires fix's second
    pass (with the image's seed and variation seed, as AUTOMATIC1111's hires pass makes its noise)."""
    pipe = pipelines["tiny-sd1"]
    seen = []
    vary = noise.vary
    monkeypatch.setattr(noise, "vary", lambda x, *a: seen.append((x.shape, a)) or vary(x, *a))
    image = np.full((64, 64, 3), 0.4, np.float32)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    kw = dict(steps=2, variation_seed=3, variation_strength=0.2, output_type="np", progress=False)
    pipe("a", init_image=image, seed=1, **kw)
    pipe("a", init_image=image, mask=mask, strength=0.7, seed=1, **kw)
    pipe("a", seed=1, width=64, height=64, hires_scale=1.5, num_images=2, **kw)
    assert [([g.seed for g in a[0]], a[1], a[2]) for _, a in seen] == [([1], (3,), 0.2)] * 2 + \
        [([1, 1], (3, 4), 0.2)] + [([1], (3,), 0.2), ([1], (4,), 0.2)]  # the hires pass: image by image
    assert seen[-1][0] == (1, 4, 12, 12)
    # the seeds' own generators given: the hires pass goes on with each image's (a list of one),
    # its noise varied there too (seen: its start noise at the hires size)
    seen.clear()
    by_generators = pipe("a", generator=noise.seeded([1, 1]), width=64, height=64, hires_scale=1.5, num_images=2,
                         **kw)
    assert by_generators.shape == (2, 96, 96, 3) and [x for x, _ in seen[1:]] == [(1, 4, 12, 12)] * 2


def test_infotext_and_from_png(pipelines, tmp_path):
    pipe = pipelines["tiny-sd1"]
    images = pipe("a", seed=5, variation_seed=9, variation_strength=0.25, seed_resize_from=(96, 64), num_images=2,
                  steps=2, width=64, height=64, progress=False)
    text = images[1].info["parameters"]
    assert "Seed: 5, Size: 64x64" in text
    assert "Variation seed: 10, Variation seed strength: 0.25, Seed resize from: 96x64" in text
    options, warnings = infotext.settings(infotext.parse(text)[2])
    assert (options["seed"], options["variation_seed"], options["variation_strength"], options["seed_resize_from"]) \
        == (5, 10, 0.25, (96, 64)) and not warnings
    assert "Variation" not in pipe("a", seed=5, steps=1, width=64, height=64, progress=False)[0].info["parameters"]
    images[1].save(tmp_path / "v.png", pnginfo=_pnginfo(text))
    out = tmp_path / "again.png"
    assert run_cli.main(["--engine", str(pipe.engine_dir), "--from-png", str(tmp_path / "v.png"), "--out", str(out),
                         "-q"]) == 0
    from PIL import Image

    assert np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(images[1], np.int16)).max() <= 1


def test_pngs_of_automatic1111s_api_and_variations_turned_off(pipelines, tmp_path, capsys):
    """Its 1.3-1.5 API wrote "Seed resize from: -1x-1" (none) into every image; a variation read
    from a PNG is turned off by --variation-strength 0, a resize by --seed-resize-from 0x0."""
    fields = infotext.parse("p\nSteps: 5, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 64x64, "
                            "Seed resize from: -1x-1")[2]
    options, warnings = infotext.settings(fields)
    assert options["seed"] == 1 and "seed_resize_from" not in options
    assert len(warnings) == 1 and "noise on the GPU" in warnings[0]  # (no RNG field: its GPU noise)
    pipe = pipelines["tiny-sd1"]
    image = pipe("a", seed=5, variation_seed=9, variation_strength=0.25, seed_resize_from=(96, 64), steps=1,
                 width=64, height=64, progress=False)[0]
    image.save(tmp_path / "v.png", pnginfo=_pnginfo(image.info["parameters"]))
    plain = pipe("a", seed=5, steps=1, width=64, height=64, progress=False)[0]
    out = tmp_path / "off.png"
    assert run_cli.main(["--engine", str(pipe.engine_dir), "--from-png", str(tmp_path / "v.png"), "--out", str(out),
                         "--variation-strength", "0", "--seed-resize-from", "0x0", "-q"]) == 0
    from PIL import Image

    assert np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(plain, np.int16)).max() <= 1
    assert "Variation" not in Image.open(out).info["parameters"]


def _pnginfo(text):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


@pytest.mark.parametrize("kw,match", [
    ({"variation_strength": 1.5}, "from 0 to 1"), ({"variation_strength": "0.1"}, "from 0 to 1"),
    ({"variation_seed": 4}, "give variation_strength too"),
    ({"seed_resize_from": (512,)}, r"\(width, height\)"), ({"seed_resize_from": (4, 512)}, "from 8 to 16384"),
    ({"seed_resize_from": (64.5, 64)}, "whole number"),
    ({"variation_strength": 0.2, "latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents are the start noise"),
    ({"variation_strength": 0.2, "generator": torch.Generator().manual_seed(1)}, "pass seed instead"),
    ({"seed_resize_from": (64, 64), "generator": [np.random.default_rng(1)]}, "pass seed instead"),
    ({"variation_seed": np.array([1, 2])}, "give variation_strength too"),
])
def test_bad_variations_are_refused(kw, match, pipelines):
    with pytest.raises(InvalidRequest, match=match):
        pipelines["tiny-sd1"]("a", steps=1, width=64, height=64, progress=False, **kw)


def test_cli_options(pipelines, tmp_path, capsys):
    engine = str(pipelines["tiny-sd1"].engine_dir)
    out = tmp_path / "v.png"
    assert run_cli.main(["a", "--engine", engine, "--steps", "1", "--seed", "3", "--variation-strength", "0.4",
                         "--variation-seed", "8", "--seed-resize-from", "96x64", "--out", str(out), "-q"]) == 0
    from PIL import Image

    assert "Variation seed: 8, Variation seed strength: 0.4, Seed resize from: 96x64" in \
        Image.open(out).info["parameters"]
    with pytest.raises(SystemExit) as exit_:  # argparse's own error
        run_cli.main(["a", "--engine", engine, "--seed-resize-from", "96by64"])
    assert exit_.value.code == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert run_cli.main(["a", "--engine", engine, "--variation-seed", "8", "--out", str(out)]) == 2
    assert "give --variation-strength too" in capsys.readouterr().err
    assert run_cli.main(["a", "--engine", engine, "--variation-strength", "2", "--out", str(out)]) == 2
    assert "--variation-strength is from 0 to 1" in capsys.readouterr().err
