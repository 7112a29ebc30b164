"""Images in ``/v1/chat/completions``: OpenAI's ``image_url`` content parts (data: URIs always, http(s) URLs only
with ``allow_urls``), through the `openai` client on the shared test image model; every bad image a 400 in
OpenAI's error shape naming the problem, never a 500, and a text-only model refuses images."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from conftest import run_server
from PIL import Image as PILImage
from vision_testing import mllama_checkpoint, vision_llm

from llamaforge.vision.inputs import ImageLimits


def png(colour: tuple[int, int, int], size: tuple[int, int] = (6, 5)) -> bytes:
    return png_of(PILImage.new("RGB", size, colour))


def png_of(image: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(*urls: str, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server():
    limits = ImageLimits(allow_files=False, max_images=2, max_bytes=4000)
    with run_server(llm=vision_llm(), max_batch=2, image_limits=limits) as running:
        yield running


def test_an_image_url_data_uri_through_the_openai_client(server):
    messages = ask(data_uri(png((255, 0, 0))))
    expected = vision_llm().chat(messages, max_new_tokens=6, temperature=0)
    client = server.client()
    reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected.text
    chunks = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0,
                                            stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    other = client.chat.completions.create(model="tiny-chat", messages=ask(data_uri(png((0, 0, 255)))), max_tokens=6,
                                           temperature=0, logprobs=True)  # fmt: skip
    same = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True)  # fmt: skip
    assert other.choices[0].logprobs.content[0].logprob != same.choices[0].logprobs.content[0].logprob


BAD = [
    (ask("data:image/png;base64," + base64.b64encode(b"not a picture").decode()), "is not an image"),
    (ask("data:image/png;base64,%%%"), "base64 is invalid"),
    (ask("data:text/plain;base64,aGk="), "not image/"),
    (ask(data_uri(png((1, 2, 3)) + b"\0" * 5000)), "larger than the limit of 4000 bytes"),
    (ask(*[data_uri(png((1, 2, 3)))] * 3), "has 3 images; at most 2"),
    (ask("https://example.com/cat.png"), "image URLs are not fetched here unless allowed (--allow-image-urls)"),
    (ask("/etc/hostname"), "an image must be a data:image/...;base64 URI"),
    (ask("file:///etc/hostname"), "an image must be a data:image/...;base64 URI"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "an image_url part is"),
    ([{"role": "user", "content": [{"type": "image", "path": "/etc/hostname"}]}], "content parts are"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "content parts are"),
]


@pytest.mark.parametrize(("messages", "problem"), BAD)
def test_bad_images_are_400_naming_the_problem(server, messages, problem):
    with server.http() as h:
        r = h.post("/v1/chat/completions", json={"model": "tiny-chat", "messages": messages, "max_tokens": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert problem in error["message"] and error["type"] == "invalid_request_error"
        assert error["param"].startswith("messages")
        assert h.get("/health").status_code == 200


def test_a_text_only_model_refuses_images():
    llm = vision_llm()
    llm.vision = None
    with run_server(llm=llm, max_batch=1) as running, running.http() as h:
        r = h.post("/v1/chat/completions", json={"messages": ask(data_uri(png((1, 2, 3)))), "max_tokens": 2})
        assert r.status_code == 400 and "this model takes no images" in r.json()["error"]["message"]
        text = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert text.status_code == 200


@pytest.fixture
def image_host():
    body = png((0, 255, 0))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/green.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()
    host.server_close()


def test_http_image_urls_only_with_allow_urls(image_host):
    limits = ImageLimits(allow_files=False, allow_urls=True)
    expected = vision_llm().chat(ask(data_uri(png((0, 255, 0)))), max_new_tokens=4, temperature=0).text
    with run_server(llm=vision_llm(), max_batch=1, image_limits=limits) as running, running.http() as h:
        body = {"messages": ask(f"{image_host}/green.png"), "max_tokens": 4, "temperature": 0}
        r = h.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
        r = h.post("/v1/chat/completions", json={**body, "messages": ask(f"{image_host}/gone.png")})
        assert r.status_code == 400 and "the server answered HTTP 404" in r.json()["error"]["message"]


def test_serve_flags_set_the_image_limits():
    from llamaforge.cli import build_parser
    from llamaforge.cli.serve import _image_limits
    from llamaforge.errors import UserError

    def limits(*flags: str) -> ImageLimits:
        return _image_limits(build_parser().parse_args(["serve", *flags]))

    assert limits() == ImageLimits(allow_files=False)
    assert limits("--allow-image-urls", "--max-images", "3", "--max-image-mb", "1.5") == ImageLimits(
        allow_files=False, allow_urls=True, max_images=3, max_bytes=int(1.5 * 2**20))  # fmt: skip
    with pytest.raises(UserError, match="--max-images must be >= 1, got 0"):
        limits("--max-images", "0")
    with pytest.raises(UserError, match="--max-image-mb must be positive"):
        limits("--max-image-mb", "-1")


@pytest.mark.conformance
def test_a_real_image_model_through_the_openai_client(tmp_path):
    """A tiny random Llama 3.2 Vision checkpoint (``vision_testing.mllama_checkpoint``) loaded by ``load()``."""
    import llamaforge

    llm = llamaforge.load(mllama_checkpoint(tmp_path)[1])
    rng = np.random.default_rng(0)
    uri = data_uri(png_of(PILImage.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "Describe it."}]}]  # fmt: skip
    expected = llm.chat(messages, max_new_tokens=6, temperature=0).text
    with run_server(llm=llm, max_batch=2) as running:
        client = running.client()
        reply = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == expected
        text = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, temperature=0)  # fmt: skip
        assert text.choices[0].finish_reason in ("length", "stop")
