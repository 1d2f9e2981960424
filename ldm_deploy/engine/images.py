"""Image I/O: init images in, PNGs with the generation parameters out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ldm_deploy.engine.spec import VAE_SCALE
from ldm_deploy.errors import InvalidRequest, UserError


def open_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB; a clear error if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"cannot read the init image {path}: {e}") from None


def init_image_size(image: Image.Image, multiple: int = VAE_SCALE) -> tuple[int, int]:
    """(width, height) diffusers uses when none is given: rounded down to a multiple of the
    VAE's factor (8 for SD 1.x / 2.x)."""
    return tuple(v - v % multiple for v in image.size)


def to_model_input(image: Image.Image, width: int, height: int) -> np.ndarray:
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1], resized as diffusers' VaeImageProcessor does
    (Lanczos, only when the size differs)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    a = np.asarray(image, dtype=np.float32) / 255.0
    return (2.0 * a - 1.0).transpose(2, 0, 1)[None]


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images, rounded as diffusers' numpy_to_pil does."""
    return [Image.fromarray(a) for a in (images * 255).round().astype(np.uint8)]


def parameters_text(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG with the image's `parameters` text (if any) atomically: a temp file, renamed."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a saved image is not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
