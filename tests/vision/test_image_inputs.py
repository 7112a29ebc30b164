"""Decoding and checking images as users give them (``llamaforge.vision.inputs``): every kind of source, RGB as
transformers' image processors make it, the pixel digest, and a clear ``ImageError`` for each limit and problem."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image as PILImage

from llamaforge.errors import ImageError
from llamaforge.vision import Image
from llamaforge.vision.inputs import ImageLimits, load_image, load_images, pixel_digest


def encoded(image: PILImage.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def gradient(width: int = 7, height: int = 5, mode: str = "RGB") -> PILImage.Image:
    arr = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)
    return PILImage.fromarray(arr, "RGB").convert(mode)


def test_every_source_gives_the_same_image(tmp_path):
    png = encoded(gradient())
    path = tmp_path / "g.png"
    path.write_bytes(png)
    images = [load_image(path), load_image(str(path)), load_image(png), load_image(data_uri(png)),
              load_image(gradient()), load_image(bytearray(png))]  # fmt: skip
    assert all(isinstance(i, Image) and i.pixels.mode == "RGB" and i.pixels.size == (7, 5) for i in images)
    assert len({i.digest for i in images}) == 1
    assert np.array_equal(np.asarray(images[0].pixels), np.asarray(gradient()))
    assert load_image(images[0]) is images[0]


def test_the_digest_is_of_the_pixels_not_the_file():
    png, bmp = encoded(gradient()), encoded(gradient(), "BMP")
    assert png != bmp and load_image(png).digest == load_image(bmp).digest
    other = gradient()
    other.putpixel((0, 0), (1, 2, 4))
    assert load_image(encoded(other)).digest != load_image(png).digest
    # the same bytes in another shape are another image
    assert pixel_digest(gradient(7, 5)) != pixel_digest(PILImage.frombytes("RGB", (5, 7), gradient(7, 5).tobytes()))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "1", "F"])
def test_odd_modes_become_rgb_as_transformers_makes_them(mode):
    from transformers.image_transforms import convert_to_rgb

    source = gradient(6, 4, "RGBA" if mode in ("LA", "PA") else "RGB")
    if mode in ("RGBA", "LA", "PA"):
        alpha = PILImage.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6) * 10, "L")
        source = source.convert("RGBA")
        source.putalpha(alpha)
    image = source.convert(mode)
    ours = load_image(image)
    assert ours.pixels.mode == "RGB"
    assert np.array_equal(np.asarray(ours.pixels), convert_to_rgb(image, return_numpy=True))


def test_a_palette_with_a_transparent_colour_is_composited_onto_white():
    image = gradient(4, 4).convert("P")
    image.info["transparency"] = image.getpixel((0, 0))
    from transformers.image_transforms import convert_to_rgb

    decoded = load_image(encoded(image)).pixels
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    reference = convert_to_rgb(PILImage.open(io.BytesIO(encoded(image))), return_numpy=True)
    assert np.array_equal(np.asarray(decoded), reference)


def test_an_animation_gives_its_first_frame():
    frames = [PILImage.new("RGB", (3, 3), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).pixels.getpixel((1, 1)) == (255, 0, 0)


@pytest.mark.parametrize(("source", "problem"), [
    (b"hello, not an image", "is not an image"),
    (b"", "is empty"),
    (data_uri(b"GIF89a...", "text/plain"), "not image/"),
    ("data:image/png,abcd", "data:image/<type>;base64"),
    ("data:image/png;base64,@@@@", "base64 is invalid"),
    ("data:image/png;base64,iVBORw0KGgo", "base64 is invalid"),
    ("file:///etc/hostname", "file: URLs are not accepted"),
    ("ftp://example.com/x.png", "ftp: URLs are not accepted"),
    ("https://example.com/cat.png", "not fetched here unless allowed"),
    (12, "not int"),
])  # fmt: skip
def test_bad_sources_name_the_problem(source, problem):
    with pytest.raises(ImageError, match=problem):
        load_image(source)


def test_a_truncated_file_is_refused_with_its_name(tmp_path, monkeypatch):
    path = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path.write_bytes(encoded(PILImage.fromarray(noise))[:2000])
    with pytest.raises(ImageError, match=r"cut\.png: cannot decode the image \(truncated"):
        load_image(path)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as importing llama_models' llama4 sets it
    with pytest.raises(ImageError, match=r"cut\.png: cannot decode the image \(truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's setting is left as it was
    with pytest.raises(ImageError, match=r"missing\.png: cannot read the file: No such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is not a file"):
        load_image(tmp_path)


def test_size_limits_are_checked_before_decoding(tmp_path):
    png = encoded(gradient(40, 30))
    with pytest.raises(ImageError, match=f"{len(png)} bytes is larger than the limit of 100 bytes"):
        load_image(png, ImageLimits(max_bytes=100))
    (tmp_path / "big.png").write_bytes(png)
    with pytest.raises(ImageError, match=r"big\.png: .* bytes is larger than the limit of 100"):
        load_image(tmp_path / "big.png", ImageLimits(max_bytes=100))
    with pytest.raises(ImageError, match="larger than the limit of 100 bytes"):
        load_image(data_uri(png), ImageLimits(max_bytes=100))
    with pytest.raises(ImageError, match="is 40x30 = 1200 pixels, more than the limit of 1000 pixels"):
        load_image(png, ImageLimits(max_pixels=1000))
    with pytest.raises(ImageError, match="1200 pixels"):
        load_image(gradient(40, 30), ImageLimits(max_pixels=1000))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (the IHDR rewritten, its CRC fixed): a decompression bomb."""
    import struct
    import zlib

    data = bytearray(encoded(PILImage.new("L", (1, 1))))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_declaring(100_000, 100_000)  # past Pillow's own limit: its DecompressionBombError, named
    assert len(bomb) < 100
    with pytest.raises(ImageError, match=r"the image bytes: is too large to decode: .*10000000000 pixels"):
        load_image(bomb)
    with pytest.raises(ImageError, match="is 8000x8000 = 64000000 pixels, more than the limit of 37748736"):
        load_image(png_declaring(8000, 8000))  # under Pillow's limit, over ours
    with pytest.raises(ImageError, match="is not an image"):  # Pillow does not open a PNG of no pixels
        load_image(png_declaring(0, 5))
    with pytest.raises(ImageError, match=r"has no pixels \(0x5\)"):
        load_image(PILImage.new("RGB", (0, 5)))


