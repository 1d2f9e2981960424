"""What a call shows as it goes. `progress=True`: bars on the terminal (steps, tiles). A function:
called with (steps done, steps) after each step of each pass (ldm-serve's /sdapi/v1/progress),
and again with the same counts after each tile of a tiled run (VAE tiling, an upscale model; a
pass's encoding, before its first step: (0, steps)), so that a stop it raises (ldm-serve's
interrupt) lands between tiles, not after the last of them."""

from __future__ import annotations

import contextlib


class Reporter:
    """A progress function that remembers the last counts it was given."""

    def __init__(self, report):
        self.report, self.last = report, (0, 0)

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        self.report(done, total)


def pass_start(progress, steps: int) -> None:
    """A pass of `steps` steps begins: its tiles before the first step are heard as (0, steps)."""
    if isinstance(progress, Reporter):
        progress.last = (0, steps)


def reporting(progress):
    """A call's progress as its passes hand it on: a function wrapped once (a hires fix's or
    refiner's pass is a call within the call, with the same Reporter)."""
    return Reporter(progress) if callable(progress) and not isinstance(progress, Reporter) else progress


@contextlib.contextmanager
def tile_bar(total: int, desc: str, progress):
    """Over a tiled run of `total` tiles: a terminal bar (progress True), or the call's progress
    function hearing the last step counts again; yields what to call after each tile."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="tile", leave=False, disable=not progress or callable(progress)) as bar:
        def done():
            bar.update(1)
            if isinstance(progress, Reporter):
                progress(*progress.last)

        yield done


def step_bar(total: int, enabled: bool):
    """The terminal's bar over a pass's steps."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="denoising", unit="step", leave=False)
