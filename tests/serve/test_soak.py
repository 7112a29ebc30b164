"""Soak: many mixed requests (valid, invalid, cancelled mid-stream, abandoned) from concurrent clients leave the
server answering, with no slot or queue place leaked and memory back near where it started."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import MODEL, run_server

openai = pytest.importorskip("openai")

MAX_BATCH = 4
CHAT = [{"role": "user", "content": "Tell me a story."}]


def _one(srv, client, i: int) -> str:
    rng = random.Random(i)
    kind = rng.choice(["completion", "chat", "stream", "json", "invalid", "too_long", "unknown_model", "cancel",
                       "abandon", "echo"])  # fmt: skip
    max_tokens = rng.randint(1, 24)
    try:
        if kind == "completion":
            client.completions.create(model=MODEL, prompt="Once", max_tokens=max_tokens, n=rng.randint(1, 2), seed=i)
        elif kind == "chat":
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens, temperature=0.5)
        elif kind == "stream":
            chunks = list(
                client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens, stream=True)
            )
            assert chunks[-1].choices[0].finish_reason
        elif kind == "json":
            r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens + 4, seed=i,
                                               response_format={"type": "json_object"})  # fmt: skip
            content = r.choices[0].message.content
            if r.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(content), dict)
            else:  # cut short by max_tokens: an unfinished object
                assert r.choices[0].finish_reason == "length" and content.startswith("{")
        elif kind == "echo":
            client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=1, echo=True, logprobs=1)
        elif kind == "invalid":
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model=MODEL, prompt="x", temperature=-1)
        elif kind == "too_long":
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model=MODEL, prompt="word " * 300, max_tokens=4)
        elif kind == "unknown_model":
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="nope", prompt="x", max_tokens=4)
        elif kind == "cancel":
            stream = client.completions.create(model=MODEL, prompt="Hi", max_tokens=200, stream=True,
                                               extra_body={"ignore_eos": True})  # fmt: skip
            for n, _ in enumerate(stream):
                if n >= rng.randint(0, 3):
                    break
            stream.close()
        elif kind == "abandon":  # a non-streaming client that gives up
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 240, "ignore_eos": True}
            try:
                with srv.http(timeout=0.05) as h:
                    status = h.post("/v1/completions", json=body).status_code
            except httpx.TimeoutException:
                return kind
            assert status in (200, 429)  # quick answers: the queue was full, or (a fast machine) it finished
            return "429" if status == 429 else "completion"
    except openai.RateLimitError:
        return "429"
    return kind


def _soak(tiny_model_dir, requests: int, workers: int = 8) -> None:
    with run_server(tiny_model_dir, max_batch=MAX_BATCH, max_queue=8) as srv:
        client = srv.client(timeout=120)
        for i in range(10):  # warm up: first-time allocations are not leaks
            _one(srv, client, 10_000 + i)
        _wait_idle(srv)
        baseline = srv.metrics()["process_resident_memory_bytes"]
        with ThreadPoolExecutor(workers) as pool:
            kinds = list(pool.map(lambda i: _one(srv, client, i), range(requests)))
        assert len(kinds) == requests and len(set(kinds)) >= 8
        m = _wait_idle(srv)
        assert m["llamaforge_slots_free"] == MAX_BATCH
        assert m["llamaforge_queue_depth"] == 0 and m["llamaforge_engine_tracked_requests"] == 0
        assert httpx.get(srv.base_url + "/health").status_code == 200
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
        grown = m["process_resident_memory_bytes"] - baseline
        assert grown < 64 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"


def _wait_idle(srv, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        if m["llamaforge_requests_active"] == 0 and m["llamaforge_requests_running"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still active: {m}"
        time.sleep(0.1)


def test_soak_short(tiny_model_dir):
    _soak(tiny_model_dir, 50)


@pytest.mark.slow
def test_soak_500(tiny_model_dir):
    _soak(tiny_model_dir, 500, workers=16)
