"""Timing wrappers installed from the outside: names, totals, the loop as a gap, syncs."""

from __future__ import annotations

import itertools

import pytest

from benchmarks.recorder import Recorder


def fake_clock():
    ticks = itertools.count()
    return lambda: float(next(ticks))


def test_wrap_records_name_and_duration_and_keeps_results_and_metadata():
    rec = Recorder(clock=fake_clock())

    def encode(x):
        """Docstring kept."""
        return x * 2

    timed = rec.wrap(encode, "text")
    assert timed(21) == 42
    assert timed.__doc__ == "Docstring kept."
    assert rec.durations("text") == [1.0]
    assert rec.total("text", "missing") == 1.0


def test_name_can_be_decided_per_call():
    rec = Recorder(clock=fake_clock())
    run = rec.wrap(lambda component, binding: None, lambda component, binding: component)
    run("text_encoder", {})
    run("unet_step", {})
    run("unet_step", {})
    assert [e[0] for e in rec.events] == ["text_encoder", "unet_step", "unet_step"]
    assert rec.durations("unet_step") == [1.0, 1.0]


def test_an_exception_is_still_recorded_and_raised():
    rec = Recorder(clock=fake_clock())

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        rec.wrap(fail, "vae_decode")()
    assert rec.durations("vae_decode") == [1.0]


def test_sync_runs_before_start_and_before_end_only_where_asked():
    calls = []
    rec = Recorder(sync=lambda: calls.append("sync"), clock=fake_clock())
    rec.wrap(lambda: calls.append("body"), "text", sync=True)()
    rec.wrap(lambda: calls.append("step"), "unet_step")()
    assert calls == ["sync", "body", "sync", "step"]


def test_gap_measures_between_stage_boundaries_and_clear_forgets():
    rec = Recorder()
    rec.events = [("text", 0.0, 1.0), ("unet_step", 1.5, 2.5), ("vae_decode", 4.0, 5.0)]
    assert rec.gap("text", "vae_decode") == 3.0
    with pytest.raises(LookupError):
        rec.gap("vae_decode", "text")
    rec.clear()
    assert rec.events == [] and rec.total("text") == 0
