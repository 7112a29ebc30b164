"""The server's limits (request body size, prompt length, n x max_tokens, concurrent streams per API key, template
render time: each with a default and a `serve` flag) and its security basics (API keys compared in constant time and
never logged, loopback by default, no path from a request to the file system)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, MODEL, run_server

from llamaforge.serve.limits import Limits, StreamCounter, client_key
from llamaforge.serve.openai import APIError

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def in_process(model_dir: Path, **config: Any) -> Any:
    from starlette.testclient import TestClient

    import llamaforge
    from llamaforge.serve import ServerConfig, create_app

    config.setdefault("max_seq_len", 128)
    app = create_app(ServerConfig(model_name=MODEL, api_key=API_KEY, **config), llm=llamaforge.load(model_dir))
    return TestClient(app, raise_server_exceptions=False, headers=AUTH)


@pytest.fixture(scope="module")
def limited(tiny_model_dir: Path) -> Iterator[Any]:
    limits = Limits(max_prompt_tokens=40, max_request_tokens=10)
    with in_process(tiny_model_dir, limits=limits, max_body_bytes=4096) as client:
        yield client


def error(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["code"] == code, body
    return body


# Limits --------------------------------------------------------------------------------------------------
def test_defaults_and_validation() -> None:
    from llamaforge.serve import ServerConfig

    limits = ServerConfig().limits
    assert limits.max_prompt_tokens is None and limits.max_request_tokens == 65536
    assert limits.max_streams_per_key == 16 and limits.template_timeout == 2.0
    for bad in ({"max_prompt_tokens": 0}, {"max_request_tokens": -1}, {"max_streams_per_key": 0},
                {"template_timeout": 0.0}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)


def test_request_body_size(limited: Any) -> None:
    body = json.dumps({"prompt": "x" * 5000, "max_tokens": 1}).encode()
    error(limited.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}), 413,
          "request_too_large")  # fmt: skip

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    error(limited.post("/v1/completions", content=chunks()), 413, "request_too_large")


def test_prompt_length(limited: Any) -> None:
    ok = limited.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1})
    assert ok.status_code == 200
    body = error(limited.post("/v1/completions", json={"prompt": list(range(1, 42)), "max_tokens": 1}), 400,
                 "prompt_too_long")  # fmt: skip
    assert "41 tokens" in body["message"] and "at most 40" in body["message"] and body["param"] == "prompt"
    chat = [{"role": "user", "content": "a long question " * 8}]
    body = error(limited.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 1}), 400,
                 "prompt_too_long")  # fmt: skip
    assert body["param"] == "messages"


def test_n_times_max_tokens(limited: Any) -> None:
    body = error(limited.post("/v1/completions", json={"prompt": [1, 2], "n": 3, "max_tokens": 4}), 400,
                 "request_too_large")  # fmt: skip
    assert "3 x 4 = 12" in body["message"] and "10" in body["message"]
    r = limited.post("/v1/completions", json={"prompt": [1, 2], "n": 2, "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
    # Without max_tokens, a chat request gets what the limit leaves per choice instead of an error.
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "ignore_eos": True}
    r = limited.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 9


def test_template_render_time(tiny_model_dir: Path, tmp_path: Path) -> None:
    slow = shutil.copytree(tiny_model_dir, tmp_path / "slow")
    config = json.loads((slow / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (slow / "tokenizer_config.json").write_text(json.dumps(config))
    with in_process(slow, limits=Limits(template_timeout=0.3)) as client:
        start = time.monotonic()
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        body = error(r, 400)
        assert "0.3 s" in body["message"] and body["param"] == "messages"
        assert time.monotonic() - start < 5
        assert client.get("/health").status_code == 200


def test_stream_counter() -> None:
    counter = StreamCounter(2)
    counter.acquire("a")
    counter.acquire("a")
    counter.acquire("b")
    with pytest.raises(APIError) as info:
        counter.acquire("a")
    assert info.value.status == 429 and info.value.code == "too_many_streams"
    counter.release("a")
    counter.acquire("a")
    assert counter.open("a") == 2 and counter.open() == 3


def test_client_key_hashes_the_token() -> None:
    class Client:
        host = "10.0.0.7"

    key = client_key({"authorization": "Bearer sk-secret"}, Client())
    assert "sk-secret" not in key and key == client_key({"authorization": "bearer  sk-secret"}, Client())
    assert client_key({}, Client()) == "addr:10.0.0.7"


def slow_steps(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make each engine step take 20 ms, so that a stream of 200 tokens stays open for seconds."""
    engine = server.state.engine.engine
    step = engine.step

    def slow() -> Any:
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow)


