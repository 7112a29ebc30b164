"""Images as users give them, decoded and checked: ``load_image(source, limits) -> vision.Image``.

A source is a file path, raw bytes, a ``data:image/...;base64,`` URI, an http(s) URL (only with
``ImageLimits(allow_urls=True)``), a ``PIL.Image.Image`` or an ``Image`` already loaded. Every image is decoded by
Pillow from a short list of raster formats (never EPS and friends, which run external programs), converted to RGB as
transformers' image processors do (transparency composited onto white), and keyed by the sha256 of its pixels.

Images come from strangers (a server's clients, files from the internet), so everything is bounded before it is
spent: the encoded size before reading or base64-decoding, the pixel count from the header before decoding (a
decompression bomb declares huge dimensions in a tiny file), the images per request, and a download's size and time.
Every refusal is an ``ImageError`` (a ValueError) whose message names the source and the problem.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError
from . import Image

MAX_BYTES = 20 * 2**20  # encoded bytes of one image (OpenAI's limit per image is 20 MB too)
MAX_PIXELS = 6144 * 6144  # width x height of one image; 150 MB as RGBA while it is converted
MAX_IMAGES = 8  # images per request
URL_TIMEOUT = 10.0  # seconds one download may take in all
# Raster formats only: Pillow's EPS plugin runs Ghostscript, and the rarer plugins are rarely fuzzed.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG opens multi-picture (MPO) files too
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class ImageLimits:
    """What one request's images may be. ``allow_files``: plain strings and paths name local files (the CLI and the
    Python API; never a server's clients). ``allow_urls``: http(s) URLs are downloaded (off unless asked for)."""

    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS
    max_images: int = MAX_IMAGES
    allow_files: bool = True
    allow_urls: bool = False
    url_timeout: float = URL_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_images", "url_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def check_count(self, n: int, where: str = "the request") -> None:
        if n > self.max_images:
            raise ImageError(f"{where} has {n} images; at most {self.max_images} are accepted per request")


def load_images(sources: Sequence[Any], limits: ImageLimits | None = None,
                names: Sequence[str] | None = None) -> list[Image]:  # fmt: skip
    """Each source loaded with ``load_image`` (after the count is checked); `names` say where each came from."""
    limits = limits or ImageLimits()
    limits.check_count(len(sources))
    return [load_image(s, limits, name=names[i] if names else None) for i, s in enumerate(sources)]


