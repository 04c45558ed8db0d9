"""Images from request content parts: data: URLs, checked before anything is decoded."""

from __future__ import annotations

import binascii
import io
import re

import pybase64
from PIL import Image, UnidentifiedImageError

from .errors import APIError
from .metrics import IMAGE_ERRORS

_DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+)?(;[^,]*)?;base64,", re.IGNORECASE)
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


def _refuse(reason: str, status: int, message: str) -> APIError:
    IMAGE_ERRORS.labels(reason).inc()
    return APIError(status, message, param="messages", code=f"image_{reason}")


def load_image(url: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """A PIL image from a base64 data URL; a clear 4xx for anything else."""
    m = _DATA_URL.match(url)
    if not m:
        scheme = url.split(":", 1)[0] if ":" in url else "(none)"
        raise _refuse("url", 400, f"image_url must be a base64 data: URL; scheme {scheme!r} is not enabled")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes:
        raise _refuse("too_large", 413, f"image is larger than {max_bytes} bytes")
    try:
        data = pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("bad_base64", 400, "image_url data is not valid base64") from None
    if not data:
        raise _refuse("empty", 400, "image is empty")
    try:
        # open() reads only the header: the size is checked before any pixel is decoded.
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _refuse("too_many_pixels", 413, "image has more pixels than PIL will decode") from None
    except (UnidentifiedImageError, OSError):
        raise _refuse("not_an_image", 400, "image_url data is not a PNG, JPEG or WebP image") from None
    if image.format not in ALLOWED_FORMATS:
        raise _refuse("format", 400, f"image format {image.format} is not one of PNG, JPEG, WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise _refuse("too_many_pixels", 413, f"image is {width}x{height}, more than {max_pixels} pixels")
    if width == 0 or height == 0:
        raise _refuse("empty", 400, "image has no pixels")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError):
        raise _refuse("truncated", 400, "image data is truncated or corrupt") from None
    return image.convert("RGB")
