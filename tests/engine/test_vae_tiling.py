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


def pretend_decode(t: np.ndarray) -> np.ndarray:
    """A 'decoder' for the blend test: (B, 4, h, w) -> (B, 3, 8h, 8w), each latent pixel's first
    three channels as an 8 x 8 block, plus a ripple set by the tile's own values (so that each
    tile differs from its neighbours where they overlap)."""
    blocks = np.kron(t[:, :3], np.ones((8, 8), np.float32))
    y, x = np.mgrid[0:blocks.shape[2], 0:blocks.shape[3]].astype(np.float32)
    return blocks + np.sin(x * t.mean() + y * t.std()).astype(np.float32)


class Pretend(torch.nn.Module):
    def forward(self, z):
        return torch.from_numpy(pretend_decode(z.numpy()))


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
                num_images=2, generator=torch_noise(8), output_type="np", progress=False)
    i2i = StableDiffusionImg2ImgPipeline(**{**reference.components,
                                            "scheduler": EulerDiscreteScheduler.from_config(reference.scheduler.config)})
    i2i.set_progress_bar_config(disable=True)
    with tiles_of(reference.vae, 64), clamped(reference.vae):
        ref = i2i("a watercolour", image=image, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
                  num_images_per_prompt=2, generator=torch.Generator().manual_seed(8), output_type="np").images
    assert_not_saturated(ref)
    assert ours.shape == ref.shape == (2, H, W, 3) and np.abs(ours - ref).max() < TOL


def test_tiles_and_blends_are_diffusers(reference):
    """The grid and the in-place blends, on 'decoded tiles' that differ, against AutoencoderKL's own."""
    latents = np.random.default_rng(0).standard_normal((2, 4, 13, 10)).astype(np.float32)
    made = []
    ours = vae_tiling.decode(lambda t: made.append(t.shape) or pretend_decode(t), latents, 4, 8)
    vae = reference.vae
    original = (vae.decoder, vae.post_quant_conv)
    vae.post_quant_conv, vae.decoder = torch.nn.Identity(), Pretend()
    try:
        theirs = vae.tiled_decode(torch.from_numpy(latents)).sample.numpy()
    finally:
        vae.decoder, vae.post_quant_conv = original
    assert vae_tiling.tiles(13, 4) == [0, 3, 6, 9, 12] and len(made) == 5 * 4
    assert np.abs(ours - pretend_decode(latents)).max() > 0.5  # each tile its own ripple: not the whole's
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
    assert run_cli.main([*args, "--vae-tile-size", str(TILE), "--out", str(tmp_path / "tiled.png")]) == 0
    pipe = Pipeline.load(engine)
    pipe.enable_vae_tiling(TILE)
    want = pipe("a red door", steps=2, seed=9, width=W, height=H, sampler="euler", progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "tiled.png")), np.asarray(want))
    assert run_cli.main([*args, "--vae-tiling", "--vae-tile-size", "20", "--out", str(tmp_path / "bad.png")]) == 2
    assert "the VAE tile size must be a whole number of pixels, a multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_moments_are_found_where_a_trained_vaes_are():
    """A trained VAE's std is small beside its mean (logvar down to the clamp at -30): the two
    runs' difference still gives back its samples to float32's rounding."""
    rng = np.random.default_rng(2)
    mean = rng.uniform(-30, 30, (2, 4, 6, 5)).astype(np.float32)
    logvar = rng.uniform(-30, -5, mean.shape).astype(np.float32)
    std = np.exp(np.float32(0.5) * logvar)
    scaling = 0.18215

    def sampled(noise):  # our encoder graph's output
        return np.float32(scaling) * (mean + std * noise)

    found = vae_tiling.moments(sampled(np.zeros_like(mean)), sampled(np.full_like(mean, vae_tiling.SHIFT)),
                               vae_tiling.SHIFT, scaling)
    noise = rng.standard_normal(mean.shape).astype(np.float32)
    assert np.abs(vae_tiling.sample(found, noise, scaling) - sampled(noise)).max() < 4e-6
    assert np.abs(np.split(found, 2, axis=1)[1] - logvar).max() < 0.05  # (where std * noise counts, closer)