def load_image(source: Any, limits: ImageLimits | None = None, *, name: str | None = None) -> Image:
    """One image, decoded to RGB within `limits`, or an ``ImageError`` naming `name` (default: the source itself)."""
    from PIL import Image as PILImage

    limits = limits or ImageLimits()
    if isinstance(source, Image):
        return source
    if isinstance(source, PILImage.Image):
        return _checked(source, limits, name or "the image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), limits, name or "the image bytes")
    if isinstance(source, os.PathLike):
        return _from_file(Path(source), limits, name or str(source))
    if not isinstance(source, str):
        raise ImageError(f"{name or 'an image'}: give a file path, bytes, a data: URI, an http(s) URL or a PIL image, "
                         f"not {type(source).__name__}")  # fmt: skip
    scheme = _SCHEME.match(source)
    kind = scheme.group(1).lower() if scheme else ""
    if kind == "data":
        return _from_data_uri(source, limits, name or _short(source))
    if kind in ("http", "https"):
        if not limits.allow_urls:
            how = "--allow-image-urls" if not limits.allow_files else "ImageLimits(allow_urls=True)"
            raise ImageError(f"{name or _short(source)}: image URLs are not fetched here unless allowed ({how}); "
                             "send the image as a data: URI")  # fmt: skip
        return decode_image(_download(source, limits, name or _short(source)), limits, name or _short(source))
    if not limits.allow_files:
        raise ImageError(f"{name or _short(source)}: an image must be a data:image/...;base64 URI"
                         f"{' or an http(s) URL' if limits.allow_urls else ''}")  # fmt: skip
    if scheme and "//" in source[: len(scheme.group(0)) + 2]:  # file://, ftp://, ...: not a path
        raise ImageError(f"{name or _short(source)}: {kind}: URLs are not accepted; give a file path, a data: URI "
                         "or an http(s) URL")  # fmt: skip
    return _from_file(Path(source).expanduser(), limits, name or source)


def decode_image(data: bytes, limits: ImageLimits, name: str) -> Image:
    """Encoded image bytes decoded with Pillow (header and pixel count checked before the pixels are decoded)."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if not data:
        raise ImageError(f"{name}: is empty, not an image")
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes is larger than the limit of {limits.max_bytes} bytes per image")
    PILImage.init()  # registers the plugins of FORMATS beyond the few Pillow preloads (WebP, TIFF)
    try:
        image = PILImage.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: is not an image (or not one of {', '.join(FORMATS)})") from None
    except PILImage.DecompressionBombError as exc:
        raise ImageError(f"{name}: is too large to decode: {exc}") from None
    except Exception as exc:  # Pillow's plugins raise many kinds on damaged headers
        raise ImageError(f"{name}: cannot read the image header: {_reason(exc)}") from None
    return _checked(image, limits, name)


def to_rgb(image: Any) -> Any:
    """`image` in mode RGB as transformers' ``convert_to_rgb`` makes it: transparency composited onto white."""
    from PIL import Image as PILImage

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def pixel_digest(rgb: Any) -> str:
    """The sha256 of an RGB image's size and pixels: equal digests, equal images (whatever file they came from)."""
    return hashlib.sha256(b"%dx%d:" % rgb.size + rgb.tobytes()).hexdigest()


def _checked(image: Any, limits: ImageLimits, name: str) -> Image:
    from PIL import Image as PILImage

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(f"{name}: is {width}x{height} = {width * height} pixels, more than the limit of "
                         f"{limits.max_pixels} pixels per image")  # fmt: skip
    try:
        with _refusing_truncated_data():
            image.load()  # the first frame of an animation, as the image processors take it
        rgb = to_rgb(image)
    except PILImage.DecompressionBombError as exc:
        raise ImageError(f"{name}: is too large to decode: {exc}") from None
    except Exception as exc:  # truncated or damaged data: Pillow raises OSError, SyntaxError, ValueError, ...
        raise ImageError(f"{name}: cannot decode the image (truncated or damaged?): {_reason(exc)}") from None
    if rgb.size != (width, height):  # a plugin that changed its mind about the size while decoding
        raise ImageError(f"{name}: declares {width}x{height} pixels but decodes to {rgb.size[0]}x{rgb.size[1]}")
    return Image(pixels=rgb, digest=pixel_digest(rgb))


_PILLOW_FLAGS = threading.Lock()


@contextmanager
def _refusing_truncated_data() -> Iterator[None]:
    """Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is process-wide, and other libraries turn it on (llama-models'
    Llama 4 preprocessing does on import): here a truncated image is refused whatever it says. The lock keeps
    threads that decode at once from restoring each other's value."""
    from PIL import ImageFile

    with _PILLOW_FLAGS:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _from_file(path: Path, limits: ImageLimits, name: str) -> Image:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError(f"{name}: is not a file")
        if size > limits.max_bytes:
            raise ImageError(f"{name}: {size} bytes is larger than the limit of {limits.max_bytes} bytes per image")
        with path.open("rb") as f:
            data = f.read(limits.max_bytes + 1)  # the file may have grown since stat
    except OSError as exc:
        raise ImageError(f"{name}: cannot read the file: {exc.strerror or exc}") from None
    return decode_image(data, limits, name)


def _from_data_uri(uri: str, limits: ImageLimits, name: str) -> Image:
    header, comma, payload = uri.partition(",")
    media = header[len("data:") :].split(";")
    if not comma or "base64" not in (m.strip().lower() for m in media[1:]):
        raise ImageError(f"{name}: a data URI must be data:image/<type>;base64,<data>")
    if not media[0].strip().lower().startswith("image/"):
        raise ImageError(f"{name}: the data URI holds {media[0].strip() or 'no media type'!r}, not image/...")
    payload = "".join(payload.split())  # line breaks inside base64 are common and harmless
    if len(payload) // 4 * 3 > limits.max_bytes + 2:  # checked before decoding anything
        raise ImageError(f"{name}: about {len(payload) // 4 * 3} bytes is larger than the limit of "
                         f"{limits.max_bytes} bytes per image")  # fmt: skip
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{name}: the data URI's base64 is invalid: {exc}") from None
    return decode_image(data, limits, name)


def _download(url: str, limits: ImageLimits, name: str) -> bytes:
    """The body of an http(s) URL: redirects only to http(s), at most max_bytes, within url_timeout in all."""
    import http.client
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    class HTTPRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
            if urlsplit(newurl).scheme.lower() not in ("http", "https"):
                raise ImageError(f"{name}: redirects to {_short(newurl)}, which is not an http(s) URL")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.OpenerDirector()  # no file:, ftp: or data: handlers, unlike build_opener()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), HTTPRedirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):  # fmt: skip
        opener.add_handler(handler)
    deadline = time.monotonic() + limits.url_timeout
    request = urllib.request.Request(url, headers={"User-Agent": "llamaforge", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=limits.url_timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limits.max_bytes:
                raise ImageError(f"{name}: {length} bytes is larger than the limit of {limits.max_bytes} bytes per "
                                 "image")  # fmt: skip
            data = bytearray()
            while chunk := response.read(1 << 16):
                data += chunk
                if len(data) > limits.max_bytes:
                    raise ImageError(f"{name}: is larger than the limit of {limits.max_bytes} bytes per image")
                if time.monotonic() > deadline:
                    raise ImageError(f"{name}: the download took longer than {limits.url_timeout:g} s")
            return bytes(data)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"{name}: the server answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"{name}: cannot download the image: {reason}") from None


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
