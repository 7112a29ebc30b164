"""Constrained decoding with llguidance: every tokenizer kind, every constraint kind, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from llamaforge.constrain import Constrainer, GrammarError, constraint_processor, grammar_from, unpack_bitmask
from llamaforge.tokenizer import load_tokenizer
from llamaforge.tools import ToolCallParser, call_grammar, parse_tools

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
CONSTRAINTS = [
    ({"json_schema": SCHEMA}, lambda s: jsonschema.validate(json.loads(s), SCHEMA) is None),
    ({"regex": r"[A-Z]{2}-[0-9]{3}"}, lambda s: re.fullmatch(r"[A-Z]{2}-[0-9]{3}", s)),
    ({"choice": ["yes", "no", "maybe so"]}, lambda s: s in ("yes", "no", "maybe so")),
    ({"grammar": 'root ::= "(" [a-c]{1,4} ")" ("," " " [0-9])?'}, lambda s: re.fullmatch(r"\([a-c]{1,4}\)(, \d)?", s)),
    ({"grammar": 'start: "x=" NUM\nNUM: /[1-9][0-9]?/'}, lambda s: re.fullmatch(r"x=[1-9][0-9]?", s)),
]


@pytest.fixture(scope="module", params=["huggingface", "tiktoken", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "huggingface":
        return load_tokenizer(request.getfixturevalue("smollm2_gguf"))
    if request.param == "tiktoken":
        llama_models = pytest.importorskip("llama_models")
        return load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    from test_tokenizer import train_sentencepiece

    return load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("sp")))


def _sample(tokenizer, processor, seed: int, vocab: int, steps: int = 300) -> str:
    """Draw from random logits through the processor until a stop token: what any model would be held to."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(steps):
        logits = processor(out, torch.randn(vocab, generator=gen) * 3)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if token in tokenizer.stop_ids:
            return tokenizer.decode(out)
        out.append(token)
    raise AssertionError(f"no stop token after {steps} tokens: {tokenizer.decode(out)!r}")


@pytest.mark.parametrize(("constraint", "check"), CONSTRAINTS)
def test_every_sample_obeys_the_constraint(tokenizer, constraint: dict, check) -> None:
    vocab = tokenizer.vocab_size + 5  # models often pad the embedding past the tokenizer
    for seed in range(4):
        text = _sample(tokenizer, constraint_processor(tokenizer, vocab, **constraint), seed, vocab)
        assert check(text), (constraint, text)


def test_json_object_admits_any_object_and_nothing_else(tokenizer) -> None:
    vocab = tokenizer.vocab_size
    for text, ok in [('{"a": [1, 2.5, "x"], "b": {"c": null}}', True), ("[1, 2]", False), ('{"a" 1}', False)]:
        processor = constraint_processor(tokenizer, vocab, json_object=True)
        ids = tokenizer.encode(text)
        if tokenizer.kind == "sentencepiece" and tokenizer.id_to_piece(ids[0]) == "\u2581":
            ids = ids[1:]  # the dummy-prefix space that starts a SentencePiece text, not part of an answer
        allowed = [bool(torch.isfinite(processor(ids[:i], torch.zeros(vocab))[t])) for i, t in enumerate(ids)]
        assert all(allowed) == ok, (text, allowed)
        if ok:
            end = processor(ids, torch.zeros(vocab))
            assert set(torch.isfinite(end).nonzero().flatten().tolist()) == set(tokenizer.stop_ids)