def test_tiles_run_grouped_by_shape():
    """OpenVINO --static-shapes compiles once a shape: each shape's tiles run one after another."""
    shapes = []
    vae_tiling.decode(lambda t: shapes.append(t.shape[2:]) or np.zeros((1, 3, t.shape[2] * 8, t.shape[3] * 8),
                                                                        np.float32),
                      np.zeros((1, 4, 13, 10), np.float32), 4, 8)
    assert len(shapes) == 20 and [s for i, s in enumerate(shapes) if i == 0 or s != shapes[i - 1]] == \
        [(4, 4), (4, 1), (1, 4), (1, 1)]


def test_tiles_an_engine_cannot_run_are_refused_first(engine_dirs):
    """Backends held to their engine's sides (TensorRT's profiles, torch's exported ranges) are told
    before drawing when a last tile falls outside them; ONNX Runtime runs any; --tiling engines none."""
    from dataclasses import replace

    from ldm_deploy.engine.manifest import DimRange, read_manifest

    manifest = read_manifest(engine_dirs["tiny-sd1"])
    sd15 = replace(manifest, dims={**manifest.dims, "latent_width": DimRange(32, 64, 128),
                                   "latent_height": DimRange(32, 64, 128)})
    vae_tiling.check_shapes(sd15, "tensorrt", 64, [(1024, 768), (512, 512)])  # tiles of 512, 384 and 256 px
    vae_tiling.check_shapes(sd15, "onnxruntime", 64, [(1280, 512)])
    with pytest.raises(InvalidRequest, match="a 1280x512 image has tiles 128 px wide, which this tensorrt engine "
                                             "cannot run \\(its sides: 256 to 1024 px, in multiples of 8\\)"):
        vae_tiling.check_shapes(sd15, "tensorrt", 64, [(1024, 1024), (1280, 512)])
    with pytest.raises(InvalidRequest, match="pads circularly"):
        vae_tiling.tile_of(None, replace(manifest.model, tiling=True))
    with pytest.raises(InvalidRequest, match="a multiple of 64"):  # a torch engine's sides are multiples of 64
        vae_tiling.tile_of(96, manifest.model, 64)


class Stop(Exception):
    pass


def test_a_progress_function_hears_each_tile_and_may_stop_between_them(engine_dirs):
    """After the last step, the decoder's 6 x 4 tiles each repeat the step counts to a progress
    function (ldm-serve's), which stops the call by raising: at the first tile, not after all."""
    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    pipe.enable_vae_tiling(TILE)
    heard = []
    pipe("a red door", steps=2, seed=9, width=W, height=H, sampler="euler", progress=lambda *c: heard.append(c))
    assert heard == [(1, 2), (2, 2)] + [(2, 2)] * 24

    def stop_at_a_tile(done, total):
        heard.append((done, total))
        if len(heard) == 3:
            raise Stop

    heard.clear()
    with pytest.raises(Stop):
        pipe("a red door", steps=2, seed=9, width=W, height=H, sampler="euler", progress=stop_at_a_tile)
    assert heard == [(1, 2), (2, 2), (2, 2)]
    pipe.disable_vae_tiling()
    heard.clear()
    pipe("a red door", steps=2, seed=9, width=W, height=H, sampler="euler", progress=lambda *c: heard.append(c))
    assert heard == [(1, 2), (2, 2)]  # whole: no tiles to hear


def test_encoder_tiles_are_heard_before_the_first_step(engine_dirs):
    """img2img's and inpainting's encoder tiles run before their pass's first step: heard as
    (0, steps), the pass's own count."""
    from PIL import Image

    pipe = Pipeline.load(engine_dirs["tiny-sd1"])
    pipe.enable_vae_tiling(64)  # 128 x 96 px: 3 x 2 encoder tiles, and 3 x 2 decoder tiles (8 latent px)
    init = Image.fromarray((smooth(W, H)[0].transpose(1, 2, 0) * 127.5 + 127.5).astype(np.uint8))
    heard = []
    pipe("a red door", init_image=init, strength=0.5, steps=4, seed=9, sampler="euler",
         progress=lambda *c: heard.append(c))
    assert heard == [(0, 2)] * 6 + [(1, 2), (2, 2)] + [(2, 2)] * 6
    heard.clear()
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (32, 32, 96, 64))
    pipe("a red door", init_image=init, mask=mask, strength=0.5, steps=4, seed=9, sampler="euler",
         progress=lambda *c: heard.append(c))
    assert heard[:6] == [(0, 2)] * 6 and heard[6:8] == [(1, 2), (2, 2)]