def test_the_count_of_images_is_limited():
    png = encoded(gradient())
    assert len(load_images([png, png], ImageLimits(max_images=2))) == 2
    with pytest.raises(ImageError, match="has 3 images; at most 2 are accepted per request"):
        load_images([png] * 3, ImageLimits(max_images=2))
    with pytest.raises(ValueError, match="max_images must be positive"):
        ImageLimits(max_images=0)


def test_files_can_be_refused_as_a_server_refuses_them(tmp_path):
    path = tmp_path / "g.png"
    path.write_bytes(encoded(gradient()))
    with pytest.raises(ImageError, match=r"must be a data:image/\.\.\.;base64 URI"):
        load_image(str(path), ImageLimits(allow_files=False))


@pytest.fixture
def http_server() -> Iterator[str]:
    """A loopback HTTP server: /ok.png, /big (a large body), /redirect-file (to file:), /missing (404)."""
    png = encoded(gradient())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/redirect-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/hostname")
                self.end_headers()
                return
            body = {"/ok.png": png, "/big": b"\0" * 5000}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_fetched_only_when_allowed_and_within_limits(http_server):
    allowed = ImageLimits(allow_urls=True, max_bytes=1000, url_timeout=5)
    assert load_image(f"{http_server}/ok.png", allowed).digest == load_image(gradient()).digest
    with pytest.raises(ImageError, match="not fetched here unless allowed"):
        load_image(f"{http_server}/ok.png")
    with pytest.raises(ImageError, match="5000 bytes is larger than the limit of 1000"):
        load_image(f"{http_server}/big", allowed)
    with pytest.raises(
        ImageError, match=r"redirect-file: the server answered HTTP 302.*file:///etc/hostname.* is not allowed"
    ):
        load_image(f"{http_server}/redirect-file", allowed)
    with pytest.raises(ImageError, match="/missing: the server answered HTTP 404"):
        load_image(f"{http_server}/missing", allowed)
