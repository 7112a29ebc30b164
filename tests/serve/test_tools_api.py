"""The server's agent surface with the `openai` client: tool calls (whole and streamed), structured outputs,
grammar extensions, embeddings, and 400s that name the problem. The tiny model's ChatML template takes no
tools, so they reach it Hermes-style; forced calls make even a random model call correctly."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from conftest import API_KEY, MODEL, Running, make_tiny_model_dir, run_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER_PARAMS},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
UNIQUE = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The tiny model with a context long enough for a tool prompt in its small vocabulary."""
    directory = make_tiny_model_dir(tmp_path_factory.mktemp("tools") / "tiny-chat", max_seq_len=2048)
    with run_server(directory, api_key=API_KEY, max_batch=4, max_queue=16, max_seq_len=2048) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Running):
    return server.client()


def _sse(server, payload: dict) -> list[dict]:
    """The raw chunks of a streamed chat completion, as JSON (to check the wire format itself)."""
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# Tool calls ---------------------------------------------------------------------------------------------------
def test_named_tool_choice_forces_a_valid_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                           temperature=1.0, seed=seed, max_tokens=200)  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


def test_required_tool_choice_without_parallel_calls_makes_one(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=200)  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")


def test_streamed_tool_calls_arrive_as_openai_sends_them(server, client):
    payload = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "temperature": 0,
               "max_tokens": 200}  # fmt: skip
    whole = client.chat.completions.create(**payload).choices[0].message.tool_calls[0]
    chunks = _sse(server, payload)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    head, *fragments = calls
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert len(fragments) > 1 and all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"}
                                      for f in fragments)  # fmt: skip
    assert "".join(f["function"]["arguments"] for f in fragments) == whole.function.arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # and the openai client puts it back together
    stream = client.chat.completions.create(**payload, stream=True)
    args, name = "", None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
    assert (name, args) == ("get_weather", whole.function.arguments)


def test_a_conversation_with_tool_results(client, server):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                           temperature=0, max_tokens=200).choices[0].message  # fmt: skip
    call = first.tool_calls[0]
    history = [*ASK, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5,
                                       temperature=0)  # fmt: skip
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    with server.http() as h:
        prompt = h.post("/tokenize", json={"messages": history}).json()
        text = h.post("/detokenize", json={"tokens": prompt["tokens"]}).json()["prompt"]
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in text
    assert '<tool_response>\n{"forecast": "sunny"}\n</tool_response>' in text


def test_tool_choice_none_leaves_the_tools_out_and_auto_shows_them(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1)
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=1)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens


# Structured outputs and grammars ----------------------------------------------------------------------------------
def test_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: Literal["Paris", "Oslo"]
        sunny: bool
        days: int = Field(ge=1, le=5)

    for seed in range(3):
        r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast, temperature=1.0,
                                          seed=seed, max_tokens=200)  # fmt: skip
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Forecast) and 1 <= parsed.days <= 5


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_regex": "[A-Z][a-z]{2} [0-9]{2}"}, lambda s: len(s) == 6 and s[0].isupper() and s[4:].isdigit()),
        ({"guided_choice": ["yes", "no"]}, lambda s: s in ("yes", "no")),
        ({"grammar": 'root ::= "(" ("a" | "b")+ ")"'}, lambda s: s[0] + s[-1] == "()" and set(s[1:-1]) <= {"a", "b"}),
        ({"guided_grammar": 'start: "x" DIGIT\nDIGIT: /[0-9]/'}, lambda s: len(s) == 2 and s[0] == "x"),
        ({"guided_json": {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"],
                          "additionalProperties": False}},
         lambda s: json.loads(s)["n"] in (1, 2)),
    ],
)  # fmt: skip
def test_grammar_extensions(client, extra, check):
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=1.0, seed=seed,
                                           extra_body=extra)  # fmt: skip
        assert r.choices[0].finish_reason == "stop" and check(r.choices[0].message.content), r.choices[0].message
    c = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, extra_body=extra, temperature=0)
    assert check(c.choices[0].text)


