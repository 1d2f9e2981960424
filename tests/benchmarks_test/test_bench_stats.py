"""The arithmetic behind every reported number: medians, spreads, overhead, ratios."""

from __future__ import annotations

import pytest

from benchmarks.stats import STAGES, Stat, overhead, ratio, run_overheads, stage_ratios, summarize


def test_summarize_median_min_max_and_spread():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.lo, s.hi, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.spread == pytest.approx((10.0 - 1.0) / 2 / 2.5)
    one = summarize([4.0])
    assert (one.median, one.spread) == (4.0, 0.0)


def test_summarize_refuses_nothing():
    with pytest.raises(ValueError):
        summarize([])


def test_stat_round_trips_through_dict():
    s = Stat(2.0, 1.0, 3.0, 3)
    assert Stat.from_dict(s.to_dict()) == s
    assert s.to_dict()["spread"] == pytest.approx(0.5)


def test_overhead_is_end_to_end_minus_the_parts():
    assert overhead(10.0, [2.0, 7.0, 0.5]) == pytest.approx(0.5)
    assert overhead(1.0, [0.6, 0.5]) == pytest.approx(-0.1)  # noise may push it below zero; kept


def test_run_overheads_subtract_within_each_run_then_take_medians():
    runs = [
        {"end_to_end": 10.0, "text": 1.0, "loop": 8.0, "vae_decode": 0.5},   # 0.5 s, 5%
        {"end_to_end": 20.0, "text": 1.0, "loop": 17.0, "vae_decode": 1.0},  # 1.0 s, 5%
        {"end_to_end": 12.0, "text": 1.0, "loop": 10.0, "vae_decode": 0.9},  # 0.1 s, ~0.8%
    ]
    seconds, fraction = run_overheads(runs)
    assert seconds.median == pytest.approx(0.5)
    assert (seconds.lo, seconds.hi) == (pytest.approx(0.1), pytest.approx(1.0))
    assert fraction.median == pytest.approx(0.05)


def test_ratio_is_value_over_baseline_and_none_when_undefined():
    assert ratio(2.0, 4.0) == 0.5
    assert ratio(None, 4.0) is None
    assert ratio(2.0, None) is None
    assert ratio(2.0, 0.0) is None


def contender(scale: float, rss: int, device: int | None = None) -> dict:
    return {
        "stages": {s: {"median": scale * (i + 1)} for i, s in enumerate(STAGES)},
        "peak_rss_bytes": rss, "device_peak_bytes": device, "load_s": scale, "images_per_s": 1 / scale,
    }


def test_stage_ratios_cover_every_stage_memory_and_throughput():
    r = stage_ratios(contender(0.5, 100), contender(1.0, 200))
    assert {s: r[s] for s in STAGES} == {s: pytest.approx(0.5) for s in STAGES}
    assert r["peak_rss_bytes"] == 0.5
    assert r["device_peak_bytes"] is None  # CPU: no device memory on either side
    assert r["load_s"] == 0.5
    assert r["images_per_s"] == pytest.approx(2.0)  # higher is better here


def test_stage_ratios_skip_a_stage_one_side_lacks():
    ours = contender(0.5, 100)
    del ours["stages"]["text"]
    assert stage_ratios(ours, contender(1.0, 200))["text"] is None
