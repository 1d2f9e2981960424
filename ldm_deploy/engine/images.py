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
            rgb = to_rgb(im)
            return im.copy() if rgb is im else rgb  # read before the file closes
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"cannot read the init image {path}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. 16- and 32-bit integer greyscale ("I;16", "I") is scaled from
    its bit depth (PIL's own conversion clips it at 255, turning most of it white); float
    greyscale ("F") is taken as [0, 1]."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        a = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() <= 65535 else float(2**32 - 1)
        image = Image.fromarray((np.clip(a, 0, top) / top * 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8), "L")
    return image.convert("RGB")


def as_init_image(init) -> Image.Image | None:
    """The init image as 8-bit RGB from a path, a PIL image, or an (H, W, 3) / (H, W) array
    (uint8, or floats in [0, 1] as diffusers' output_type="np" gives)."""
    if init is None:
        return None
    if isinstance(init, (str, Path)):
        return open_image(init)
    if isinstance(init, Image.Image):
        return to_rgb(init)
    if isinstance(init, np.ndarray) and init.ndim in (2, 3) and (init.ndim == 2 or init.shape[2] in (1, 3, 4)):
        a = init if init.ndim == 2 else init[..., :3] if init.shape[2] != 1 else init[..., 0]
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    what = f"an array of shape {init.shape}" if isinstance(init, np.ndarray) else type(init).__name__
    raise InvalidRequest(f"init_image must be a path, a PIL image or an (H, W, 3) array; got {what}")


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