# Bad input ---------------------------------------------------------------------------------------------------------
def _error(server, payload: dict, path: str = "/v1/chat/completions") -> dict:
    with server.http() as h:
        r = h.post(path, json={"model": MODEL, **payload})
    assert r.status_code == 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize(
    ("payload", "param", "words"),
    [
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name", "duplicate function name 'get_weather'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice",
         "'fly', which is not in 'tools'"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'auto', 'none', 'required'"),
        ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]},
         "messages.1.tool_call_id", "'call_nope' does not match a tool call"),
        ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                                   "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages.1.tool_calls.0.function.arguments", "not valid JSON"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": UNIQUE}}], "tool_choice": "required"},
         "tool_choice", '"uniqueItems"'),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                          "not": {}}}}},
         "response_format", 'unsupported JSON schema keyword.*"not"'),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
         "response_format", "Invalid type: strng"),
        ({"grammar": 'root ::= "a" ('}, "grammar", r"does not parse: Expected '\)' at line 1"),
        ({"guided_grammar": "start: a"}, "guided_grammar", r'at 1\(8\): unknown name: "a"'),
        ({"guided_regex": "a(", "guided_choice": ["a"]}, "guided_choice", "at most one output constraint"),
        ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice",
         "at most one output constraint"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_problem(server, payload, param, words):
    import re

    err = _error(server, {"messages": ASK, **payload})
    assert err["param"] == param and re.search(words, err["message"]), err


# Embeddings ------------------------------------------------------------------------------------------------------
def test_embeddings_with_the_openai_client(client, server):
    texts = ["The quick brown fox.", "Hello, how are you today?"]
    r = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    vectors = torch.tensor([d.embedding for d in r.data])
    llm = server.state.llm
    torch.testing.assert_close(vectors, llm.embed(texts), atol=1e-5, rtol=1e-4)
    assert [d.index for d in r.data] == [0, 1] and vectors.shape[1] == llm.config.dim
    with server.http() as h:
        n = sum(h.post("/tokenize", json={"prompt": t}).json()["count"] for t in texts)
        plain = h.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "float"}).json()
        ids = h.post("/tokenize", json={"prompt": texts[0]}).json()["tokens"]
        by_ids = h.post("/v1/embeddings", json={"input": ids, "encoding_format": "float"}).json()
        last = h.post("/v1/embeddings", json={"input": texts[0], "pooling": "last", "encoding_format": "float"}).json()
    assert r.usage.prompt_tokens == r.usage.total_tokens == n
    assert plain["object"] == "list" and plain["data"][0]["object"] == "embedding"
    torch.testing.assert_close(torch.tensor(plain["data"][0]["embedding"]), vectors[0], atol=1e-5, rtol=1e-4)
    assert by_ids["data"][0]["embedding"] == plain["data"][0]["embedding"]
    torch.testing.assert_close(torch.tensor(last["data"][0]["embedding"]), llm.embed(texts[0], pooling="last")[0],
                               atol=1e-5, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "param", "words"),
    [
        ({"input": "x", "dimensions": 8}, "dimensions", "dimensions=8 is not supported: this model's embeddings have"),
        ({"input": []}, "input", "empty"),
        ({"input": [""]}, "input", "empty string"),
        ({"input": [10**7]}, "input", "outside the vocabulary"),
        ({"input": "word " * 2100}, "input", "more than this model's context"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format", "float"),
    ],
)
def test_bad_embedding_requests(server, payload, param, words):
    err = _error(server, payload, "/v1/embeddings")
    assert err["param"] == param and words in err["message"], err


def test_embeddings_share_the_engine_with_generation(client, server):
    import threading

    done = []
    worker = threading.Thread(target=lambda: done.append(client.completions.create(model=MODEL, prompt="Once",
                                                                                  max_tokens=30)))  # fmt: skip
    worker.start()
    for _ in range(3):
        assert len(client.embeddings.create(model=MODEL, input=["a b c"] * 5).data) == 5
    worker.join(timeout=60)
    assert done and done[0].choices[0].text is not None
    assert httpx.get(server.base_url + "/health").status_code == 200
