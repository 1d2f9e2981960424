"""Inpainting only the masked area (AUTOMATIC1111's "Inpaint area: Only masked", diffusers'
`padding_mask_crop`): cut the region around the mask out of the image, draw it at the full
generation size, and paste it back over the original through the mask.

The steps are those of diffusers' VaeImageProcessor (get_crop_region, the "fill" resize,
apply_overlay), done with PIL as it does them, so the pixels are the same.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right / bottom exclusive


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> Box:
    """The smallest box holding every non-black mask pixel, `pad` pixels wider on each side (within
    the image), then grown about its centre to the width:height aspect of the generation, shifted
    back inside the image where it would leave it."""
    m = np.asarray(mask.convert("L")) != 0
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    # An all-black mask: diffusers' scan then crosses the whole image (empty box at the far side).
    left, right = (cols[0], cols[-1] + 1) if cols.size else (w, 0)
    top, bottom = (rows[0], rows[-1] + 1) if rows.size else (h, 0)
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(right + pad, w)), int(min(bottom + pad, h))
    if (x2 - x1) / (y2 - y1) > width / height:  # too wide: grow the height
        y1, y2 = grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def grow(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    """[lo, hi) grown by `extra` (half before, the rest after), moved back within [0, size)."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def fill_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize keeping the aspect ratio to fit width x height (Lanczos), centred; the bands left
    over are filled by stretching the image's edge rows or columns (diffusers' "fill" mode).
    Returns RGB."""
    ratio, source = width / height, image.width / image.height
    w = width if ratio < source else image.width * height // image.height
    h = height if ratio >= source else image.height * width // image.width
    resized = image.resize((w, h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if ratio < source and height // 2 - h // 2 > 0:  # bands above and below
        band = height // 2 - h // 2
        out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, band), box=(0, h, width, h)), box=(0, band + h))
    elif ratio > source and width // 2 - w // 2 > 0:  # bands left and right
        band = width // 2 - w // 2
        out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((band, height), box=(w, 0, w, height)), box=(band + w, 0))
    return out


def crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize keeping the aspect ratio to cover width x height (Lanczos), centred, the excess cut."""
    ratio, source = width / height, image.width / image.height
    w = width if ratio > source else image.width * height // image.height
    h = height if ratio <= source else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(image.resize((w, h), resample=Image.LANCZOS), box=(width // 2 - w // 2, height // 2 - h // 2))
    return out


def overlay(mask: Image.Image, original: Image.Image, drawn: Image.Image, box: Box) -> Image.Image:
    """The original image with `drawn` (the generated crop) resized into `box`, showing through
    where the mask is white: the original is laid over it with the inverted mask as its alpha."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))  # premultiplied, as PIL pastes with a mask
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = box
    base = Image.new("RGBA", (width, height))
    base.paste(crop_resize(drawn, x2 - x1, y2 - y1), (x1, y1))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")
