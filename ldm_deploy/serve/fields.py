"""Typed values of JSON request fields, each mistake naming its field; images from base64."""

from __future__ import annotations

import base64
import binascii
import io
import math

from PIL import Image

from ldm_deploy.errors import InvalidRequest

MAX_PIXELS = 40_000_000  # an image's, decoded: 120 MB as RGB


def picture(value, what: str) -> Image.Image:
    """A base64 image (plain, or a data: URL) -> a PIL image."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a base64-encoded image, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if value.startswith(("http://", "https://")):
        raise InvalidRequest(f"{what}: images are not fetched from URLs here; send the image base64-encoded")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{what} is not valid base64 or not an image ({e})") from None
    return image_file(data, what)


def image_file(data: bytes, what: str) -> Image.Image:
    """An image file's bytes -> a PIL image, its size checked before it is decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.size[0] * image.size[1] > MAX_PIXELS:  # before decoding: a small file can hold a huge image
            raise InvalidRequest(f"{what} is {image.size[0]}x{image.size[1]}; this server takes images of up to "
                                 f"{MAX_PIXELS // 1_000_000} megapixels")
        image.load()
        return image
    except InvalidRequest:
        raise
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidRequest(f"{what} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except Exception as e:  # PIL's decoders raise many kinds (SyntaxError, NotImplementedError, ...)
        raise InvalidRequest(f"{what} is not an image PIL can read ({type(e).__name__}: {e})") from None


def text(body: dict, key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" is valid JSON, not valid text)
        raise InvalidRequest(f"{key} is not valid Unicode text") from None
    return value


def integer(body: dict, key: str, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, float) or not math.isfinite(value) or int(value) != value:
        raise InvalidRequest(f"{key} must be a whole number, got {repr(value)[:60]}")
    return int(value)


def number(body: dict, key: str, default) -> float:
    value = body.get(key)
    if value is None:
        return default
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int past a float's range
        finite = False
    if not finite:
        raise InvalidRequest(f"{key} must be a finite number, got {repr(value)[:40]}")
    return float(value)


def flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false, got {repr(value)[:60]}")
    return value
