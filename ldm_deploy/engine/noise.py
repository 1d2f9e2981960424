"""Host-side random numbers: a seed gives the same image on every backend.

A generator is anything with `standard_normal(shape) -> array`: numpy's `Generator` is one.
Like diffusers' `generator` argument, it is either one generator for the whole batch, or a list
of one per image (then image i draws only from its own, so a batch equals single runs).
"""

from __future__ import annotations

import numpy as np


def seeded(seeds) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in seeds]


def draw(generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian noise of `shape` (B, ...) as float32."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        parts = [np.asarray(g.standard_normal((1,) + tuple(shape[1:]))) for g in generator]
        return np.concatenate(parts).astype(np.float32)
    return np.asarray(generator.standard_normal(tuple(shape))).astype(np.float32)
