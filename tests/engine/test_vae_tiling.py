"""VAE tiling (engine/vae_tiling.py) against diffusers' own: its pipelines with
`vae.enable_tiling()`, given the same noise, at tiles small enough that the tiny model's images
are cut into many (32 px: a 128 x 96 image is 6 x 4 tiles, the last ones 8 px wide; 64 px for
the encoder, whose blend would be one latent pixel at 32)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import assert_not_saturated
from diffusers import StableDiffusionPipeline

from ldm_deploy import Pipeline
from ldm_deploy.engine import vae_tiling
from ldm_deploy.errors import InvalidRequest

TOL = 2e-3
W, H, TILE = 128, 96, 32


class Clamped(torch.nn.Module):
    """diffusers' decoder with its output clamped to [-1, 1], as ours is before tiles are blended."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z, *args, **kwargs):
        return self.decoder(z, *args, **kwargs).clamp(-1, 1)


class Replay(torch.nn.Module):
    """A 'decoder' that gives back the given tiles in turn."""

    def __init__(self, tiles):
        super().__init__()
        self.tiles = tiles

    def forward(self, z):
        return torch.from_numpy(next(self.tiles).copy())


@pytest.fixture(scope="module")
def reference(model_dirs):
    pipe = StableDiffusionPipeline.from_pretrained(model_dirs["tiny-sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = TILE, TILE // 8
    return pipe


@contextlib.contextmanager
def tiles_of(vae, px: int):
    """diffusers' VAE tiling at `px` px tiles (their default: the VAE's sample_size)."""
    before = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = px, px // 8
    try:
        yield
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = before


@contextlib.contextmanager
def clamped(vae):
    decoder = vae.decoder
    vae.decoder = Clamped(decoder)
    try:
        yield
    finally:
        vae.decoder = decoder


def smooth(w: int, h: int) -> np.ndarray:
    """(1, 3, h, w) in [-1, 1]: a colourful image with structure for the encoder."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 9.0) * np.cos(y / 7.0)])
    return (rgb[None] * 2 - 1).astype(np.float32)


def draw(pipe, latents, generator, **kw):
    return pipe("a photo of an astronaut riding a horse", num_inference_steps=4, guidance_scale=7.5, width=W,
                height=H, latents=latents, generator=generator, output_type="np", **kw)


def test_tiled_decoding_matches_diffusers(reference, engine_dirs, torch_noise):
    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    latents = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    whole = draw(pipe, latents.numpy(), torch_noise(5), sampler="euler", progress=False)
    pipe.enable_vae_tiling(TILE)
    ours = draw(pipe, latents.numpy(), torch_noise(5), sampler="euler", progress=False)
    from diffusers import EulerDiscreteScheduler

    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    ref = draw(reference, latents.clone(), torch.Generator().manual_seed(5)).images
    assert_not_saturated(ref)
    assert ours.shape == ref.shape == (1, H, W, 3)
    assert np.abs(ours - whole).max() > 0.02  # the tiles' seams are blended, not the whole image decoded
    # diffusers blends tiles before clamping them, we after: the same where the decoder's output is in range
    with clamped(reference.vae):
        same = draw(reference, latents.clone(), torch.Generator().manual_seed(5)).images
    assert np.abs(ours - same).max() < TOL
    # and against diffusers' own, unchanged: equal but in the overlaps (every 24 px, 8 wide), where
    # a few pixels differ (the tiny random VAE's output leaves [-1, 1] more than a trained one's)
    overlap = np.zeros((H, W), bool)
    for start in range(24, W, 24):
        overlap[:, start:start + 8] = True
        overlap[start:start + 8, :] = True
    far = (np.abs(ours - ref) >= TOL).any(-1)[0]
    assert not (far & ~overlap).any() and far.mean() < 0.05, far.mean()


def test_tiled_encoding_matches_diffusers(reference, engine_dirs):
    """The encoder's distribution blended over tiles (found from two runs of our encoder graph
    each), sampled with the same noise: diffusers' tiled encode's latents."""
    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    pixels = smooth(W, H)
    sample = np.random.default_rng(1).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)
    whole = pipe.encode_latents(pixels, sample)
    pipe.enable_vae_tiling(64)
    ours = pipe.encode_latents(pixels, sample)
    vae = reference.vae
    with tiles_of(vae, 64), torch.no_grad():
        dist = vae.encode(torch.from_numpy(pixels)).latent_dist
        theirs = (vae.config.scaling_factor * (dist.mean + dist.std * torch.from_numpy(sample))).numpy()
    assert ours.shape == theirs.shape == (1, 4, H // 8, W // 8)
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max(), np.abs(ours - theirs).max()
    assert np.abs(ours - whole).max() > 100 * np.abs(ours - theirs).max()  # tiles encode otherwise than the whole


def test_img2img_with_tiles_matches_diffusers(reference, engine_dirs, torch_noise):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    pipe.enable_vae_tiling(64)
    image = Image.fromarray(np.round((smooth(W, H)[0].transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))
    ours = pipe("a watercolour", steps=4, guidance=7.5, sampler="euler", init_image=image, strength=0.6,
                generator=torch_noise(8), output_type="np", progress=False)
    i2i = StableDiffusionImg2ImgPipeline(**{**reference.components,
                                            "scheduler": EulerDiscreteScheduler.from_config(reference.scheduler.config)})
    i2i.set_progress_bar_config(disable=True)
    with tiles_of(reference.vae, 64), clamped(reference.vae):
        ref = i2i("a watercolour", image=image, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(8), output_type="np").images
    assert_not_saturated(ref)
    assert ours.shape == ref.shape == (1, H, W, 3) and np.abs(ours - ref).max() < TOL


def test_tiles_and_blends_are_diffusers(reference):
    """The grid and the in-place blends, on random 'decoded tiles', against AutoencoderKL's own."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 13, 10)).astype(np.float32)
    made = {}

    def fake_decode(t):  # each tile's 'image': random, of the decoded size, remembered by its corner
        out = rng.standard_normal((t.shape[0], 3, t.shape[2] * 8, t.shape[3] * 8)).astype(np.float32)
        made[len(made)] = out.copy()
        return out

    ours = vae_tiling.decode(fake_decode, latents, 4, 8)
    tiles = iter(made.values())
    vae = reference.vae
    original = (vae.decoder, vae.post_quant_conv)
    vae.post_quant_conv = torch.nn.Identity()
    vae.decoder = Replay(tiles)
    try:
        theirs = vae.tiled_decode(torch.from_numpy(latents)).sample.numpy()
    finally:
        vae.decoder, vae.post_quant_conv = original
    assert vae_tiling.tiles(13, 4) == [0, 3, 6, 9, 12] and len(made) == 5 * 4
    assert ours.shape == theirs.shape == (2, 3, 13 * 8, 10 * 8)
    assert np.abs(ours - theirs).max() < 1e-6


def test_small_images_decode_whole_and_bad_sizes_are_refused(engine_dirs):
    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    whole = pipe("a cat", steps=2, width=64, height=64, seed=1, output_type="np", progress=False)
    pipe.enable_vae_tiling()  # the model's own: its VAE's sample_size, 256 px, over the image
    assert pipe.vae_tile == 32
    assert np.array_equal(pipe("a cat", steps=2, width=64, height=64, seed=1, output_type="np", progress=False), whole)
    for bad in (12, 16, 30, 40, 32.0, True):
        with pytest.raises(InvalidRequest, match="a whole number of pixels, a multiple of 32"):
            pipe.enable_vae_tiling(bad)
    pipe.disable_vae_tiling()
    assert pipe.vae_tile is None


def test_ldm_run_tiles_as_the_api(engine_dirs, tmp_path, capsys):
    from PIL import Image

    from ldm_deploy.cli import run as run_cli

    engine = engine_dirs["tiny-sd1"]
    args = ["a red door", "--engine", str(engine), "--steps", "2", "--seed", "9", "--width", str(W), "--height",
            str(H), "--sampler", "euler", "-q"]
    assert run_cli.main([*args, "--vae-tiling", str(TILE), "--out", str(tmp_path / "tiled.png")]) == 0
    pipe = Pipeline.load(engine)
    pipe.enable_vae_tiling(TILE)
    want = pipe("a red door", steps=2, seed=9, width=W, height=H, sampler="euler", progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "tiled.png")), np.asarray(want))
    assert run_cli.main([*args, "--vae-tiling", "20", "--out", str(tmp_path / "bad.png")]) == 2
    assert "the VAE tile size must be a whole number of pixels, a multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
