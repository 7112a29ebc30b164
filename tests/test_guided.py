"""The Python API's guided generation: output constraints as generate() options, chat with tools."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from llamaforge.config import get_preset
from llamaforge.constrain import Constrainer, GrammarError, grammar_from
from llamaforge.inference import DraftModel, Engine, SamplingParams, prompt_ids
from llamaforge.llm import LLM
from llamaforge.model import build_model
from llamaforge.tokenizer import load_tokenizer
from llamaforge.tools import Delta, ToolError

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def llm(smollm2_gguf: Path) -> LLM:
    """A random tiny model on SmolLM2's real vocabulary and chat template (which takes no tools)."""
    tok = load_tokenizer(smollm2_gguf)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=1024)).eval()
    return LLM(model, tok, model.config)


def test_generate_with_a_schema_batched(llm: LLM) -> None:
    prompts = ["Is the sky blue?", "Is fire cold?", "Answer in JSON:"]
    results = llm.generate(prompts, json_schema=SCHEMA, max_new_tokens=40, temperature=1.0, seed=3)
    for r in results:
        assert r.finish_reason == "stop"
        jsonschema.validate(json.loads(r.text), SCHEMA)


def test_stream_and_generate_take_every_constraint(llm: LLM) -> None:
    text = "".join(llm.stream("Code:", regex=r"[A-Z]{3}-[0-9]{2}", temperature=1.0, seed=1, max_new_tokens=20))
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", text)
    assert llm.generate("Pick:", choice=["red", "green"], temperature=1.0, seed=2).text in ("red", "green")
    out = llm.generate("Say:", grammar='root ::= "a" "b"{1,3}', temperature=1.0, seed=4, max_new_tokens=10)
    assert re.fullmatch("ab{1,3}", out.text)
    assert llm.generate("x", json_object=True, max_new_tokens=30, temperature=0).text.startswith("{")


def test_chat_with_a_forced_tool_returns_the_call(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Weather in Lima?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    result = llm.chat(messages, tools=[WEATHER], tool_choice=named, temperature=0, max_new_tokens=120)
    assert result.finish_reason == "tool_calls" and result.text == ""
    (call,) = result.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(call.args, WEATHER["function"]["parameters"])
    deltas = list(llm.chat(messages, tools=[WEATHER], tool_choice=named, temperature=0, max_new_tokens=120,
                           stream=True))  # fmt: skip
    assert all(isinstance(d, Delta) for d in deltas)
    assert deltas[0].name == "get_weather" and "".join(d.arguments or "" for d in deltas) == call.arguments
    free = llm.chat(messages, tools=[WEATHER], tool_choice="none", temperature=0, max_new_tokens=5)
    assert free.tool_calls is None and free.finish_reason in ("stop", "length")


def test_bad_guidance_fails_before_generating(llm: LLM) -> None:
    with pytest.raises(GrammarError, match="uniqueItems"):
        llm.generate("x", json_schema={"type": "array", "uniqueItems": True})
    with pytest.raises(GrammarError, match="exactly one constraint"):
        llm.generate("x", regex="a", choice=["a"])
    with pytest.raises(ToolError, match="'fly', which is not in 'tools'"):
        llm.chat([{"role": "user", "content": "x"}], tools=[WEATHER], tool_choice={"function": {"name": "fly"}})
    # a constrained request is not speculated on: the draft's tokens would skip the grammar's masks
    assert re.fullmatch("[ab]+", llm.generate("x", regex="[ab]+", speculative="ngram", max_new_tokens=8).text)


def test_a_constrained_request_in_a_batch_with_prefix_reuse_and_speculation(llm: LLM) -> None:
    """The constraint is one request's logits processor inside the shared engine: it reuses a cached prompt prefix,
    is not speculated on, and leaves its neighbours' greedy tokens and drafts as they are without it."""
    tok = llm.tokenizer
    prefix = prompt_ids(tok, "System: answer in order. " + "one two three four five six seven eight. " * 4)
    prompts = [prefix + tok.encode(q) for q in ("Count on:", "A code:", "Again, count:")]
    greedy = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    pattern = r"[A-Z]{3}-[0-9]{2}"
    grammar = grammar_from(regex=pattern)
    constrainer = Constrainer.for_tokenizer(tok, llm.config.vocab_size)

    def run(engine: Engine) -> list:
        engine.run([engine.add(prompts[0], greedy)])  # the shared prefix is now in the cache
        coded = SamplingParams(max_new_tokens=20, temperature=0, logits_processors=[constrainer.processor(grammar)])
        handles = [engine.add(prompts[0], greedy), engine.add(prompts[1], coded), engine.add(prompts[2], greedy)]
        return engine.run(handles)

    plain = run(Engine(llm, max_batch=3, max_seq_len=512))
    engine = Engine(llm, max_batch=3, max_seq_len=512, speculator=DraftModel(llm, 3))  # itself: drafts are right
    spec = run(engine)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert re.fullmatch(pattern, spec[1].text) and spec[1].finish_reason == "stop"
    assert spec[1].cached_tokens >= 16 and spec[2].cached_tokens >= 16  # full blocks of the shared prefix
    # the greedy rows were speculated on (the draft is the model itself: every draft token is accepted)
    assert engine.stats["accepted"] >= 2 * 30 and engine.stats["drafted"] == engine.stats["accepted"]
    assert engine.cache.num_used == 0
