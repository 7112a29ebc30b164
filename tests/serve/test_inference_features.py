"""The server on the inference core: prefix reuse across requests, speculative decoding with continuous batching,
prompt-cache slot actions, a warmed engine before /health, a full cache budget that queues (never 500)."""

from __future__ import annotations

import concurrent.futures
import threading

import httpx
import pytest
from conftest import MODEL, run_server

import llamaforge

SYSTEM = "You are a helpful assistant who answers questions about llamas and alpacas in great detail. " * 3


def _chat(client, question: str, max_tokens: int = 12) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    return r.choices[0].message.content


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return llamaforge.load(tiny_model_dir)


def test_a_shared_system_prompt_is_computed_once(llm):
    with run_server(llm=llm, max_batch=2) as srv, run_server(llm=llm, max_batch=2, prefix_caching=False) as cold:
        client, ref = srv.client(), cold.client()
        for question in ("How tall is a llama?", "What do alpacas eat?"):
            assert _chat(client, question) == _chat(ref, question)
        m = srv.metrics()
        assert m["llamaforge_prefix_cache_hit_tokens"] >= 64  # the second request reused the system prompt
        assert m["llamaforge_kv_cache_blocks_cached"] > 0
        assert cold.metrics()["llamaforge_prefix_cache_hit_tokens"] == 0


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_speculative_serving_keeps_the_greedy_text(llm, kind):
    questions = ["How tall is a llama?", "What do alpacas eat?", "Where do llamas live?"]
    options = {"speculative_ngram": True} if kind == "ngram" else {}
    with run_server(llm=llm, max_batch=3, max_seq_len=512) as plain:
        want = [_chat(plain.client(), q, 120) for q in questions]
    draft = llm if kind == "draft" else None
    with run_server(llm=llm, max_batch=3, max_seq_len=512, draft=draft, num_speculative=3, **options) as spec:
        client = spec.client()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # continuous batching: the requests overlap
            got = list(pool.map(lambda q: _chat(client, q, 120), questions))
        m = spec.metrics()
    assert got == want
    assert m["llamaforge_spec_draft_tokens"] > 0
    if kind == "draft":  # the model as its own draft: every draft token is accepted
        assert m["llamaforge_spec_accepted_tokens"] == m["llamaforge_spec_draft_tokens"]


def test_slots_save_restore_and_erase(llm, tmp_path):
    with run_server(llm=llm, max_batch=1, slot_save_path=str(tmp_path)) as srv:
        _chat(srv.client(), "How tall is a llama?")
        with srv.http() as h:
            assert h.get("/slots").json()[0]["n_tokens"] > 64
            saved = h.post("/slots/0?action=save", json={"filename": "llama.bin"}).json()
            assert saved["n_saved"] >= 64 and (tmp_path / "llama.bin").stat().st_size == saved["n_written"]
            assert h.post("/slots/0?action=erase").json()["n_erased"] > 64
    with run_server(llm=llm, max_batch=1, slot_save_path=str(tmp_path)) as fresh:
        with fresh.http() as h:
            restored = h.post("/slots/0?action=restore", json={"filename": "llama.bin"}).json()
        assert restored["n_restored"] == saved["n_saved"]
        _chat(fresh.client(), "What do alpacas eat?")
        assert fresh.metrics()["llamaforge_prefix_cache_hit_tokens"] >= 64  # the restored prefix was reused


def test_slot_errors_are_4xx_never_500(llm, tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a cache")
    with run_server(llm=llm, max_batch=1, slot_save_path=str(tmp_path)) as srv, srv.http() as h:
        cases = [
            ("/slots/0?action=save", {"filename": "../escape.bin"}, 400, "filename"),
            ("/slots/0?action=save", {}, 400, "filename"),
            ("/slots/0?action=fly", {"filename": "a.bin"}, 400, "action"),
            ("/slots/7?action=save", {"filename": "a.bin"}, 400, "id_slot"),
            ("/slots/0?action=save", {"filename": "a.bin"}, 400, "id_slot"),  # nothing cached yet
            ("/slots/0?action=restore", {"filename": "missing.bin"}, 404, "filename"),
            ("/slots/0?action=restore", {"filename": "junk.bin"}, 400, "filename"),
        ]
        for url, body, status, param in cases:
            r = h.post(url, json=body)
            assert r.status_code == status, (url, body, r.text)
            assert r.json()["error"]["param"] == param
    with run_server(llm=llm, max_batch=1) as srv, srv.http() as h:
        assert h.post("/slots/0?action=erase").status_code == 501  # disabled without --slot-save-path


def test_a_full_cache_budget_queues_requests(llm):
    per_token = llm.config.n_layers * llm.config.kv_heads * llm.config.dim_per_head * 2 * 4
    with run_server(llm=llm, max_batch=4, max_seq_len=128, cache_memory=130 * per_token) as srv:
        client = srv.client()
        prompts = [f"Request number {i} asks about llamas." for i in range(4)]

        def one(p: str) -> str:
            r = client.completions.create(model=MODEL, prompt=p, max_tokens=80, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
            return r.choices[0].finish_reason

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # room for one request at a time
            assert list(pool.map(one, prompts)) == ["length"] * 4
        assert srv.metrics()["llamaforge_kv_cache_blocks_used"] == 0


def test_health_waits_for_the_warm_engine(tiny_model_dir):
    """The engine (cache, step, kernels) is built and one request run before /health says ok."""
    release = threading.Event()
    seen: list[int] = []

    def loader():
        release.wait(30)
        return llamaforge.load(tiny_model_dir)

    with run_server(loader=loader, wait_ready=False) as srv:
        seen.append(httpx.get(srv.base_url + "/health").status_code)
        release.set()
        while srv.state.engine is None:
            seen.append(httpx.get(srv.base_url + "/health").status_code)
        engine = srv.state.engine.engine
        assert engine.stats["prompt_tokens"] >= 2  # warmed up with a request before serving
        assert httpx.get(srv.base_url + "/health").status_code == 200
    assert seen[0] == 503


def test_cache_memory_sizes_and_bad_serve_options(capsys):
    from llamaforge.cli import main
    from llamaforge.cli.serve import parse_size

    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MB") == 512 * 10**6 and parse_size("1048576") == 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    for args, message in ((["--cache-memory", "lots"], "--cache-memory: 'lots' is not a size"),
                          (["--speculative-ngram", "--draft-model", "x"], "choose one of"),
                          (["--num-speculative", "0"], "--num-speculative must be >= 1")):  # fmt: skip
        assert main(["serve", *args]) == 2
        assert message in capsys.readouterr().err
