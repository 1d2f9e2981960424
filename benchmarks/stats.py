"""The arithmetic of a benchmark: medians and spreads, runtime overhead, ratios. Pure functions."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# The stages every contender reports, in pipeline order. `text` is tokenize + text encoder
# (CFG: negative and positive prompt); `unet_step` one denoising step with the CFG batch;
# `loop` the N-step loop; `vae_decode` latents -> pixels; `end_to_end` prompt -> images.
STAGES = ("text", "unet_step", "loop", "vae_decode", "end_to_end")
# Whose sum, taken from the same run, is subtracted from end_to_end to give the runtime overhead.
COMPONENT_STAGES = ("text", "loop", "vae_decode")


@dataclass(frozen=True)
class Stat:
    """Summary of repeated measurements: median, smallest, largest, count.

    `spread` is the half-range relative to the median ((max - min) / 2 / median): the table's
    "±3%". With the 3 to 5 repeats a benchmark can afford, a range says more than a deviation.
    """

    median: float
    lo: float
    hi: float
    n: int

    @property
    def spread(self) -> float:
        return (self.hi - self.lo) / (2 * self.median) if self.median else 0.0

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": self.n, "spread": self.spread}

    @classmethod
    def from_dict(cls, d: dict) -> Stat:
        return cls(d["median"], d["min"], d["max"], d["n"])


def summarize(samples) -> Stat:
    """Median, min, max of a non-empty sequence of numbers."""
    values = [float(s) for s in samples]
    if not values:
        raise ValueError("no samples to summarize")
    return Stat(statistics.median(values), min(values), max(values), len(values))


def overhead(end_to_end: float, parts) -> float:
    """What a run spent outside its components: end to end minus their sum (may be < 0 by noise)."""
    return float(end_to_end) - sum(float(p) for p in parts)


def run_overheads(runs: list[dict]) -> tuple[Stat, Stat]:
    """Per-run overhead in seconds and as a fraction of that run's end to end.

    Each run is {"end_to_end": s, "text": s, "loop": s, "vae_decode": s}, all from the same call,
    so noise between calls cancels; the medians are taken after the subtraction.
    """
    seconds = [overhead(r["end_to_end"], [r[k] for k in COMPONENT_STAGES]) for r in runs]
    fractions = [s / r["end_to_end"] for s, r in zip(seconds, runs)]
    return summarize(seconds), summarize(fractions)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline: below 1 means less time (or memory) than the baseline. None if either
    is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return float(value) / float(baseline)


def stage_ratios(ours: dict, base: dict) -> dict:
    """Ratios of every shared headline number of two contender results (see `bench.py`)."""
    out = {}
    for stage in STAGES:
        a, b = ours.get("stages", {}).get(stage), base.get("stages", {}).get(stage)
        out[stage] = ratio(a and a["median"], b and b["median"])
    for key in ("peak_rss_bytes", "device_peak_bytes", "load_s"):
        out[key] = ratio(ours.get(key), base.get(key))
    out["images_per_s"] = ratio(ours.get("images_per_s"), base.get("images_per_s"))
    return out
