"""Image I/O: init images in, PNGs with the generation parameters out."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from ldm_deploy.engine.spec import VAE_SCALE
from ldm_deploy.errors import InvalidRequest, UserError


def open_image(path: str | Path, what: str = "init image") -> Image.Image:
    """Read an image file as RGB; a clear error if it cannot be read."""
    return to_rgb(as_picture(path, what), what)


def to_rgb(image: Image.Image, what: str = "init image") -> Image.Image:
    """Any PIL image -> 8-bit RGB. Integer greyscale ("I;16", "I") is scaled from the bit depth its
    values need (8, 16 or 32 bits: PIL's own conversion clips at 255, turning a 16-bit image
    mostly white); float greyscale ("F") is taken as [0, 1], or as 0..255 when it exceeds 1."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = Image.fromarray(to_uint8(np.asarray(image), what=f"a mode {image.mode} image"), "L")
    try:
        return image.convert("RGB")
    except ValueError:  # premultiplied "La", "RGBa", ...: PIL has no conversion
        raise InvalidRequest(f"cannot use the {what} of mode {image.mode}: PIL cannot convert "
                             "it to RGB; pass an RGB (or greyscale) image") from None


def to_uint8(a: np.ndarray, what: str, signed: bool = False) -> np.ndarray:
    """Pixel values -> uint8: unsigned 8-bit as they are; other integers scaled from the
    smallest of 8, 16 or 32 bits that holds them; floats taken as [0, 1] (diffusers'
    output_type="np"), or as 0..255 when they exceed 1 (below 0: clipped). signed (an init
    image's array): floats where any is negative as [-1, 1], as diffusers' image processor reads
    one (its control image processor does not normalise, so clips)."""
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_):
        a = a.astype(np.float64)
        if a.size and a.min() < 0:
            raise InvalidRequest(f"{what} has negative pixel values; pass 0..255 (or floats in [0, 1])")
        top = next((t for t in (255.0, 65535.0) if a.size == 0 or a.max() <= t), 2.0**32 - 1)
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise InvalidRequest(f"{what} has NaN or infinite pixel values")
        if signed and a.size and a.min() < 0:  # [-1, 1], as diffusers' image processor reads one with negatives
            if a.min() < -1 or a.max() > 1:
                raise InvalidRequest(f"{what} has pixel values from {a.min():g} to {a.max():g}; pass floats in "
                                     "[0, 1] (or [-1, 1]), or 0..255")
            a = (a + 1) / 2
        top = 1.0 if a.size == 0 or a.max() <= 1.0 else 255.0
    else:
        raise InvalidRequest(f"{what} has pixels of type {a.dtype}; pass uint8, or floats in [0, 1]")
    return (np.clip(a, 0, top) / top * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class InitLatents:
    """Latents given for the init image, as diffusers' img2img takes them: (1, C, h, w) float32 (or
    one per image), encoded and scaled (what output_type="latent" gives); img2img noises them without the VAE
    encoder. The hires fix's "Latent" upscalers pass theirs so."""

    array: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of the latents."""
        return self.array.shape[3], self.array.shape[2]


def as_init_image(init) -> Image.Image | InitLatents | None:
    """The init image as 8-bit RGB from a path, a PIL image, or an (H, W, 3), (H, W, 4) or
    (H, W) array (uint8, 16-bit, or floats in [0, 1] as diffusers' output_type="np" gives); or
    InitLatents from a (1, C, h, w) float array (or (B, C, h, w): one per image)."""
    if init is None or isinstance(init, InitLatents):
        return init
    if isinstance(init, np.ndarray) and init.ndim == 4 and init.shape[0] == 1 and init.shape[3] in (1, 3, 4) \
            and init.shape[1] > 4:
        init = init[0]  # one (1, H, W, 3) image, as output_type="np" gives (latents have 4 channels first)
    elif isinstance(init, np.ndarray) and init.ndim == 4:
        if init.shape[0] < 1 or not np.issubdtype(init.dtype, np.floating) or not np.isfinite(init).all():
            raise InvalidRequest(f"init latents must be a finite (1, C, h, w) float array (or one per image), as "
                                 f"diffusers' output_type='latent' gives; got {init.dtype} of shape {init.shape}")
        return InitLatents(init.astype(np.float32))
    if isinstance(init, (str, Path)):
        return open_image(init)
    if isinstance(init, Image.Image):
        return to_rgb(init)
    if is_image_array(init):
        return array_to_rgb(init, "the init image array", signed=True)
    what = f"an array of shape {init.shape}" if isinstance(init, np.ndarray) else type(init).__name__
    raise InvalidRequest(f"init_image must be a path, a PIL image, an (H, W, 3) array or (1, C, h, w) "
                         f"latents; got {what}")


def is_image_array(a) -> bool:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array."""
    return isinstance(a, np.ndarray) and (a.ndim == 2 or a.ndim == 3 and a.shape[2] in (1, 3, 4))


def array_to_rgb(a: np.ndarray, what: str, signed: bool = False) -> Image.Image:
    """An image array (is_image_array: uint8, 16-bit, or floats in [0, 1]; signed: to_uint8's) as
    8-bit RGB; alpha dropped."""
    a = a if a.ndim == 2 else a[..., :3] if a.shape[2] != 1 else a[..., 0]
    return Image.fromarray(to_uint8(a, what=what, signed=signed)).convert("RGB")


def init_image_size(image: Image.Image | InitLatents, multiple: int = VAE_SCALE) -> tuple[int, int]:
    """(width, height) diffusers uses when none is given: rounded down to a multiple of the
    VAE's factor (8 for SD 1.x / 2.x); for latents, theirs times that factor."""
    if isinstance(image, InitLatents):
        return tuple(v * multiple for v in image.size)
    return tuple(v - v % multiple for v in image.size)


def to_model_input(image: Image.Image, width: int, height: int) -> np.ndarray:
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1], resized as diffusers' VaeImageProcessor does
    (Lanczos, only when the size differs)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    a = np.asarray(image, dtype=np.float32) / 255.0
    return (2.0 * a - 1.0).transpose(2, 0, 1)[None]


def as_mask(mask) -> Image.Image | np.ndarray | None:
    """An inpainting mask, as diffusers' mask processor reads one (white or 1: redraw, black or 0:
    keep): a path or PIL image stays an image, greyscale or RGB (it is resized before it is made
    grey, as there); an (H, W) or (H, W, 1) array (bool, integers or floats) is cut at 0.5 as it
    is -> an (H, W) float32 array of 0 and 1."""
    if mask is None:
        return None
    if isinstance(mask, (str, Path, Image.Image)):
        return as_picture(mask, "mask")
    if isinstance(mask, np.ndarray) and (mask.ndim == 2 or mask.ndim == 3 and mask.shape[2] == 1):
        a = mask.reshape(mask.shape[:2])
        if a.size == 0:
            raise InvalidRequest(f"the mask array is empty (shape {mask.shape})")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or not np.isfinite(a).all():
            raise InvalidRequest(f"the mask array must hold finite numbers (0 keep, 1 redraw); got {a.dtype}")
        return (a >= 0.5).astype(np.float32)
    what = f"an array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
    raise InvalidRequest(f"mask must be a path, a PIL image or an (H, W) array; got {what}")


# Modes PIL resizes as they are; diffusers' processors resize an image before converting it.
RESIZABLE = ("1", "L", "LA", "P", "RGB", "RGBA")


def as_picture(value, what: str) -> Image.Image:
    """A path or PIL image kept in its own mode where PIL resizes it so (RGBA: with its alpha
    premultiplied), as diffusers' processors resize before they convert; other modes as RGB. A
    file is turned upright by its EXIF orientation (a phone's photo), as diffusers' load_image and
    ComfyUI's LoadImage read it."""
    if isinstance(value, Image.Image):
        return value if value.mode in RESIZABLE else to_rgb(value, what)
    try:
        with Image.open(value) as im:
            im = ImageOps.exif_transpose(im)  # a copy, loaded (turned where it says)
        return im if im.mode in RESIZABLE else to_rgb(im, what)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequest(f"cannot read the {what} {value}: {e}") from None


def mask_size(mask: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of a mask from as_mask."""
    return mask.size if isinstance(mask, Image.Image) else (mask.shape[1], mask.shape[0])


def mask_image(mask: Image.Image | np.ndarray) -> Image.Image:
    """A mask from as_mask as a PIL image (an array: 0 and 255, greyscale)."""
    return mask if isinstance(mask, Image.Image) else Image.fromarray((mask * 255).astype(np.uint8))


def mask_to_model_input(mask: Image.Image | np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask from as_mask -> (1, 1, H, W) float32 of 0 (keep) and 1 (redraw), as diffusers'
    mask processor makes it: an image resized with Lanczos (only when the size differs), made
    grey and cut at 0.5; an array (cut already) resized as torch's nearest interpolation."""
    if isinstance(mask, np.ndarray):
        if mask.shape != (height, width):  # floor(i * in / out), torch's "nearest"
            rows = np.floor(np.arange(height, dtype=np.float32) * np.float32(mask.shape[0] / height)).astype(int)
            cols = np.floor(np.arange(width, dtype=np.float32) * np.float32(mask.shape[1] / width)).astype(int)
            mask = mask[np.minimum(rows, mask.shape[0] - 1)][:, np.minimum(cols, mask.shape[1] - 1)]
        return mask.astype(np.float32)[None, None]
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    a = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (a >= 0.5).astype(np.float32)[None, None]


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


def png_text(image: Image.Image) -> PngImagePlugin.PngInfo:
    """The PNG text chunks of an image we made: its `parameters` and `postprocessing` (ldm-serve's
    Extras, as AUTOMATIC1111's), where it has them."""
    info = PngImagePlugin.PngInfo()
    for key in ("parameters", "postprocessing"):
        if isinstance(image.info.get(key), str):
            info.add_text(key, image.info[key])
    return info


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG with the image's `parameters` text (if any) atomically: a temp file, renamed."""
    path = Path(path)
    info = png_text(image)
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
