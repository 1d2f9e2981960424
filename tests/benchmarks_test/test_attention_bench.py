"""benchmarks.attention's tile columns: the autotuner's per-config timings turned into the
fastest plain and the fastest pipelined tile, each run as its own contender (here in Triton's
CPU interpreter, which tests/conftest.py turns on where there is no GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import triton

from benchmarks.attention import tile_contenders, tile_timings
from ldm_deploy.kernels import attention


def config(m, n, warps, stages, pipeline):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "PIPELINE": pipeline},
                         num_warps=warps, num_stages=stages)


def test_fastest_tile_of_each_kind():
    tuner = SimpleNamespace(configs_timings={
        config(128, 64, 4, 3, False): [0.30, 0.29, 0.31],
        config(64, 64, 4, 3, True): [0.25, 0.24, 0.26],
        config(64, 32, 4, 3, False): [0.28, 0.27, 0.29],
        config(128, 128, 8, 3, True): [float("inf")] * 3,  # did not compile
    })
    tiles = tile_timings(tuner)
    assert [row["ms"] for row in tiles] == [0.25, 0.28, 0.30, float("inf")]
    assert tiles[0]["tile"] == attention.Tile(64, 64, 4, 3, True)._asdict()
    picks = tile_contenders(tiles)
    assert list(picks) == ["ours:pipelined", "ours:plain"]
    assert picks["ours:plain"].__defaults__[0] == attention.Tile(64, 32, 4, 3, False)


def test_no_timings_no_tile_columns():
    assert tile_timings(SimpleNamespace()) == [] and tile_contenders([]) == {}


@pytest.mark.skipif(reason="runs the picked tiles on CPU tensors: needs TRITON_INTERPRET=1",
                    condition=not attention.is_interpreter())
def test_picked_tiles_compute_attention():
    tiles = [{"tile": attention.Tile(32, 32, 4, 1, p)._asdict(), "ms": 1.0} for p in (0, 1)]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 40, generator=gen) for L in (40, 77, 77))
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.2, -1) @ v
    for name, fn in tile_contenders(tiles).items():
        torch.testing.assert_close(fn(q, k, v, 0.2), expected, rtol=1e-4, atol=1e-5, msg=name)
