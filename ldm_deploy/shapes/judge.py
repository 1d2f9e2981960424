"""Read a 64x64 image back into a background colour and a list of (colour, shape) objects.

The rules, all pixel statistics (numpy only):
- background: the median of the 2-px frame, named by the nearest colour of `COLORS`;
- foreground: pixels further than `FG_DISTANCE` from that median, split into 4-connected
  components; components under `MIN_AREA` px are noise and dropped;
- an object's colour: the nearest named colour of its pixels' median (the anti-aliased rim
  mixes with the background; the median is the inside);
- its shape: how much of its bounding box it fills (`fill`): a square fills 1, a circle
  pi/4 = 0.79, an apex-up triangle 1/2; the thresholds sit between those values.

Checked against the dataset's own images (`tests/shapes/test_judge.py`) before we trust it on
generated ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm_deploy.shapes.data import COLORS

FG_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is foreground
MIN_AREA = 20  # px
SQUARE_FILL, CIRCLE_FILL = 0.89, 0.64  # fill >= 0.89: square; >= 0.64: circle; else triangle

_NAMES = list(COLORS)
_RGB = np.array([COLORS[n] for n in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Object:
    color: str
    shape: str
    area: int
    fill: float


@dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[Object, ...]  # largest first

    def has(self, color: str, shape: str | None = None) -> bool:
        """An object of this colour (the largest of them, of this shape when one is given)."""
        of_color = [o for o in self.objects if o.color == color]
        return bool(of_color) and (shape is None or of_color[0].shape == shape)


def nearest_color(rgb) -> str:
    return _NAMES[int(np.argmin(((_RGB - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)))]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pixels))
    return out


def shape_of(fill: float) -> str:
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"


def read(image) -> Reading:
    """image: (64, 64, 3) uint8 array or PIL image."""
    a = np.asarray(image, dtype=np.float64)[..., :3]
    frame = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    bg = np.median(frame, axis=0)
    mask = np.sqrt(((a - bg) ** 2).sum(-1)) > FG_DISTANCE
    objects = []
    for px in components(mask):
        if len(px) < MIN_AREA:
            continue
        (y0, x0), (y1, x1) = px.min(0), px.max(0)
        fill = len(px) / float((y1 - y0 + 1) * (x1 - x0 + 1))
        color = nearest_color(np.median(a[px[:, 0], px[:, 1]], axis=0))
        objects.append(Object(color, shape_of(fill), len(px), fill))
    objects.sort(key=lambda o: -o.area)
    return Reading(nearest_color(bg), tuple(objects))
