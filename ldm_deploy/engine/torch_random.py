"""PyTorch's CPU normal draws, in numpy: a seed gives the noise `torch.Generator().manual_seed(seed)`
gives, so `seed=7` here is diffusers' `generator=torch.Generator().manual_seed(7)` (and ComfyUI's
CPU noise for seed 7), without importing torch.

torch's CPU generator is a 32-bit Mersenne Twister seeded with the seed's low 32 bits, which is
numpy's MT19937 under its legacy (RandomState) seeding. `torch.randn` of a float32 tensor of at
least 16 values draws one uniform float per value (the low 24 bits of one 32-bit output), then
turns each block of 16 into normals by Box-Muller, pairing value j with value j + 8; a last
partial block is redrawn whole from 16 fresh uniforms. Smaller tensors draw one double-precision
Box-Muller pair per two values, keeping the spare one in the generator for the next draw.

torch computes the float32 block with vectorised sin / cos / log, so values agree to within a few
float32 ulps (5e-7 measured), not bit for bit.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16  # values per Box-Muller block (8 pairs)


class TorchCpuRandom:
    """`standard_normal(shape)` as successive `torch.randn(shape, generator=g)` calls on
    `g = torch.Generator().manual_seed(seed)`, as float32."""

    def __init__(self, seed: int):
        self.bits = np.random.MT19937(0)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start again as `manual_seed(seed)` (cheaper than a new generator: DPM++ SDE's Brownian
        tree seeds one per node)."""
        self.seed = seed
        self.drawn: list[tuple[int, ...]] = []  # the shapes drawn so far (noise.vary replays them)
        if hasattr(self.bits, "_legacy_seeding"):  # numpy's RandomState(seed) seeding, in place
            self.bits._legacy_seeding(seed & 0xFFFFFFFF)
        else:
            key = np.random.RandomState(seed & 0xFFFFFFFF).get_state()[1]
            self.bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
        self.spare = None  # the second value of the last double-precision pair, not yet used

    def standard_normal(self, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        self.drawn.append(shape)
        n = int(np.prod(shape))
        if n < BLOCK:
            return np.array([self.small() for _ in range(n)], np.float32).reshape(shape)
        values = self.uniform(n)
        whole = n // BLOCK * BLOCK
        box_muller(values[:whole])
        if n > whole:  # the last 16 values again, from fresh uniforms
            values[n - BLOCK:] = self.uniform(BLOCK)
            box_muller(values[n - BLOCK:])
        return values.reshape(shape)

    def uniform(self, n: int) -> np.ndarray:
        """n floats in [0, 1): each the low 24 bits of one 32-bit output, over 2**24."""
        raw = self.bits.random_raw(n) & 0xFFFFFF
        return raw.astype(np.float32) * np.float32(2.0**-24)

    def small(self) -> float:
        if self.spare is not None:
            value, self.spare = self.spare, None
            return value
        # Two doubles in [0, 1), each from two 32-bit outputs (high word first), 53 bits kept.
        hi_lo = self.bits.random_raw(4).reshape(2, 2)
        u1, u2 = (float(((int(h) << 32) | int(lo)) & ((1 << 53) - 1)) * 2.0**-53 for h, lo in hi_lo)
        radius, theta = np.sqrt(-2.0 * np.log1p(-u2)), 2.0 * np.pi * u1
        self.spare = radius * np.sin(theta)
        return radius * np.cos(theta)


def box_muller(values: np.ndarray) -> None:
    """In place, per block of 16 uniforms u: (u[j], u[j + 8]) -> r cos(t), r sin(t), with
    r = sqrt(-2 log(1 - u[j])) and t = 2 pi u[j + 8], in float32."""
    blocks = values.reshape(-1, 2, 8)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - blocks[:, 0]))
    theta = np.float32(2.0 * np.pi) * blocks[:, 1]
    blocks[:, 0], blocks[:, 1] = radius * np.cos(theta), radius * np.sin(theta)
