"""Upscale models in the hires fix, as AUTOMATIC1111 runs its ESRGAN-type upscalers.

An engine exported with `ldm-export --upscaler FILE` holds the model as an ONNX graph (export/
upscalers.py): (1, 3, H, W) RGB in [0, 1] -> (1, 3, s*H, s*W). AUTOMATIC1111 enlarges an image to
(w, h) with it in three stages, kept here:
  1. `resize`: scale = max(w / W, h / H); where above 1, `upscale` by it, then Lanczos to (w, h)
     where the sizes still differ (images.resize_image, mode 0);
  2. `upscale`: the model's pass, repeated (at most 3 times) until the image covers
     (int(W * scale) // 8 * 8, ...) or stops growing (none where it covers that already), then
     Lanczos to exactly that (Upscaler.upscale);
  3. one pass in tiles of 192 px overlapping by 8 (its ESRGAN_tile settings): `split` cuts them
     where AUTOMATIC1111's split_grid does (the last flush with the far edge; an image smaller than
     a tile is padded with black past its top left), each tile's result is made 8-bit, and
     `combine` pastes them back, blending each overlap with a linear 8-bit ramp (combine_grid;
     there, an image smaller than a tile gets its top and left edges faded from black, not here).
AUTOMATIC1111 hands the model BGR; the model's authors (ESRGAN, Real-ESRGAN) and ComfyUI hand it
RGB, as here, so that colours go through the network as it was trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_deploy.engine import progress as progress_

TILE = 192  # AUTOMATIC1111's ESRGAN_tile default (px of the input image)
OVERLAP = 8  # its ESRGAN_tile_overlap default
PASSES = 3  # AUTOMATIC1111 runs the model at most three times to reach a size


class Upscaler:
    """One exported upscale model, run with ONNX Runtime (CUDA where onnxruntime-gpu has it)."""

    def __init__(self, engine_dir: Path, name: str, record: dict, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(Path(engine_dir) / record["file"]), opts, providers=providers)
        self.name, self.scale = name, int(record["scale"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) float32 in [0, 1] -> (1, 3, s*H, s*W)."""
        return self.session.run(None, {"image": x})[0]


def resize(image: Image.Image, width: int, height: int, model, tile: int = TILE, overlap: int = OVERLAP,
           progress=False) -> Image.Image:
    """`image` enlarged to (width, height) through `model` (a callable as Upscaler's, with `scale`
    and `name`); progress: a bar over the tiles run, or a call's progress function told of each
    (progress.tile_bar)."""
    scale = max(width / image.width, height / image.height)
    if scale > 1:
        image = upscale(image, scale, model, tile, overlap, progress)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return image


def upscale(image: Image.Image, scale: float, model, tile: int = TILE, overlap: int = OVERLAP,
            progress=False) -> Image.Image:
    """The model's passes until the image covers `scale` times its size (sides down to a multiple of 8)."""
    return passes(image, scale, lambda im: one_pass(im, model, tile, overlap, progress))


def lanczos(image: Image.Image, scale: float) -> Image.Image:
    """AUTOMATIC1111's "Lanczos" upscaler as its Extras run it: one resize by `scale`, then to 8s."""
    return passes(image, scale, lambda im: im.resize((int(im.width * scale), int(im.height * scale)),
                                                     resample=Image.LANCZOS))


def passes(image: Image.Image, scale: float, enlarge) -> Image.Image:
    """AUTOMATIC1111's Upscaler.upscale: `enlarge` (image -> image) until the image covers `scale`
    times its size, sides cut to a multiple of 8 (at most 3 times; none where it covers that
    already), then Lanczos to exactly that size."""
    dest = dest_size(image.size, scale)
    for i in range(PASSES):
        if covers(image.size, dest, scale, i):
            break
        before = image.size
        image = enlarge(image)
        if image.size == before:
            break
    if image.size != dest:
        image = image.resize(dest, resample=Image.LANCZOS)
    return image


def dest_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The size `passes` brings an image of `size` to: `scale` times it, sides cut to multiples of 8."""
    return int(size[0] * scale // 8 * 8), int(size[1] * scale // 8 * 8)


def covers(size: tuple[int, int], dest: tuple[int, int], scale: float, i: int) -> bool:
    """Whether an image of `size` needs no pass i (from 0) to reach `dest`: it covers it already
    (before the first pass, only where the scale is not 1: a scale whose size, cut to 8s, the
    image already has, is Lanczos alone)."""
    return size[0] >= dest[0] and size[1] >= dest[1] and (i > 0 or scale != 1)


def one_pass(image: Image.Image, model, tile: int = TILE, overlap: int = OVERLAP,
             progress=False) -> Image.Image:
    """One run of the model over the image, in tiles (tile 0: the whole image at once)."""
    if tile <= 0:
        return run(model, image)
    rows = split(image, tile, overlap)
    s = model.scale
    with progress_.tile_bar(sum(len(row) for _, row in rows), f"upscaling with {model.name}", progress) as done:
        def tile_run(t):
            out = run(model, t)
            done()
            return out

        return combine([(y * s, [(x * s, tile_run(t)) for x, t in row]) for y, row in rows],
                       (image.width * s, image.height * s), tile * s, overlap * s)


def run(model, image: Image.Image) -> Image.Image:
    """An 8-bit RGB image through the model, back to 8 bits (clamped, rounded)."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / 255
    y = np.clip(model(np.ascontiguousarray(x))[0], 0, 1)
    return Image.fromarray(np.round(y.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")


def starts(side: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along one side, as split_grid places them: evenly from 0, the last one
    flush with the far edge (negative where the side is shorter than a tile)."""
    n = math.ceil((side - overlap) / (tile - overlap))
    step = (side - tile) / (n - 1) if n > 1 else 0
    return [side - tile if int(i * step) + tile >= side else int(i * step) for i in range(n)]


def split(image: Image.Image, tile: int, overlap: int) -> list[tuple[int, list[tuple[int, Image.Image]]]]:
    """[(y, [(x, tile image), ...]), ...]: tile x tile crops (black beyond the image's edges)."""
    return [(y, [(x, image.crop((x, y, x + tile, y + tile))) for x in starts(image.width, tile, overlap)])
            for y in starts(image.height, tile, overlap)]


def combine(rows, size: tuple[int, int], tile: int, overlap: int) -> Image.Image:
    """The tiles pasted back into one `size` image: each after the first in a row (and each row
    after the first) fades in over its first `overlap` pixels on an 8-bit linear ramp. (A first
    tile that starts before the edge, in an image smaller than a tile, is pasted whole where
    AUTOMATIC1111 fades its edge in from black.)"""
    width, height = size
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    fade_x = Image.fromarray(np.repeat(ramp[None, :], tile, axis=0), "L")
    fade_y = Image.fromarray(np.repeat(ramp[:, None], width, axis=1), "L")
    out = Image.new("RGB", size)
    for i, (y, row) in enumerate(rows):
        strip = Image.new("RGB", (width, tile))
        for j, (x, t) in enumerate(row):
            if j == 0:
                strip.paste(t, (x, 0))
            else:
                strip.paste(t.crop((0, 0, overlap, tile)), (x, 0), mask=fade_x)
                strip.paste(t.crop((overlap, 0, tile, tile)), (x + overlap, 0))
        if i == 0:
            out.paste(strip.crop((0, -y, width, tile - y)) if y < 0 else strip, (0, 0))
        else:
            out.paste(strip.crop((0, 0, width, overlap)), (0, y), mask=fade_y)
            out.paste(strip.crop((0, overlap, width, tile)), (0, y + overlap))
    return out
