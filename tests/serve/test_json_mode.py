"""The JSON-prefix automaton and the JSON-mode logits processor, checked against Python's json module."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llamaforge.serve.json_mode import START_STATE, JsonObjectProcessor, JsonVocab, advance, closing, is_complete

VALID = [
    "{}",
    '{ "a" : 1 } ',
    '{"a": [1, -2.5e+3, 0, 0.0, 1E-2, true, false, null, "x\\"y\\\\\\n\\u00e9", {}], "b": {"c": []}}',
    '{"k\\u12aF": "caf\u00e9 \u2603", "n": -0, "e": 12e5}',
    '{\n  "nested": {"deep": [[[{"x": "y"}]]]},\n  "s": ""\n}',
]
INVALID = ['{"a":01}', '{"a" 1}', "{,}", "[1]", '"s"', '{"a":1,}', '{"a":"\x01"}', '{"a":tru}x', "{}}", '{"a":.5}',
           '{"a":1.}', '{"a":-}', "{'a':1}", '{"a":"\\x"}', '{"a":1e}', "{} {}"]  # fmt: skip


@pytest.mark.parametrize("doc", VALID)
def test_every_prefix_of_a_valid_object_is_accepted_and_closable(doc):
    assert isinstance(json.loads(doc), dict)
    state = START_STATE
    for i, ch in enumerate(doc):
        if doc[i:].strip() == "" and is_complete(state):
            break
        state = advance(state, ch)
        assert state is not None, (doc, i)
        completed = doc[: i + 1] + closing(state)
        assert isinstance(json.loads(completed), dict), completed
    assert is_complete(state) and closing(state) == ""


@pytest.mark.parametrize("doc", INVALID)
def test_invalid_documents_are_rejected(doc):
    state = advance(START_STATE, doc)
    assert state is None or not is_complete(state)


def test_random_mutations_agree_with_the_json_module():
    rng = random.Random(0)
    alphabet = [*'{}[]":,0123456789.-+eE truefalsn\\u"x ', "\n", "\x01", "\u00e9"]
    checked = 0
    for _ in range(3000):
        doc = list(rng.choice(VALID))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(doc) + 1)
            op = rng.random()
            if op < 0.4 and doc:
                del doc[min(i, len(doc) - 1)]
            elif op < 0.8:
                doc.insert(i, rng.choice(alphabet))
            elif doc:
                doc[min(i, len(doc) - 1)] = rng.choice(alphabet)
        text = "".join(doc).strip()
        try:
            parsed = json.loads(text)
            ok = isinstance(parsed, dict)
        except ValueError:
            ok = False
        state = advance(START_STATE, text)
        assert (state is not None and is_complete(state)) == ok, text
        checked += ok
    assert checked > 100  # the fuzzing produced valid documents too


def _toy_vocab() -> JsonVocab:
    multi = [
        '{"',
        '":',
        '","',
        "true",
        "null",
        "false",
        '"}',
        "}}",
        "]}",
        '{"a":',
        " {",
        "abc",
        "\ufffd",
        "\ufffd\ufffd",
        '\\"',
        "\\u00",
        "0.5",
        "1e9",
        ", ",
        "\x01",
    ]
    pieces = [*'{}[]":,0123456789.-+eE \n\tabcxyz\\', *multi]
    pieces.append("")  # a special token (no text)
    texts = [*pieces, "<eos>"]
    vocab = JsonVocab(texts, stop_ids=[len(texts) - 1], vocab_size=len(texts))
    vocab.texts[-1] = ""
    return vocab


@pytest.mark.parametrize("budget", [2, 3, 5, 8, 20, 60])
def test_processor_always_yields_a_closed_object_within_the_budget(budget):
    vocab = _toy_vocab()
    eos = vocab.stop_ids[0]
    gen = torch.Generator().manual_seed(budget)
    for _ in range(20):
        proc = JsonObjectProcessor(vocab, budget)
        out: list[int] = []
        while len(out) < budget:
            logits = proc(out, torch.randn(vocab.vocab_size, generator=gen) * 3)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            out.append(token)
            if token == eos:
                break
        text = "".join(vocab.texts[t] for t in out if t != eos)
        assert isinstance(json.loads(text), dict), (budget, text)
        assert len(out) <= budget


def test_vocab_from_a_real_tokenizer_keeps_leading_spaces(tiny_model_dir):
    from llamaforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    vocab = JsonVocab.from_tokenizer(tok, tok.vocab_size)
    ids = tok.encode('{"name": "llama", "ok": true}')
    assert "".join(vocab.texts[i] for i in ids) == '{"name": "llama", "ok": true}'
    assert all(vocab.texts[i] == "" for i in tok.special_tokens.values())
    assert vocab.stop_ids == sorted(tok.stop_ids)
