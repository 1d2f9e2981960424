"""Latent resizing in numpy against torch.nn.functional.interpolate, which AUTOMATIC1111's
"Latent" hires upscalers call: every mode, enlarging by whole and fractional factors, odd sizes,
shrinking, and the same size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_deploy.engine.latent_resize import LATENT_UPSCALERS, resize


@pytest.mark.parametrize("name", list(LATENT_UPSCALERS))
@pytest.mark.parametrize("size, target", [((8, 12), (16, 24)), ((12, 8), (18, 12)), ((7, 9), (13, 20)),
                                          ((6, 10), (17, 31)), ((9, 9), (9, 9)), ((16, 16), (8, 12))])
def test_resize_matches_torch_interpolate(name, size, target):
    mode, antialias = LATENT_UPSCALERS[name]
    x = np.random.default_rng(sum(size + target)).standard_normal((2, 4, *size)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=target, mode=mode, antialias=antialias).numpy()
    got = resize(x, *target, mode, antialias)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
