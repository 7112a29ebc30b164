"""End-to-end tests of the OpenAI-compatible server: a real uvicorn server on 127.0.0.1, the `openai` client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from conftest import MODEL, run_server

openai = pytest.importorskip("openai")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# Basics ----------------------------------------------------------------------------------------------------
def test_health_models_and_metrics(server, client):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}  # no key needed
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = server.http().get("/metrics").text
    for name in (
        "llamaforge_requests_total",
        "llamaforge_time_to_first_token_seconds_bucket",
        "llamaforge_queue_depth",
        "llamaforge_slots_free",
        "llamaforge_generation_tokens_per_second",
    ):
        assert name in text


def test_completion_greedy_is_deterministic_and_counts_usage(client, server):
    before = server.metrics().get("llamaforge_generation_tokens_total", 0)
    a = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    b = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text
    assert a.object == "text_completion" and a.choices[0].finish_reason in ("length", "stop")
    with server.http() as h:
        n_prompt = h.post("/tokenize", json={"prompt": "Once upon a time"}).json()["count"]
    assert a.usage.prompt_tokens == n_prompt
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert 1 <= a.usage.completion_tokens <= 10
    assert server.metrics()["llamaforge_generation_tokens_total"] >= before + 2 * a.usage.completion_tokens


def test_chat_uses_the_models_template(client, server):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    with server.http() as h:
        tokens = h.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
        text = h.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert (
        text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert r.usage.prompt_tokens == len(tokens)


def test_tokenize_detokenize_roundtrip(server):
    with server.http() as h:
        ids = h.post("/tokenize", json={"model": MODEL, "prompt": "The quick brown fox"}).json()
        assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 256
        assert h.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "The quick brown fox"
        bad = h.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]


# Streaming --------------------------------------------------------------------------------------------------
def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=16, temperature=0.8, seed=7)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_streamed_chat_has_role_first_finish_last_and_done(server, client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    # The raw wire format: SSE data lines ending with [DONE].
    with server.http() as h:
        raw = h.post("/v1/chat/completions", json={**kw, "stream": True}).text
    events = [line for line in raw.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


# Sampling options ---------------------------------------------------------------------------------------------
def test_n_choices_are_independent_and_seeded(client):
    kw = dict(model=MODEL, prompt="The", max_tokens=12, temperature=1.0, seed=11, n=3, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3
    assert a.usage.completion_tokens == 36
    stream = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, n=2, stream=True, seed=1))
    assert {c.choices[0].index for c in stream} == {0, 1}


def test_seed_reproducibility(client):
    def run(seed):
        return (
            client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)


def test_stop_strings_cut_the_text(client):
    kw = dict(model=MODEL, prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(max_tokens=24, **kw).choices[0].text
    stop = text[6:9]
    cut = client.completions.create(max_tokens=24, stop=[stop, "\u00a7never"], **kw)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(max_tokens=24, stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_sampling_extras_and_logit_bias(client, server):
    r = client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=6,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2},
    )
    assert r.usage.completion_tokens >= 1
    with server.http() as h:
        token = h.post("/tokenize", json={"prompt": "The", "add_special_tokens": False}).json()["tokens"][0]
        expected = h.post("/detokenize", json={"tokens": [token] * 3}).json()["prompt"]
    forced = client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=3,
        temperature=0.9,
        seed=1,
        logit_bias={str(token): 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].text == expected


def test_max_tokens_is_capped_to_the_context(client):
    r = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=100_000, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 256


# Logprobs ------------------------------------------------------------------------------------------------------
def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_echo_logprobs_score_the_prompt_like_lm_eval(client, server):
    """lm-eval's local-completions sends token ids with echo=True, logprobs=1, max_tokens=1 (or 0)."""
    with server.http() as h:
        ids = h.post("/tokenize", json={"prompt": "The quick brown fox jumps"}).json()["tokens"]
    model = server.state.llm.model
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).float()[0], -1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    for max_tokens in (0, 1):
        r = client.completions.create(
            model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, echo=True, logprobs=1
        )
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
        assert r.choices[0].text.startswith("The quick brown fox jumps")
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=0, echo=True, logprobs=0)
    assert [len(c.logprobs.token_logprobs) for c in batch.choices] == [len(ids), 3]


# JSON mode -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [6, 60])
def test_json_mode_output_is_a_json_object(client, max_tokens):
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=max_tokens,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        if finish == "stop":
            assert isinstance(json.loads(content), dict)
        else:  # cut short by max_tokens, as OpenAI's JSON mode is: an unfinished object
            assert finish == "length" and content.startswith("{") and r.usage.completion_tokens == max_tokens


def test_json_mode_streams_and_works_for_completions(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}):
        chunks = client.completions.create(
            model=MODEL, prompt="JSON:", max_tokens=25, temperature=1.0, seed=5, stream=True,
            extra_body={"response_format": fmt},
        )  # fmt: skip
        text = "".join(c.choices[0].text for c in chunks)
        assert text.startswith("{")
        if fmt["type"] == "json_schema":
            assert isinstance(json.loads(text)["ok"], bool)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=CHAT, response_format={"type": "json_schema", "json_schema": {"name": "x"}}
        )
    assert e.value.body["param"] == "response_format"