def test_concurrent_streams_per_key(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with (
        run_server(tiny_model_dir, api_key=API_KEY, limits=Limits(max_streams_per_key=1)) as server,
        server.http() as h,
    ):
        slow_steps(server, monkeypatch)
        with h.stream("POST", "/v1/completions", json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a closed line iterator closes the connection
            next(lines)  # the stream is open
            r = h.post("/v1/completions", json=long)
            error(r, 429, "too_many_streams")
            assert h.post("/v1/completions", json={**long, "stream": False, "max_tokens": 2}).status_code == 200
        deadline = time.monotonic() + 20  # the client left: its place is given back
        while server.state.streams.open() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.state.streams.open() == 0
        with h.stream("POST", "/v1/completions", json={**long, "max_tokens": 3}) as again:
            assert again.status_code == 200 and "[DONE]" in again.read().decode()
        assert server.state.streams.open() == 0


def test_serve_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The flags reach ServerConfig.limits; bad values are refused naming the flag."""
    from llamaforge.cli import main

    seen = {}

    def fake_create_app(config: Any, **kw: Any) -> Any:
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("llamaforge.serve.create_app", fake_create_app)
    argv = ["serve", "--model", "x", "--max-prompt-tokens", "100", "--max-request-tokens", "500",
            "--max-streams-per-key", "3", "--template-timeout", "0.5"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(argv)
    assert seen["config"].limits == Limits(max_prompt_tokens=100, max_request_tokens=500, max_streams_per_key=3,
                                           template_timeout=0.5)  # fmt: skip
    assert main(["serve", "--model", "x", "--max-streams-per-key", "0"]) == 2
    assert "--max-streams-per-key: must be positive, got 0" in capsys.readouterr().err


# Security basics -----------------------------------------------------------------------------------------------
def test_api_key_is_compared_in_constant_time_and_never_logged(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import hmac

    from llamaforge.serve import ServerConfig

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    caplog.set_level(logging.DEBUG)
    with in_process(tiny_model_dir) as client:
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
        wrong = client.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer sk-wrong-1"})
        body = error(wrong, 401, "invalid_api_key")
        assert "sk-wrong-1" not in body["message"] and API_KEY not in body["message"]
        error(client.get("/v1/models", headers={"Authorization": ""}), 401)
    assert len(calls) >= 2
    assert API_KEY not in caplog.text and "sk-wrong-1" not in caplog.text
    assert API_KEY not in repr(ServerConfig(api_key=API_KEY))


def test_loopback_by_default_and_a_warning_otherwise() -> None:
    import argparse

    from llamaforge.cli.serve import bind_warning, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["serve"]).host == "127.0.0.1"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert bind_warning(host, None) is None
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.org"):
        assert "reachable from other machines" in bind_warning(host, "k")
        assert "without --api-key" in bind_warning(host, None)


def test_no_path_from_a_request_to_the_file_system(tiny_model_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.cache"
    secret.write_text("not for clients")
    with in_process(tiny_model_dir) as client:  # no --slot-save-path: slot actions are off
        error(client.post("/slots/0?action=restore", json={"filename": str(secret)}), 501, "slots_disabled")
    slots = tmp_path / "slots"
    slots.mkdir()
    with in_process(tiny_model_dir, slot_save_path=str(slots)) as client:
        for name in (str(secret), "../secret.cache", "..", "a/b", "..\\secret.cache", "", ".x", "a\x00b"):
            for action in ("save", "restore"):
                body = error(client.post(f"/slots/0?action={action}", json={"filename": name}), 400)
                assert body["param"] == "filename"
        error(client.post("/slots/0?action=restore", json={"filename": "missing.cache"}), 404, "file_not_found")
        for path in ("/webui/../../pyproject.toml", "/webui/%2e%2e/%2e%2e/pyproject.toml", "/webui//etc/passwd"):
            r = client.get(path)
            assert r.status_code == 404 and "[project]" not in r.text and "root:" not in r.text
        # Text that looks like a path is only text.
        r = client.post("/v1/completions", json={"prompt": str(secret), "max_tokens": 1, "echo": True})
        assert r.status_code == 200 and "not for clients" not in r.text
    assert secret.read_text() == "not for clients"
    assert sorted(p.name for p in slots.iterdir()) == []


def test_stream_limit_is_released_when_a_client_never_reads(tiny_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    with run_server(tiny_model_dir, api_key=API_KEY, limits=Limits(max_streams_per_key=1)) as server:
        slow_steps(server, monkeypatch)
        for _ in range(3):  # connect, send, leave before reading anything
            with (
                httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as h,
                h.stream(
                    "POST",
                    "/v1/completions",
                    json={"prompt": "hi", "max_tokens": 100, "stream": True, "ignore_eos": True},
                ) as r,
            ):
                assert r.status_code == 200
            deadline = time.monotonic() + 20
            while server.state.streams.open() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.state.streams.open() == 0
