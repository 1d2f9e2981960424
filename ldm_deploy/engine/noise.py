"""Host-side random numbers: a seed gives the same image on every backend, and the image
diffusers gives with `generator=torch.Generator().manual_seed(seed)` (torch_random.py).

A generator is anything with `standard_normal(shape) -> array`: numpy's `Generator` is one. A
torch.Generator is taken too (the caller has torch; the runtime does not import it otherwise): it
draws as diffusers draws from it, so the same generator gives diffusers' noise. Like diffusers'
`generator` argument, it is either one generator for the whole batch, or a list of one per image
(then image i draws only from its own, so a batch equals single runs).
"""

from __future__ import annotations

import secrets

import numpy as np

from ldm_deploy.engine.request import whole
from ldm_deploy.engine.torch_random import TorchCpuRandom
from ldm_deploy.errors import InvalidRequest


def seeded(seeds) -> list[TorchCpuRandom]:
    """One generator per image, as diffusers' list of `torch.Generator().manual_seed(s)`."""
    return [TorchCpuRandom(s) for s in seeds]


def draw(generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian noise of `shape` (B, ...) as float32."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        parts = [normal(g, (1,) + tuple(shape[1:])) for g in generator]
        return np.concatenate(parts).astype(np.float32)
    return normal(generator, tuple(shape)).astype(np.float32)


def normal(generator, shape: tuple[int, ...]) -> np.ndarray:
    if hasattr(generator, "standard_normal"):
        return np.asarray(generator.standard_normal(shape))
    if type(generator).__module__.split(".")[0] == "torch" and type(generator).__name__ == "Generator":
        import torch  # the caller's: it made the generator

        # diffusers' randn_tensor: float32 on the generator's device, one draw for the batch.
        return torch.randn(shape, generator=generator, device=generator.device,
                           dtype=torch.float32).cpu().numpy()
    raise TypeError(f"a generator needs standard_normal(shape) (numpy's Generator has it) or must "
                    f"be a torch.Generator; got {type(generator).__name__}")


def random_seed() -> int:
    return secrets.randbelow(2**32)


def image_seeds(seed, n: int) -> tuple[int, ...]:
    """Each of n images' seed: seed + i (None or -1: a random seed), or a list of one per image
    (what ldm-serve gives a batch of several requests)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise InvalidRequest(f"{len(seed)} seeds for {n} images; pass one seed, or a list of one per image")
        seeds = tuple(whole("seed", s, None) for s in seed)
    else:
        first = random_seed() if seed is None or seed == -1 else whole("seed", seed, None)
        seeds = tuple(first + i for i in range(n))
    for s in seeds:
        if s < 0:
            random = " (or -1 for a random one)" if not isinstance(seed, (list, tuple)) else " (each of a list)"
            raise InvalidRequest(f"seed must be 0 or more{random}, got {s}")
    return seeds
