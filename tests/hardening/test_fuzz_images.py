"""Fuzzing image inputs (llamaforge/vision/inputs.py): a damaged, foreign or hostile image file, image bytes or
data: URI loads as an RGB ``Image`` within the limits, or is refused with an ImageError naming its source: never
another exception, a hang or unbounded memory. The cases: valid images of every format and odd mode (P, LA,
CMYK, I;16, I, F, 1), then truncated, with wrong magic, with bytes flipped, with huge or zero dimensions written into
their headers (decompression bombs: a tiny PNG, GIF, BMP or TIFF declaring billions of pixels), and data: URIs with
bad base64, padding and media types."""

from __future__ import annotations

import base64
import io
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fuzzing import SLOW_EXAMPLES, TIME_LIMIT, refuses_cleanly
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from llamaforge.errors import ImageError
from llamaforge.vision import Image
from llamaforge.vision.inputs import ImageLimits, load_image

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)  # small, so an accepted image decodes fast
FORMATS = {"PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "JPEG": "jpg", "WEBP": "webp"}
MODES = {"PNG": ["RGB", "RGBA", "L", "LA", "P", "I;16", "I;16B", "1"], "GIF": ["P", "L"], "BMP": ["RGB", "L", "P", "1"],
         "TIFF": ["RGB", "RGBA", "CMYK", "YCbCr", "L", "LA", "PA", "I;16", "I", "F", "1"],
         "JPEG": ["RGB", "L", "CMYK"], "WEBP": ["RGB", "RGBA"]}  # fmt: skip
HUGE = st.sampled_from([0, 1, 2**15 - 1, 2**16 - 1, 2**16, 2**24, 2**31 - 1, 2**32 - 1])


@st.composite
def encoded_images(draw: Any) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(MODES[fmt]))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = PILImage.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    buf = io.BytesIO()
    image.save(
        buf, fmt, **({"save_all": True, "append_images": [image]} if fmt == "GIF" and draw(st.booleans()) else {})
    )
    return fmt, buf.getvalue()


def declare(fmt: str, data: bytearray, width: int, height: int) -> None:
    """Write width x height into the header of `data` (a bomb when they are huge), keeping its checksums valid."""
    if fmt == "PNG" and len(data) >= 33:
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "GIF" and len(data) >= 10:
        data[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif fmt == "BMP" and len(data) >= 26:
        data[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    elif fmt == "TIFF":  # the first IFD's ImageWidth (256) and ImageLength (257) entries, as LONGs
        order = "<" if data[:2] == b"II" else ">"
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        for n in range(count):
            at = ifd + 2 + 12 * n
            tag, _ = struct.unpack_from(order + "HH", data, at)
            if tag in (256, 257):
                struct.pack_into(order + "HHII", data, at, tag, 4, 1, width if tag == 256 else height)


@st.composite
def damaged_images(draw: Any) -> bytes:
    fmt, raw = draw(encoded_images())
    data = bytearray(raw)
    rare = st.integers(0, 3).map(lambda x: x == 3)
    if draw(rare):
        declare(fmt, data, draw(HUGE), draw(HUGE))
    if draw(rare):  # wrong magic
        data[: draw(st.integers(1, 8))] = draw(st.binary(min_size=1, max_size=8))
    for _ in range(draw(st.integers(0, 3)) if draw(rare) else 0):  # flipped bytes
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    if draw(rare):
        data = data[: draw(st.integers(0, len(data)))]  # truncated
    if draw(rare):
        data += draw(st.binary(max_size=64))  # trailing garbage
    return bytes(data)


def loads_or_refuses(path: Path) -> Any:
    image = refuses_cleanly(path, lambda p: load_image(p, LIMITS), (ImageError,))
    if image is not None:
        assert isinstance(image, Image) and image.pixels.mode == "RGB"
        w, h = image.pixels.size
        assert 0 < w * h <= LIMITS.max_pixels and len(image.digest) == 64
    return image


def check_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.img"
        path.write_bytes(data)
        loads_or_refuses(path)


@given(damaged_images())
def test_damaged_image_files_load_or_are_refused(bounded_memory, data):
    check_file(data)


@given(encoded_images())
def test_every_undamaged_format_and_mode_loads(data):
    fmt, raw = data
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"ok.{FORMATS[fmt]}"
        path.write_bytes(raw)
        assert loads_or_refuses(path) is not None


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF"])
def test_bombs_are_refused_from_the_header_at_the_default_limits(fmt):
    buf = io.BytesIO()
    PILImage.new("L" if fmt != "BMP" else "RGB", (2, 2)).save(buf, fmt)
    data = bytearray(buf.getvalue())
    declare(fmt, data, 60_000, 60_000)
    assert len(data) < 1000
    with pytest.raises(ImageError, match=r"bomb\.png: (is 60000x60000|is too large to decode|cannot)"):
        load_image(bytes(data), name="bomb.png")


@st.composite
def data_uris(draw: Any) -> str:
    media = draw(st.sampled_from(["image/png", "image/gif", "image/jpeg", "text/plain", "", "image/", "IMAGE/PNG"]))
    flags = draw(st.sampled_from([";base64", "", ";charset=utf-8;base64", ";BASE64"]))
    if draw(st.booleans()):
        payload = base64.b64encode(draw(damaged_images())).decode()
        if draw(st.integers(0, 3)) == 0 and payload:  # broken padding or alphabet
            cut = draw(st.integers(0, len(payload) - 1))
            payload = payload[:cut] + draw(st.sampled_from(["", "=", "==", "===", "*", "-_", " \n", "\x00", "é"]))
    else:
        payload = draw(st.text(max_size=80))
    return f"data:{media}{flags},{payload}"


@given(data_uris())
def test_data_uris_load_or_are_refused_naming_the_part(bounded_memory, uri):
    import time

    start = time.monotonic()
    try:
        image = load_image(uri, LIMITS, name="messages[0].content[1]")
    except ImageError as exc:
        assert "messages[0].content[1]" in str(exc)
    else:
        assert image.pixels.mode == "RGB"
    assert time.monotonic() - start < TIME_LIMIT


@given(st.binary(max_size=256) | st.text(max_size=80))
def test_arbitrary_bytes_and_strings_as_a_server_sees_them(source):
    """As the server loads image_url values: no files, no URLs; anything else is an image or an ImageError."""
    try:
        load_image(source, ImageLimits(allow_files=False), name="the part")
    except ImageError as exc:
        assert str(exc).startswith("the part")


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES)
@given(damaged_images())
def test_damaged_image_files_slow(bounded_memory, data):
    check_file(data)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES)
@given(data_uris())
def test_data_uris_slow(bounded_memory, uri):
    test_data_uris_load_or_are_refused_naming_the_part.hypothesis.inner_test(None, uri)
