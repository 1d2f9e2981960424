"""Our numpy Brownian tree (DPM++ SDE's noise) against torchsde's BrownianInterval, which
diffusers' DPMSolverSDEScheduler draws from, at the same query times."""

import numpy as np
import pytest
import torch
import torchsde
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

from ldm_deploy.engine.samplers.brownian import BrownianTree, row_noise, unit_noise

LO, HI = 0.029167532, 14.614647  # SD 1.x's sigma range, float32 values as diffusers passes them


def torchsde_tree(size, seed):
    # diffusers' BatchedBrownianTree settings
    return torchsde.BrownianInterval(t0=LO, t1=HI, size=size, dtype=torch.float32, entropy=seed, tol=1e-6,
                                     pool_size=24, halfway_tree=True)


@pytest.mark.parametrize("seed", [0, 1234, 2**32 - 1])
def test_increments_match_torchsde(seed):
    size = (4, 8, 8)
    ref, ours = torchsde_tree(size, seed), BrownianTree(LO, HI, size, seed)
    rng = np.random.default_rng(seed % 1000)
    # random intervals, then the whole span, a point query's edge cases and nested ones
    queries = [tuple(sorted(np.float32(rng.uniform(LO, HI, 2)))) for _ in range(30)]
    queries += [(LO, HI), (LO, LO), (0.5, 0.75), (0.5, 0.625), (13.0, HI), (2.0, 2.000001)]
    for ta, tb in queries:
        expected = ref(float(ta), float(tb)).numpy()
        got = ours.increment(float(ta), float(tb))
        assert got.dtype == np.float32 and got.shape == size
        # torch.randn redone in numpy is a few float32 ulps off; values reach ~4 sigma * sqrt(14.6)
        np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6, err_msg=f"[{ta}, {tb}]")


def test_increments_do_not_depend_on_query_order():
    a, b = BrownianTree(LO, HI, (3,), 7), BrownianTree(LO, HI, (3,), 7)
    first = [a.increment(0.1, 0.2), a.increment(5.0, 9.0)]
    second = [b.increment(5.0, 9.0), b.increment(0.1, 0.2)][::-1]
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    whole = a.increment(0.1, 9.0)
    parts = a.increment(0.1, 5.0) + a.increment(5.0, 9.0)  # additive: one path
    np.testing.assert_allclose(whole, parts, rtol=0, atol=1e-5)


def test_unit_noise_matches_diffusers_noise_sampler_one_tree_per_image():
    x = torch.zeros(2, 4, 8, 8)
    seeds = [11, 12]
    ref = BrownianTreeNoiseSampler(x, LO, HI, seed=seeds)  # a list: one tree per image
    steps = [(HI, np.float32(10.5)), (np.float32(10.5), np.float32(3.25)), (np.float32(0.5), LO)]
    terms = tuple(((1.0, a, b),) for a, b in steps) + ((),)
    got = row_noise(((LO, HI), terms), seeds, tuple(x.shape))
    for (a, b), noise in zip(steps, got):
        expected = ref(torch.tensor(a), torch.tensor(b)).numpy()
        assert noise.shape == (2, 4, 8, 8)
        np.testing.assert_allclose(noise, expected, rtol=0, atol=4e-6)
    assert got[-1] is None  # a row without terms takes no noise
    one = BrownianTree(LO, HI, (4, 8, 8), 12)
    np.testing.assert_array_equal(got[0][1], unit_noise(one, HI, np.float32(10.5)))  # image 1: its own seed's


def test_query_outside_the_span_is_clamped_and_backwards_refused():
    tree = BrownianTree(LO, HI, (2,), 3)
    np.testing.assert_array_equal(tree.increment(0.0, LO), np.zeros(2, np.float32))
    np.testing.assert_array_equal(tree.increment(LO, 99.0), tree.increment(LO, HI))
    # equal once rounded to torchsde's 1e-6 (where torchsde itself recurses without end)
    np.testing.assert_array_equal(tree.increment(1.0, 1.0000001), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="runs forward"):
        tree.increment(2.0, 1.0)
