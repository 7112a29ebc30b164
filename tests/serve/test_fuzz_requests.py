"""Request fuzzing: every route of the in-process app (a tiny random model) gets schema-aware random bodies (wrong
types, huge strings, deep nesting, unicode edge cases, negative and huge numbers, unknown fields) and answers 2xx or
4xx with OpenAI's error body, never 5xx; afterwards the server is healthy and holds no request state."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaforge.serve import schemas as S

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
SLOW_FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def app_client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from starlette.testclient import TestClient

    import llamaforge
    from llamaforge.serve import ServerConfig, create_app

    slots = tmp_path_factory.mktemp("slots")
    config = ServerConfig(model_name=MODEL, api_key=API_KEY, max_batch=4, max_queue=64, max_seq_len=64,
                          slot_save_path=str(slots), max_body_bytes=1 << 20)  # fmt: skip
    app = create_app(config, llm=llamaforge.load(tiny_model_dir))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


# Values: hostile ones for any field, plausible ones per field of the schemas -------------------------------
UNICODE = ["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "\uffff", "👩‍👩‍👧", "e\u0301", "\U0010ffff", "<|im_end|>",
           "{{ 7 * 7 }}", "{% for i in range(100000) %}x{% endfor %}"]  # fmt: skip
leaves = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([-1, 0, -(2**63), 2**63, 2**64, 10**30, -(10**30)]), st.integers(),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 5e-324]), st.floats(),
    st.sampled_from(UNICODE), st.text(max_size=30),
)  # fmt: skip
json_any = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                        max_size=4), max_leaves=12)  # fmt: skip
hostile = st.one_of(
    json_any,
    st.integers(1000, 200_000).map(lambda n: "x" * n),  # a huge string
    st.integers(10, 100_000).map(lambda d: f"DEEP{d}DEEP"),  # deep nesting, spliced in by post()
    st.lists(st.sampled_from(UNICODE), max_size=20).map("".join),
)
text = st.one_of(st.text(max_size=40), st.sampled_from(UNICODE), st.just("Once upon a time"))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"])},
    optional={"content": st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                                    max_size=3)), "name": text},
)  # fmt: skip
PLAUSIBLE: dict[str, Any] = {
    "model": st.sampled_from([MODEL, "other-model"]),
    "prompt": st.one_of(
        text,
        st.lists(st.integers(-2, 400), min_size=1, max_size=8),
        st.lists(text, max_size=3),
        st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=5), max_size=3),
    ),
    "messages": st.lists(message, min_size=1, max_size=4),
    "max_tokens": st.integers(0, 4),
    "max_completion_tokens": st.integers(1, 4),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 10),
    "stop": st.one_of(text, st.lists(text, max_size=4)),
    "seed": st.integers(-(2**70), 2**70),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])}),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-5, 500).map(str), text), st.floats(-150, 150), max_size=3),
    "ignore_eos": st.booleans(),
    "echo": st.booleans(),
    "logprobs": st.one_of(st.booleans(), st.integers(0, 5)),
    "top_logprobs": st.integers(0, 5),
    "best_of": st.integers(1, 3),
    "suffix": text,
    "tools": st.lists(json_any, max_size=2),
    "tokens": st.lists(st.integers(-2, 400), max_size=10),
    "add_special_tokens": st.booleans(),
    "filename": st.one_of(
        text,
        st.sampled_from(["../etc/passwd", "/etc/passwd", "a/b", "ok.cache", ".hidden", "x" * 300, "con", "a\x00b"]),
    ),
}


def fields_of(model: type) -> list[str]:
    return list(model.model_fields)


@st.composite
def bodies(draw: Any, model: type) -> Any:
    """A body for `model`'s route: its fields absent, plausible or hostile; sometimes unknown fields; sometimes not
    an object at all."""
    if draw(st.integers(0, 19)) == 19:
        return draw(hostile)
    body: dict[str, Any] = {}
    for name in fields_of(model):
        choice = draw(st.integers(0, 9))
        if choice < 6 and name in PLAUSIBLE:
            body[name] = draw(PLAUSIBLE[name])
        elif choice == 9:
            body[name] = draw(hostile)
    if "max_tokens" not in body and model in (S.CompletionRequest, S.ChatCompletionRequest):
        body["max_tokens"] = 2  # keep generation short unless the fuzzer chose otherwise
    for _ in range(draw(st.integers(0, 2))):
        body[draw(st.text(max_size=10))] = draw(json_any)
    return body


ROUTES = [("/v1/completions", S.CompletionRequest), ("/v1/chat/completions", S.ChatCompletionRequest),
          ("/tokenize", S.TokenizeRequest), ("/detokenize", S.DetokenizeRequest)]  # fmt: skip


def check_response(r: Any) -> None:
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and set(error) == {"message", "type", "param", "code"}
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert "server_error" not in r.text, r.text[:500]
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text


def post(client: Any, path: str, body: Any) -> Any:
    raw = json.dumps(body, allow_nan=True)  # NaN / Infinity as a lenient client would send them
    raw = re.sub(r'"DEEP(\d+)DEEP"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), raw)
    return client.post(path, content=raw, headers={**AUTH, "Content-Type": "application/json"})


def check_healthy(client: Any) -> None:
    assert client.get("/health").status_code == 200
    r = post(client, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    from llamaforge.serve import server_state

    state = server_state(client.app)
    deadline = time.monotonic() + 20  # cancelled work leaves the engine on its next step
    while (state.engine.active or state.streams.open()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.engine.active == 0 and state.streams.open() == 0


@pytest.mark.parametrize("path,model", ROUTES, ids=[p for p, _ in ROUTES])
def test_fuzz_route(app_client: Any, path: str, model: type) -> None:
    FUZZ(given(bodies(model))(lambda body: check_response(post(app_client, path, body))))()
    check_healthy(app_client)


@st.composite
def slot_requests(draw: Any) -> tuple[str, Any]:
    slot = draw(st.one_of(st.integers(-2, 6).map(str), st.sampled_from(["x", "1e3", "99999999999999999999", "%2e%2e"])))
    action = draw(st.sampled_from(["save", "restore", "erase", "", "../x", "SAVE"]))
    return f"/slots/{slot}?action={action}", draw(bodies(S.SlotRequest))


def test_fuzz_slots_and_raw_requests(app_client: Any, tmp_path: Path) -> None:
    def one(request: tuple[str, Any]) -> None:
        check_response(post(app_client, *request))

    FUZZ(given(slot_requests())(one))()

    @st.composite
    def raw(draw: Any) -> tuple[str, str, bytes, str]:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
        path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                     "/health", "/metrics", "/v1/models", "/slots", "/", "/webui/../../etc/passwd",
                                     "/webui/%2e%2e/%2e%2e/pyproject.toml", "/nope", "/v1/completions/x"]))  # fmt: skip
        body = draw(st.one_of(st.binary(max_size=200), st.just(b"{"), st.just(b"\xff\xfe{}"), st.just(b"[]"),
                              st.just(b"null"), st.just(b'{"prompt": "\\ud800"}')))  # fmt: skip
        kind = draw(st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
        return method, path, body, kind

    def send(request: tuple[str, str, bytes, str]) -> None:
        method, path, body, kind = request
        r = app_client.request(method, path, content=body, headers={**AUTH, "Content-Type": kind})
        assert r.status_code < 500, f"{method} {path}: {r.status_code} {r.text[:300]}"
        if path.startswith("/webui/") or path == "/webui":
            assert "[project]" not in r.text and "root:" not in r.text

    FUZZ(given(raw())(send))()
    check_healthy(app_client)


@pytest.mark.slow
@pytest.mark.parametrize("path,model", ROUTES, ids=[p for p, _ in ROUTES])
def test_fuzz_route_long(app_client: Any, path: str, model: type) -> None:
    SLOW_FUZZ(given(bodies(model))(lambda body: check_response(post(app_client, path, body))))()
    check_healthy(app_client)


@pytest.mark.parametrize("body", [
    {"prompt": "\ud800", "echo": True, "max_tokens": 1},
    {"prompt": "a\ud800b", "echo": True, "max_tokens": 1, "stream": True},
    {"prompt": "\ud800", "echo": True, "max_tokens": 0, "logprobs": 2},
    {"model": "\ud800", "prompt": "x"},
])  # fmt: skip
def test_lone_surrogates_are_answered(app_client: Any, body: dict[str, Any]) -> None:
    """Found by the fuzzer: a lone surrogate echoed back (the prompt, the model name in an error) made a 500 or cut a
    stream short; it comes back as U+FFFD, as the tokenizer reads it."""
    r = post(app_client, "/v1/completions", body)
    check_response(r)
    assert "\ufffd" in r.text
