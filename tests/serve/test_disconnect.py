"""A client that goes away stops its generation in the engine, wherever it leaves: before the first chunk of a
stream (the response body never started), mid-stream, or while waiting for a non-streaming answer. The engine's
request is gone and its KV-cache blocks are free shortly after, not when the request would have finished."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MODEL, run_server
from starlette.requests import ClientDisconnect

LONG = 400  # tokens: with the slowed step below, far longer than any check here waits


@pytest.fixture(scope="module")
def srv(tiny_model_dir) -> Iterator[Any]:
    with run_server(tiny_model_dir, max_batch=2, max_queue=4, prefix_caching=False) as running:
        yield running


@pytest.fixture(autouse=True)
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 ms per engine step: a 400-token request takes > 4 s, so one still in the engine after a second is one
    that was not cancelled (the tiny model alone would finish it before the checks run)."""
    from llamaforge.inference import Engine

    step = Engine.step

    def slow_step(self):
        time.sleep(0.01)
        return step(self)

    monkeypatch.setattr(Engine, "step", slow_step)


def _engine_idle(srv: Any, timeout: float = 2.0) -> dict[str, int]:
    """Wait until the engine holds no request and no cache block; return what it held when the wait ended."""
    deadline = time.monotonic() + timeout
    while True:
        eng = srv.state.engine
        held = {"active": eng.active, "tracked": eng.tracked, "running": eng.running,
                "blocks": eng.engine.cache.num_used, "streams": srv.state.streams.open()}  # fmt: skip
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.02)


def _body(path: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": LONG, "ignore_eos": True, "stream": stream}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    else:
        body["prompt"] = "Once upon a time"
    return body


def _asgi(srv: Any, path: str, body: dict[str, Any], leave_after: int, spec: str = "2.3") -> list[dict[str, Any]]:
    """Call the app on the server's own event loop as a client that sends `body` and disconnects after receiving
    `leave_after` body chunks (0: before the response starts). With ASGI spec 2.4 a server reports the
    disconnect by raising OSError from `send` (the app is not told through `receive`). Returns the messages sent."""
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}  # fmt: skip
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        if leave_after > 0:
            await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if spec == "2.4" and sum(m["type"] == "http.response.body" for m in sent) >= leave_after:
            raise OSError("the client closed the connection")
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) >= leave_after:
            gone.set()

    async def call() -> None:
        with contextlib.suppress(OSError, ClientDisconnect):
            await srv.app(scope, receive, send)

    loop = srv.state.engine._loop
    asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=30)
    return sent


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("leave_after", [0, 1, 3])
def test_a_stream_whose_client_leaves_is_cancelled_in_the_engine(srv, path, leave_after, spec):
    start = time.monotonic()
    sent = _asgi(srv, path, _body(path, stream=True), leave_after, spec)
    assert time.monotonic() - start < 3, "the response kept streaming after the client left"
    assert sum(m["type"] == "http.response.body" for m in sent) <= leave_after + 1
    assert _engine_idle(srv) == {"active": 0, "tracked": 0, "running": 0, "blocks": 0, "streams": 0}
    m = srv.metrics()
    assert m['llamaforge_generations_finished_total{reason="cancelled"}'] >= 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_non_streaming_request_whose_client_left_is_cancelled(srv, path):
    start = time.monotonic()
    sent = _asgi(srv, path, _body(path, stream=False), leave_after=0)
    assert time.monotonic() - start < 3, "the request ran on after its client left"
    assert sent[0]["status"] == 499  # nobody reads it; what matters is that the engine stopped
    assert _engine_idle(srv) == {"active": 0, "tracked": 0, "running": 0, "blocks": 0, "streams": 0}


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("linger", [0.0, 0.05, 0.3])
def test_a_real_socket_closed_early_leaves_nothing_running(srv, stream, linger):
    """Over TCP: send the request, then close the connection at once, a little later, or after the first bytes
    of the answer arrived."""
    raw = json.dumps(_body("/v1/completions", stream)).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode()  # fmt: skip
    host, port = srv.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + raw)
        time.sleep(linger)
        if linger >= 0.3 and stream:
            assert s.recv(1)  # the response has started
    assert _engine_idle(srv, timeout=3) == {"active": 0, "tracked": 0, "running": 0, "blocks": 0, "streams": 0}
