"""Images from request content parts, checked before anything is decoded.

Sources: base64 data: URLs always; http(s) URLs only from hosts on an allow-list
(--allowed-image-domains), never to loopback, link-local or private addresses,
redirects included; local files only under one folder (--allowed-local-media-path).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import io
import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urljoin, urlsplit

import httpx
import pybase64
from PIL import Image, UnidentifiedImageError

from engine.image_work import ImageWorkers, as_rgb

from .errors import APIError
from .settings import ServerSettings

_DATA_URL = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+)?(;[^,]*)?;base64,", re.IGNORECASE)
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
_MAX_REDIRECTS = 3
_FETCH_TIMEOUT_S = 10.0  # each connect or read
_FETCH_DEADLINE_S = 30.0  # the whole fetch, redirects included
# IPv6 forms that carry an IPv4 address in their low 32 bits: NAT64 (well-known and local-use
# prefixes) and the old IPv4-compatible form. A "global" one can still reach 10.0.0.5.
_EMBEDS_IPV4 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))


# Why an image was refused: the error code is image_<reason>, and dualfocus_image_errors_total
# counts by reason (every reason's series exists from the start).
ImageRefusal = Literal[
    "url",
    "bad_base64",
    "too_large",
    "not_found",
    "fetch",
    "host_not_allowed",
    "address_not_public",
    "empty",
    "not_an_image",
    "format",
    "too_many_pixels",
    "truncated",
]
IMAGE_REFUSALS: tuple[ImageRefusal, ...] = get_args(ImageRefusal)


class ImageRefused(APIError):
    def __init__(self, reason: ImageRefusal, status: int, message: str):
        super().__init__(status, message, param="messages", code=f"image_{reason}")
        self.reason = reason


def _refuse(reason: ImageRefusal, status: int, message: str) -> ImageRefused:
    return ImageRefused(reason, status, message)


async def load_image(url: str, settings: ServerSettings, workers: ImageWorkers) -> tuple[Image.Image, str]:
    """A decoded RGB image from an image_url and a digest of its file, or a clear 4xx. Only the
    header is read here; the pixels are decoded (and the file hashed) on the image workers, not
    on the event loop that drives every stream."""
    if data_url := _DATA_URL.match(url):
        data = _from_data_url(url[data_url.end() :], settings.max_image_bytes)
    elif url.startswith(("http://", "https://")):
        data = await _from_web(url, settings)
    elif url.startswith("file://"):
        data = _from_file(url, settings)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else "(none)"
        raise _refuse("url", 400, f"image_url scheme {scheme!r} is not supported; send a base64 data: URL")
    image = open_image(data, settings.max_image_pixels)  # the header only: cheap
    return await workers.run(_load_and_digest, image, data, pixels=image.width * image.height)


def _load_and_digest(image: Image.Image, data: bytes) -> tuple[Image.Image, str]:
    return load_pixels(image), hashlib.blake2b(data, digest_size=16).hexdigest()


def _from_data_url(payload: str, max_bytes: int) -> bytes:
    if len(payload) * 3 // 4 > max_bytes:
        raise _refuse("too_large", 413, f"image is larger than {max_bytes} bytes")
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("bad_base64", 400, "image_url data is not valid base64") from None


def _from_file(url: str, settings: ServerSettings) -> bytes:
    if not settings.allowed_local_media_path:
        raise _refuse("url", 400, "file:// image URLs are not enabled on this server (--allowed-local-media-path)")
    root = Path(settings.allowed_local_media_path).resolve()
    path = Path(urlsplit(url).path).resolve()
    if not path.is_relative_to(root):
        raise _refuse("url", 400, f"file:// image URLs must be under {root}")
    if not path.is_file():
        raise _refuse("not_found", 400, "no such image file")
    if path.stat().st_size > settings.max_image_bytes:
        raise _refuse("too_large", 413, f"image is larger than {settings.max_image_bytes} bytes")
    return path.read_bytes()


async def _from_web(url: str, settings: ServerSettings) -> bytes:
    if not settings.allowed_image_domains:
        raise _refuse("url", 400, "http(s) image URLs are not enabled on this server (--allowed-image-domains)")
    try:
        async with asyncio.timeout(_FETCH_DEADLINE_S):
            return await _fetch(url, settings)
    except TimeoutError:
        raise _refuse("fetch", 400, f"fetching the image took longer than {_FETCH_DEADLINE_S:.0f} s") from None
    except httpx.HTTPError as e:  # refused, reset, timed out, not HTTP
        raise _refuse("fetch", 400, f"fetching the image failed ({type(e).__name__})") from None


async def _fetch(url: str, settings: ServerSettings) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, timeout=_FETCH_TIMEOUT_S) as client:
        for _ in range(_MAX_REDIRECTS + 1):
            request = await _checked_request(client, url, settings.allowed_image_domains)
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:  # each hop is checked again before it is followed
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise _refuse("fetch", 400, f"fetching the image failed with HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > settings.max_image_bytes:
                        raise _refuse("too_large", 413, f"image is larger than {settings.max_image_bytes} bytes")
                return bytes(data)
            finally:
                await response.aclose()
    raise _refuse("fetch", 400, f"more than {_MAX_REDIRECTS} redirects")


async def _checked_request(client: httpx.AsyncClient, url: str, allowed: list[str]) -> httpx.Request:
    """A GET for `url` if its host is allowed and resolves only to public addresses, sent to
    the address that was checked: resolving again at connect time would let a DNS answer
    that changed in between (rebinding) reach an internal address."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        raise _refuse("url", 400, "image_url is not a valid URL") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https"):
        raise _refuse("url", 400, f"image_url scheme {parts.scheme!r} is not supported after a redirect")
    if not any(host == d or host.endswith("." + d) for d in allowed):
        raise _refuse("host_not_allowed", 400, f"image host {host!r} is not on this server's allow-list")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise _refuse("fetch", 400, f"image host {host!r} does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or not all(is_public(a) for a in addresses):
        raise _refuse("address_not_public", 400, f"image host {host!r} resolves to a non-public address")
    return client.build_request(
        # Credentials in the URL are not sent on: an image host needs none.
        "GET",
        target.copy_with(host=str(addresses[0]), userinfo=b""),
        headers={"Host": parts.netloc.rsplit("@", 1)[-1]},
        # TLS still verifies the certificate against the host name, not the address.
        extensions={"sni_hostname": host} if parts.scheme == "https" else {},
    )


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast, and for IPv6 that carries an IPv4 address (mapped, 6to4,
    Teredo, NAT64, IPv4-compatible), that address too."""
    if address.is_multicast or not address.is_global:
        return False
    if address.version == 6:
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and any(address in network for network in _EMBEDS_IPV4):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    return True


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image in `data`, checked and decoded, in RGB (on the calling thread)."""
    return load_pixels(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, checked: format, size. No pixel is decoded yet."""
    if not data:
        raise _refuse("empty", 400, "image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _refuse("too_many_pixels", 413, "image has more pixels than PIL will decode") from None
    except (UnidentifiedImageError, OSError):
        raise _refuse("not_an_image", 400, "image data is not a PNG, JPEG or WebP image") from None
    if image.format not in ALLOWED_FORMATS:
        raise _refuse("format", 400, f"image format {image.format} is not one of PNG, JPEG, WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise _refuse("too_many_pixels", 413, f"image is {width}x{height}, more than {max_pixels} pixels")
    if width == 0 or height == 0:
        raise _refuse("empty", 400, "image has no pixels")
    return image


def load_pixels(image: Image.Image) -> Image.Image:
    """Decode an opened image's pixels, in RGB."""
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError):
        raise _refuse("truncated", 400, "image data is truncated or corrupt") from None
    return as_rgb(image)
