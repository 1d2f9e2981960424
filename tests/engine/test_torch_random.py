"""Our numpy copy of torch's CPU normal draws against torch itself, and a seed against diffusers
given `torch.Generator().manual_seed(seed)`: the same image, without torch at run time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from conftest import assert_not_saturated
from ldm_deploy.engine.torch_random import TorchCpuRandom

# float32 Box-Muller with torch's vectorised sin / cos / log against numpy's: a few ulps.
ATOL = 2e-6


@pytest.mark.parametrize("seed", [0, 7, 123456789, 2**32 - 1, 2**32 + 5, 2**63 + 11])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (2, 4, 12, 16), (1, 4, 3, 5), (1, 4, 96, 88), (17,)])
def test_one_draw_equals_torch_randn(seed, shape):
    want = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
    got = TorchCpuRandom(seed).standard_normal(shape)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_successive_draws_of_mixed_sizes_equal_torch():
    """The generator's state carries over, the spare value of small draws included."""
    shapes = [(3,), (1, 4, 8, 8), (5,), (2, 4, 5, 5), (1,), (16,), (7,), (1, 4, 9, 7)]
    g, ours = torch.Generator().manual_seed(42), TorchCpuRandom(42)
    for shape in shapes:
        np.testing.assert_allclose(ours.standard_normal(shape), torch.randn(shape, generator=g).numpy(),
                                   rtol=0, atol=ATOL, err_msg=str(shape))


def reference(model_dir, img2img=False):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    if img2img:
        pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_seed_gives_diffusers_image_for_that_torch_seed(model_dirs, pipelines):
    """seed=7, num_images=2: images 7 and 8, as diffusers with one generator per image; euler_a
    draws noise every step, so the whole stream must agree, not just the first latents."""
    ref = reference(model_dirs["tiny-sd1"])
    want = ref(["a red fox"] * 2, num_inference_steps=5, guidance_scale=7.5, height=64, width=96, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    got = pipelines["tiny-sd1"]("a red fox", num_images=2, seed=7, steps=5, guidance=7.5, height=64, width=96,
                                sampler="euler_a", output_type="np", progress=False)
    assert_not_saturated(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_img2img_seed_gives_diffusers_image(model_dirs, pipelines):
    y, x = np.mgrid[0:64, 0:64]
    init = Image.fromarray((np.stack([x / 64, y / 64, 0.5 + 0 * x], -1) * 255).astype(np.uint8))
    want = reference(model_dirs["tiny-sd2"], img2img=True)(
        "a watercolor", image=init, strength=0.6, num_inference_steps=5, guidance_scale=7.5, output_type="np",
        generator=torch.Generator().manual_seed(3)).images
    got = pipelines["tiny-sd2"]("a watercolor", init_image=init, strength=0.6, seed=3, steps=5, guidance=7.5,
                                sampler="euler_a", output_type="np", progress=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
