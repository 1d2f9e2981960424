"""Host-side random numbers: a seed gives the same image on every backend, and the image
diffusers gives with `generator=torch.Generator().manual_seed(seed)` (torch_random.py).

A generator is anything with `standard_normal(shape) -> array`: numpy's `Generator` is one. A
torch.Generator is taken too (the caller has torch; the runtime does not import it otherwise): it
draws as diffusers draws from it, so the same generator gives diffusers' noise. Like diffusers'
`generator` argument, it is either one generator for the whole batch, or a list of one per image
(then image i draws only from its own, so a batch equals single runs).

AUTOMATIC1111's variation seeds vary each image's start noise (`start`, `vary`): toward the noise
of its variation seed ("Variation strength"), and / or with its seed's noise drawn at another
size and pasted into the middle ("Resize seed from"), as its ImageRNG.first does with its CPU
random source (the one whose noise is torch's CPU generator's, as ours is). Its start noise is
its seed's first draw; ours is where diffusers' order puts it (img2img: after the image's VAE
sample), so the variation seed's noise, and the seed's at the other size, are drawn at that same
place in their streams: a small strength changes the image a little, and strength 1 is the
variation seed's own start noise.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

from ldm_deploy.engine.request import whole
from ldm_deploy.engine.samplers import brownian
from ldm_deploy.engine.torch_random import TorchCpuRandom
from ldm_deploy.errors import InvalidRequest

log = logging.getLogger(__name__)


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


def step_noise(sp, generator, seeds, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Each row's noise (B, C, h, w) of a SamplerPlan: drawn from the generator at the rows whose
    scheduler draws, or for DPM++ SDE a Brownian tree's per image seed; zeros elsewhere (one array)."""
    zeros = np.zeros(shape, np.float32)
    if sp.brownian is not None:
        return [zeros if n is None else n for n in brownian.row_noise(sp.brownian, seeds, shape)]
    return [draw(generator, shape) if drawn else zeros for drawn in sp.draws]


def warn_unseeded_trees(samplers, seed, generator, latents, warned: set) -> None:
    """Once: a DPM++ SDE sampler with a generator or latents but no seed draws its trees' noise
    from random seeds, so the image changes from call to call."""
    sde = next((s for s in samplers if isinstance(s, str) and s.startswith("dpmpp_sde")), None)
    if sde and seed in (None, -1) and (generator is not None or latents is not None) and "sde" not in warned:
        warned.add("sde")
        log.warning("the %s sampler's step noise comes from a Brownian tree seeded by each image's seed, not from "
                    "the generator or latents given: without seed= those seeds are random, so the image changes "
                    "from call to call (pass seed= too)", sde)


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


def start(generator, shape: tuple[int, ...], req, latents=None) -> np.ndarray:
    """The start noise (B, C, h, w) of a request's images: `latents` where given, else drawn from
    the generator and varied as the request asks (req.variation_strength, req.seed_resize_from)."""
    if latents is not None:
        return latents.astype(np.float32)
    return varied(draw(generator, shape), req, generator)