@pytest.mark.parametrize("syntax", ["json", "hermes", "pythonic"])
def test_forced_calls_parse_and_follow_the_schema(tokenizer, syntax: str) -> None:
    params = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "days": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["city"],
    }
    tools = parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": params}},
                         {"type": "function", "function": {"name": "get_time"}}])  # fmt: skip
    grammar = call_grammar(tools, ["get_weather", "get_time"], syntax, parallel=syntax != "json")
    constrainer = Constrainer.for_tokenizer(tokenizer, tokenizer.vocab_size)
    for seed in range(4):
        text = _sample(tokenizer, constrainer.processor(grammar), seed, tokenizer.vocab_size)
        content, calls = ToolCallParser(tools).parse(text)
        assert calls and content is None, text
        for call in calls:
            if call.name == "get_weather":
                jsonschema.validate(call.args, params)
                assert set(call.args) <= {"city", "days"}  # the arguments are the parameters, nothing else
            else:
                assert call.args == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"json_schema": {"type": "array", "uniqueItems": True}}, r'unsupported JSON schema keyword.*"uniqueItems"'),
        ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "Invalid type: strin"),
        ({"json_schema": '{"type": '}, "not valid JSON"),
        ({"json_schema": [1]}, "must be an object"),
        ({"regex": "a(b"}, "unclosed group"),
        ({"grammar": 'root ::= "a" ('}, r"does not parse: Expected '\)' at line 1"),
        ({"grammar": "root ::= undefined_rule"}, "undefined_rule"),
        ({"grammar": 'start: a b\na: "x"'}, r'at 1\(8\): unknown name: "b"'),
        ({"grammar": "   "}, "non-empty"),
        ({"choice": []}, "non-empty list"),
        ({"choice": "yes"}, "non-empty list"),
        ({}, "exactly one constraint, got none"),
        ({"regex": "a", "choice": ["a"]}, "exactly one constraint, got regex, choice"),
    ],
)
def test_bad_constraints_say_what_is_wrong(smollm2_gguf: Path, kwargs: dict, message: str) -> None:
    tok = load_tokenizer(smollm2_gguf)
    with pytest.raises(GrammarError, match=message):
        constraint_processor(tok, tok.vocab_size, param="response_format", **kwargs)


def test_compiled_grammars_are_cached_and_requests_start_fresh(smollm2_gguf: Path) -> None:
    tok = load_tokenizer(smollm2_gguf)
    constrainer = Constrainer.for_tokenizer(tok, tok.vocab_size)
    assert Constrainer.for_tokenizer(tok, tok.vocab_size) is constrainer
    grammar = grammar_from(choice=["alpha", "beta"])
    first, second = constrainer.processor(grammar), constrainer.processor(grammar)
    assert list(constrainer._compiled).count(grammar) == 1 and first.matcher is not second.matcher
    logits = torch.zeros(tok.vocab_size)
    alpha = tok.encode("alpha")
    first(alpha, logits)  # one request finishing does not move the other
    assert first.accepting() and not second.accepting()
    done = first(alpha, logits)
    assert set(torch.isfinite(done).nonzero().flatten().tolist()) == set(tok.stop_ids)


def test_unpack_bitmask_matches_the_bits() -> None:
    words = torch.tensor([[0b1011, -1, 0]], dtype=torch.int32)
    mask = unpack_bitmask(words, 70, torch.device("cpu"))[0]
    assert mask[:4].tolist() == [True, True, False, True] and not mask[4:32].any()
    assert mask[32:64].all() and not mask[64:].any() and mask.shape == (70,)


def test_a_matcher_in_error_leaves_only_the_stop_tokens(smollm2_gguf: Path) -> None:
    tok = load_tokenizer(smollm2_gguf)
    processor = constraint_processor(tok, tok.vocab_size, choice=["yes"])
    out = processor(tok.encode("no"), torch.zeros(tok.vocab_size))  # a token the mask would never have allowed
    assert processor.error and set(torch.isfinite(out).nonzero().flatten().tolist()) == set(tok.stop_ids)


def test_batched_masks_equal_one_row_at_a_time(smollm2_gguf: Path) -> None:
    from llamaforge.constrain import GrammarProcessor

    tok = load_tokenizer(smollm2_gguf)
    constrainer = Constrainer.for_tokenizer(tok, tok.vocab_size)
    grammars = [grammar_from(json_object=True), grammar_from(regex="[0-9]+"), grammar_from(choice=["yes", "no"])]
    outputs = [tok.encode('{"a": '), tok.encode("12"), []]
    logits = torch.randn(4, tok.vocab_size + 3)
    items = [(r, constrainer.processor(g), ids) for r, g, ids in zip((0, 2, 3), grammars, outputs)]
    batched = GrammarProcessor.apply_batch(items, logits.clone())
    for r, g, ids in zip((0, 2, 3), grammars, outputs):
        torch.testing.assert_close(batched[r], constrainer.processor(g)(ids, logits[r]))
    torch.testing.assert_close(batched[1], logits[1])  # an unconstrained row is left alone