# Errors ------------------------------------------------------------------------------------------------------
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_invalid_values_are_400_naming_the_param(server):
    with server.http() as h:
        for payload, param in [
            ({"prompt": "x", "temperature": 3}, "temperature"),
            ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
            ({"prompt": "x", "n": 0}, "n"),
            ({"prompt": {"a": 1}}, "prompt"),
            ({"max_tokens": 3}, "prompt"),
            ({"prompt": "x", "top_p": 0}, "top_p"),
            ({"prompt": "x", "logprobs": 99}, "logprobs"),
            ({"prompt": "x", "stop": [""]}, "stop"),
            ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ]:
            err = _error(h.post("/v1/completions", json=payload), 400)
            assert err["param"] == param, (payload, err)
            assert not any(word in json.dumps(err) for word in ("pydantic", "loc", "errors.pydantic.dev", "input"))
        err = _error(h.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
        assert err["param"] == "messages.0.role"
        err = _error(h.post("/v1/chat/completions", json={"messages": []}), 400)
        assert err["param"] == "messages"
        _error(h.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
        _error(h.post("/v1/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
        _error(h.get("/v1/nope"), 404)


def test_prompt_longer_than_the_context_is_400_before_streaming(client):
    long_prompt = "word " * 400
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=5, stream=stream)
        assert e.value.body["code"] == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": long_prompt}], stream=stream
            )


def test_wrong_or_missing_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    err = _error(httpx.post(server.base_url + "/v1/completions", json={"prompt": "x"}), 401)
    assert err["code"] == "invalid_api_key"
    _error(httpx.post(server.base_url + "/v1/completions", content=b"{bad", headers={"Authorization": "Bearer x"}), 401)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_body_size_limit_is_413(server):
    with server.http() as h:
        err = _error(h.post("/v1/completions", json={"prompt": "x" * (5 * 1024 * 1024)}), 413)
    assert "limit" in err["message"]


# Capacity, cancellation, shutdown ----------------------------------------------------------------------------------
def test_a_full_queue_answers_429_and_recovers(tiny_model_dir):
    with run_server(tiny_model_dir, max_batch=1, max_queue=1) as srv:
        client = srv.client()
        long = dict(model=MODEL, prompt="Hi", max_tokens=240, temperature=0, extra_body={"ignore_eos": True})
        stream = client.completions.create(stream=True, n=2, **long)  # one running, one queued: full
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert "capacity" in e.value.body["message"]
        assert srv.metrics()["llamaforge_requests_rejected_total"] >= 1
        stream.close()
        assert _wait_for(lambda: srv.metrics()["llamaforge_requests_active"] == 0)
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_client_disconnect_frees_the_slot_at_once(server, client, monkeypatch):
    from llamaforge.inference import Engine

    step = Engine.step

    def slow_step(self):  # 250 tiny-model tokens would otherwise be done before a busy client reads two
        time.sleep(0.01)
        return step(self)

    monkeypatch.setattr(Engine, "step", slow_step)
    stream = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=250, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    it = iter(stream)
    next(it), next(it)
    assert server.metrics()["llamaforge_requests_running"] >= 1
    stream.close()
    assert _wait_for(lambda: server.metrics()["llamaforge_requests_active"] == 0, timeout=10)
    m = server.metrics()
    assert m["llamaforge_requests_running"] == 0 and m["llamaforge_engine_tracked_requests"] == 0
    assert m['llamaforge_generations_finished_total{reason="cancelled"}'] >= 1


def test_non_streaming_client_that_leaves_is_cancelled(server):
    # A timeout well below the time 4 x 250 tokens take even on a fast machine (the tiny model decodes them
    # in ~0.3 s with the native kernels), so that the client leaves before the server is done.
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 250, "temperature": 0, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout), server.http(timeout=0.05) as h:
        h.post("/v1/completions", json=body)
    assert _wait_for(lambda: server.metrics()["llamaforge_requests_active"] == 0, timeout=10)


def test_health_is_503_while_loading(tiny_model_dir):
    import llamaforge

    release = threading.Event()

    def loader():
        release.wait(30)
        return llamaforge.load(tiny_model_dir)

    with run_server(loader=loader, wait_ready=False) as srv:
        r = httpx.get(srv.base_url + "/health")
        assert _error(r, 503)["code"] == "model_loading"
        assert (
            _error(httpx.post(srv.base_url + "/v1/completions", json={"prompt": "x"}), 503)["code"] == "model_loading"
        )
        release.set()
        assert _wait_for(lambda: httpx.get(srv.base_url + "/health").status_code == 200)
        assert srv.client().completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text is not None


def test_prefill_budget_splits_long_prompts_without_changing_the_text(tiny_model_dir, client):
    prompt = "A prompt of many more tokens than the budget of eight, " * 3
    want = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    with run_server(tiny_model_dir, max_batch=2, prefill_budget=8) as small:
        assert small.state.engine.engine.prefill_budget == 8
        got = small.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert got.choices[0].text == want