def varied(x: np.ndarray, req, generator) -> np.ndarray:
    """Start noise x (B, C, h, w) just drawn from the images' generators (seeded(): one per
    image), varied as the request asks."""
    if not (req.variation_strength or req.seed_resize_from):
        return x
    return vary(x, generator, req.variation_seeds, req.variation_strength, req.seed_resize_from,
                req.height // x.shape[2])


def vary(x: np.ndarray, generators, variation_seeds, strength: float, resize_from, scale: int) -> np.ndarray:
    """AUTOMATIC1111's ImageRNG.first over start noise x (B, C, h, w) just drawn from `generators`
    (TorchCpuRandom, one per image): image i's noise (its seed's, drawn at resize_from's (width,
    height) / scale where given, pasted into the middle of x[i], cropped where larger), slerped
    toward its variation seed's by `strength`; those two drawn after the draws its generator made
    before x (replay), so at the place in their streams where x[i] is in its seed's."""
    out = x.copy()
    c, h, w = x.shape[1:]
    small = (c, resize_from[1] // scale, resize_from[0] // scale) if resize_from else (c, h, w)
    for i, g in enumerate(generators):
        before = g.drawn[:-1]  # its draws before this one
        own = x[i] if small == (c, h, w) else replay(g.seed, before, small)
        if strength:
            own = slerp(strength, own, replay(variation_seeds[i], before, small))
        if small == (c, h, w):
            out[i] = own
        else:
            paste(own, out[i])
    return out


def replay(seed: int, before, shape: tuple[int, ...]) -> np.ndarray:
    """One image's (C, h, w) noise from the seed's generator after draws of the shapes `before`
    (none: `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`)."""
    g = TorchCpuRandom(seed)
    for s in before:
        g.standard_normal(s)
    return g.standard_normal((1,) + tuple(shape))[0]


def from_seeds(generator) -> bool:
    """Whether a call's generator is its seeds' own (seeded()): what variations vary."""
    return isinstance(generator, (list, tuple)) and all(isinstance(g, TorchCpuRandom) for g in generator)


def slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """AUTOMATIC1111's slerp of two (C, h, w) noises: along axis 1 (h) for each (channel, column),
    the angle between them taken per column; where they point nearly alike on average (mean cosine
    > 0.9995) its linear blend, weights as it has them (low * t + high * (1 - t))."""
    low64, high64 = low.astype(np.float64), high.astype(np.float64)
    dot = np.sum(low64 / np.linalg.norm(low64, axis=1, keepdims=True)
                 * high64 / np.linalg.norm(high64, axis=1, keepdims=True), axis=1)  # (C, w)
    if dot.mean() > 0.9995:
        return (low64 * t + high64 * (1 - t)).astype(np.float32)
    omega = np.arccos(np.clip(dot, -1, 1))
    so = np.sin(omega)
    mixed = (np.sin((1 - t) * omega) / so)[:, None] * low64 + (np.sin(t * omega) / so)[:, None] * high64
    return mixed.astype(np.float32)


def paste(small: np.ndarray, into: np.ndarray) -> None:
    """small (C, sh, sw) into the middle of `into` (C, h, w) in place, cropped to its middle where
    larger, with AUTOMATIC1111's offsets (floor halves: odd differences leave its rounding)."""
    (_, sh, sw), (_, h, w) = small.shape, into.shape
    dx, dy = (w - sw) // 2, (h - sh) // 2
    cw, ch = (sw if dx >= 0 else sw + 2 * dx), (sh if dy >= 0 else sh + 2 * dy)
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    into[:, ty:ty + ch, tx:tx + cw] = small[:, sy:sy + ch, sx:sx + cw]


def variation(seed, variation_seed, strength, resize_from, n: int, generator, latents) -> tuple:
    """A call's seeds and its variation settings, checked -> (seeds, Request keywords)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)) \
            or not 0 <= strength <= 1:
        raise InvalidRequest(f"variation_strength must be a number from 0 to 1 (AUTOMATIC1111's \"Variation "
                             f"strength\"), got {strength!r}")
    if not strength and variation_seed is not None and not (isinstance(variation_seed, (int, np.integer))
                                                             and variation_seed == -1):
        raise InvalidRequest("variation_seed is the seed the noise varies toward: give variation_strength too "
                             "(e.g. 0.1)")
    if resize_from is not None:
        if not isinstance(resize_from, (list, tuple)) or len(resize_from) != 2:
            raise InvalidRequest(f"seed_resize_from is a (width, height) in pixels, got {resize_from!r}")
        resize_from = tuple(whole("seed_resize_from", v, None) for v in resize_from)
        if not all(8 <= v <= 16384 for v in resize_from):
            raise InvalidRequest(f"seed_resize_from sides must be from 8 to 16384 pixels, got {resize_from}")
    if (strength or resize_from) and generator is not None and not from_seeds(generator):
        raise InvalidRequest("variation_strength and seed_resize_from vary the noise drawn from seeds; a generator "
                             "given draws its own: pass seed instead")
    if (strength or resize_from) and latents is not None:
        raise InvalidRequest("latents are the start noise itself; variation_strength and seed_resize_from vary "
                             "the noise drawn from seeds: pass one or the other")
    seeds = image_seeds(seed, n, same=bool(strength) and not isinstance(seed, (list, tuple)))
    varied = image_seeds(variation_seed, n, name="variation_seed") if strength else ()
    return seeds, {"variation_seeds": varied, "variation_strength": float(strength), "seed_resize_from": resize_from}


def random_seed() -> int:
    return secrets.randbelow(2**32)


def image_seeds(seed, n: int, same: bool = False, name: str = "seed") -> tuple[int, ...]:
    """Each of n images' seed: seed + i (None or -1: a random seed; same: seed for all, as
    AUTOMATIC1111 gives a batch of variations one seed), or a list of one per image (what
    ldm-serve gives a batch of several requests)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise InvalidRequest(f"{len(seed)} {name}s for {n} images; pass one {name}, or a list of one per image")
        seeds = tuple(whole(name, s, None) for s in seed)
    else:
        first = random_seed() if seed is None or seed == -1 else whole(name, seed, None)
        seeds = tuple(first + (0 if same else i) for i in range(n))
    for s in seeds:
        if s < 0:
            random = " (or -1 for a random one)" if not isinstance(seed, (list, tuple)) else " (each of a list)"
            raise InvalidRequest(f"{name} must be 0 or more{random}, got {s}")
        if s >= 2**64:  # (torch's manual_seed refuses them; below, its generator takes the low 32 bits)
            raise InvalidRequest(f"{name} must be below 2**64 = {2**64}, as torch's seeds are, got {s}")
    return seeds
