"""Time a pipeline's stages from the outside: wrap the callables it already calls.

Nothing in the engine or in diffusers is edited. A wrapper installed on an instance attribute
(`backend.run`, `pipe.vae.decode`) shadows the class method for that instance only, and every
call through it appends (name, start, end) on one host clock. On a GPU the wrappers that mark
stage boundaries synchronise first and last, so the boundary times are true; the wrappers inside
the loop do not, so the loop keeps its CPU / GPU overlap.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable


class Recorder:
    """Collects (name, start, end) events from wrapped callables."""

    def __init__(self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.events: list[tuple[str, float, float]] = []
        self.sync = sync or (lambda: None)
        self.clock = clock

    def wrap(self, fn: Callable, name: str | Callable[..., str], sync: bool = False) -> Callable:
        """`fn` timed under `name` (or `name(*args, **kwargs)`, decided per call).
        With `sync`, the device is synchronised before the start and before the end time."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            if sync:
                self.sync()
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                if sync:
                    self.sync()
                self.events.append((label, start, self.clock()))

        return timed

    def clear(self) -> None:
        self.events.clear()

    def durations(self, name: str) -> list[float]:
        return [end - start for n, start, end in self.events if n == name]

    def total(self, *names: str) -> float:
        return sum(end - start for n, start, end in self.events if n in names)

    def gap(self, after: str, before: str) -> float:
        """From the end of the last `after` event to the start of the first `before` event that
        follows it: e.g. the denoising loop between the text encoder and the VAE decoder."""
        ends = [end for n, _, end in self.events if n == after]
        if not ends:
            raise LookupError(f"no {after!r} event recorded")
        starts = [start for n, start, _ in self.events if n == before and start >= ends[-1]]
        if not starts:
            raise LookupError(f"no {before!r} event after {after!r}")
        return starts[0] - ends[-1]
