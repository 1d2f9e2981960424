"""AUTOMATIC1111's img2img resize modes: how a picture of another aspect than drawn becomes width x
height (its `images.resize_image`, with no upscaler set for img2img: Lanczos).

    0 "Just resize"       stretched to width x height (what the pipeline, and diffusers, does anyway)
    1 "Crop and resize"   scaled to cover width x height, its middle kept
    2 "Resize and fill"   scaled to fit inside, the two bands left over filled with the picture's
                          first and last rows (or columns) stretched across them
    3 "Just resize (latent upscale)": stretched in latent space there; here as 0, in pixels

Sizes are floored and the picture centred as AUTOMATIC1111 does it, so a 640x480 photo cropped to
512x512 keeps the same pixels there as here.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from ldm_deploy.engine import images
from ldm_deploy.errors import InvalidRequest

log = logging.getLogger(__name__)

# Its modes by number -> our names of them (the API's resize_mode, ldm-run's --resize-mode).
NAMES = {0: "just-resize", 1: "crop-and-resize", 2: "resize-and-fill", 3: "just-resize-latent"}


def mode_of(value) -> int:
    """resize_mode as given (one of NAMES, or AUTOMATIC1111's number) -> its number."""
    numbers = {name: number for number, name in NAMES.items()}
    if isinstance(value, str) and value in numbers:
        return numbers[value]
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and value in NAMES:
        return int(value)  # (1.0 too, as AUTOMATIC1111's API takes it)
    raise InvalidRequest(f"resize_mode must be one of {', '.join(map(repr, NAMES.values()))} (or AUTOMATIC1111's "
                         f"0 to 3), got {value!r}")


def fit_request(value, init, mask, width: int | None, height: int | None, mask_crop, vae_scale: int,
                warned: set) -> tuple:
    """(init, mask) of a call (as images.as_init_image and as_mask give them) fitted to width x
    height by resize_mode `value`, as AUTOMATIC1111's img2img fits them (its mask blurred first,
    as here, and grey). A side not given is the image's own (images.init_image_size), as the
    pipeline draws it; with neither, nothing is fitted. Not with mask_crop ("Only masked", which
    cuts the area around the mask, as there). Where it does nothing, it says so once (`warned`:
    the pipeline's)."""
    mode = mode_of(value)
    if mode in (0, 3):
        return init, mask
    idle = ("there is no init image" if init is None else "mask_crop (--mask-crop) cuts the area around the mask "
            "instead" if mask_crop is not None else "neither width nor height is given, so the image's own size "
            "is drawn" if width is None and height is None else None)
    if idle:
        if ("resize_mode", idle) not in warned:
            warned.add(("resize_mode", idle))
            log.warning("resize_mode %r (--resize-mode) fits an init image to width x height; %s: ignored",
                        NAMES[mode], idle)
        return init, mask
    if isinstance(init, images.InitLatents):
        raise InvalidRequest(f"resize_mode {NAMES[mode]!r} fits a picture to the size drawn; init latents are drawn "
                             "at their own size: leave it out")
    own = images.init_image_size(init, vae_scale)
    width, height = width or own[0], height or own[1]
    if isinstance(mask, np.ndarray):  # (0 and 1, cut: fitted as a black and white picture, cut again)
        picture = fit(mode, Image.fromarray((mask * 255).astype(np.uint8)), width, height)
        mask = (np.asarray(picture, dtype=np.float32) >= 127.5).astype(np.float32)
    elif mask is not None:  # (grey, as AUTOMATIC1111's: a palette's or 1-bit's resized as grey, not by index)
        mask = fit(mode, mask if mask.mode in ("L", "RGB") else mask.convert("L"), width, height)
    return fit(mode, init, width, height), mask


def fit(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` made width x height by resize mode `mode` (0-3, above). Modes 0 and 3 return it as it
    is: the pipeline stretches it (with Lanczos, as AUTOMATIC1111's mode 0 does)."""
    if mode in (0, 3) or image.size == (width, height):
        return image
    ratio, own = width / height, image.width / image.height
    # the side that is drawn whole: mode 1 covers (the other side overflows), mode 2 fits (it falls short)
    whole_width = ratio > own if mode == 1 else ratio < own
    if whole_width:
        w, h = width, image.height * width // image.width
    else:
        w, h = image.width * height // image.height, height
    if w < 1 or h < 1:  # (a sliver: 2000x1 filled into a square)
        raise InvalidRequest(f"the {image.width}x{image.height} picture is too thin to {NAMES[mode]} to "
                             f"{width}x{height}: it scales to {w}x{h}; use crop-and-resize or just-resize")
    resized = image.resize((w, h), resample=Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if mode == 2 and ratio < own:  # bands above and below: the first and last rows, stretched
        band = height // 2 - h // 2
        if band > 0:
            out.paste(resized.resize((width, band), Image.BICUBIC, box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, band), Image.BICUBIC, box=(0, h, width, h)), box=(0, band + h))
    elif mode == 2 and ratio > own:  # bands left and right: the first and last columns
        band = width // 2 - w // 2
        if band > 0:
            out.paste(resized.resize((band, height), Image.BICUBIC, box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((band, height), Image.BICUBIC, box=(w, 0, w, height)), box=(band + w, 0))
    return out
