"""Fill in the middle through the server: OpenAI's ``suffix`` on /v1/completions (plain and streamed) and
llama-server's ``POST /infill``, equal to ``llm.infill``; requests the model or the route cannot serve get a 400."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import MODEL, Running, make_tiny_model_dir, run_server

import llamaforge

openai = pytest.importorskip("openai")

FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
PREFIX, SUFFIX = "def f(x):\n    ", "\n    return y\n"


@pytest.fixture(scope="module")
def fim_llm(tmp_path_factory: pytest.TempPathFactory):
    directory = make_tiny_model_dir(tmp_path_factory.mktemp("fim") / "m", seed=3, extra_special=FIM)
    return llamaforge.load(directory)


@pytest.fixture(scope="module")
def fim_server(fim_llm) -> Iterator[Running]:
    with run_server(llm=fim_llm, max_batch=4) as running:
        yield running


def test_completions_suffix_equals_llm_infill(fim_server: Running, fim_llm) -> None:
    want = fim_llm.infill(PREFIX, SUFFIX, max_new_tokens=8, temperature=0)
    ids = fim_llm.tokenizer.encode_infill(PREFIX, SUFFIX)
    assert ids[0] == fim_llm.tokenizer.token_id(FIM[0]) and ids[-1] == fim_llm.tokenizer.token_id(FIM[2])
    client = fim_server.client()
    got = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text and got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    streamed = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_infill_route_equals_llm_infill(fim_server: Running, fim_llm) -> None:
    want = fim_llm.infill(PREFIX, SUFFIX, max_new_tokens=8, temperature=0)
    with fim_server.http() as h:
        r = h.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 8,
                                    "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["content"] == want.text and body["tokens"] == want.token_ids and body["stop"] is True
        assert body["tokens_evaluated"] == len(fim_llm.tokenizer.encode_infill(PREFIX, SUFFIX))
        assert body["stop_type"] == ("limit" if want.finish_reason == "length" else "eos")
        # `prompt`: the start of the middle, already written, continues the prompt after <|fim_middle|>.
        start = fim_llm.tokenizer.encode("retur")
        ids = fim_llm.tokenizer.encode_infill(PREFIX, SUFFIX) + start
        cont = fim_llm.generate(ids, max_new_tokens=4, temperature=0)
        r = h.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "retur",
                                    "n_predict": 4, "temperature": 0})  # fmt: skip
        assert r.status_code == 200 and r.json()["content"] == cont.text


def test_infill_errors(fim_server: Running, server: Running) -> None:
    client = fim_server.client()
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt="a", suffix="b", echo=True, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="text prompt"):
        client.completions.create(model=MODEL, prompt=[1, 2, 3], suffix="b", max_tokens=2)
    with fim_server.http() as h:
        refused = [({"input_extra": [{"filename": "a.py", "text": "x"}]}, "input_extra"), ({"stream": True}, "stream"),
                   ({"n": 2}, "n"), ({"n_predict": 0}, "n_predict")]  # fmt: skip
        for extra, param in refused:
            r = h.post("/infill", json={"input_prefix": "a", "input_suffix": "b", **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # The chat fixture's vocabulary has no infilling tokens: a clear 400, never a 500.
    with pytest.raises(openai.BadRequestError, match="fill-in-the-middle"):
        server.client().completions.create(model=MODEL, prompt="a", suffix="b", max_tokens=2)
    with server.http() as h:
        r = h.post("/infill", json={"input_prefix": "a", "input_suffix": "b"})
        assert r.status_code == 400 and "fill-in-the-middle" in r.json()["error"]["message"]
