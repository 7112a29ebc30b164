"""benchmarks/bench_soak.py's clients and report against the in-process tiny server: every kind of request in the
mix gets the outcome it expects (so a soak run's "unexpected" count means the server misbehaved), the engine is
idle afterwards, and the per-minute table and the summary are built from what the clients saw."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path

import httpx
import pytest
from conftest import run_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_soak as bs


def _args(**kw) -> argparse.Namespace:
    base = dict(ctx=256, max_tokens=12, max_batch=2, warmup=1.0, seed=0, threads=1, drain_tokens=8, drain_timeout=30)
    return argparse.Namespace(**{**base, **kw})


def test_every_kind_of_request_gets_its_expected_outcome(tiny_model_dir):
    args = _args()
    with run_server(tiny_model_dir, model_name=bs.MODEL, max_batch=2, max_queue=8) as srv:
        ids = sorted(set(srv.state.llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)))
        soak = bs.Soak(args, srv.base_url, ids)

        async def go() -> dict[str, float]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
                rng = random.Random(0)
                for kind in bs.MIX:
                    for _ in range(len(soak.bad) if kind == "bad" else 2):  # every bad request once
                        soak.outcomes.append(await soak.one(client, rng, kind))
                idle = await bs.wait_idle(client, timeout=10)
                rss = await soak.quiet(client, os.getpid())  # the in-process server's memory: this process's
                return idle, rss

        idle, rss = asyncio.run(go())
    assert 0 < rss < 64 << 30 and soak.gate.is_set() and soak.busy == 0
    wrong = [o for o in soak.outcomes if o.outcome not in bs.EXPECTED]
    assert not wrong, wrong
    by_kind = {o.kind: o.outcome for o in soak.outcomes}
    assert by_kind["bad"] == "rejected_as_expected" and by_kind["cancel_mid"] == "cancelled_mid"
    assert by_kind["chat_stream"] == "ok" and by_kind["long_prompt"] == "ok"
    assert all(o.ttft is not None for o in soak.outcomes if o.kind in ("chat_stream", "completion_stream"))
    assert idle["llamaforge_requests_active"] == 0 and idle["llamaforge_kv_cache_blocks_used"] == 0

    samples = [(t, 100 << 20, 1.0) for t in range(0, 180, 2)]
    for o in soak.outcomes:  # spread over three minutes for the table
        o.start = (soak.outcomes.index(o) * 7) % 179
        o.end = o.start + 0.5
    drained = {"requests": 4, "in_flight_at_sigterm": 4, "completed": 4, "lost": [], "late_request": "refused",
               "exit_code": 0, "drain_seconds": 1.0, "ok": True}  # fmt: skip
    idle_rss = ((60.0, 100 << 20), (181.0, 100 << 20))
    s = bs.summarize(args, Path("m.gguf"), soak, samples, 180.0, idle, idle_rss, drained, [], (1, 1, 1), (1, 1, 1))
    assert [r["minute"] for r in s["minutes"]] == [1, 2, 3]
    assert sum(r["requests"] for r in s["minutes"]) == len(soak.outcomes)
    assert s["rss_mib"]["growth_pct"] == 0 and all(s["checks"].values())
    text = bs.report(s)
    assert text.startswith("## Serving: soak") and "| 3 |" in text and "RSS growth < 1%: met" in text


def test_a_wrong_answer_is_unexpected():
    ok = httpx.Response(200, json={"error": {"message": "x"}})
    with pytest.raises(bs.UnexpectedError) as e:
        bs._check_error_body(ok, 400)
    assert e.value.outcome == "wrong_status"
    with pytest.raises(bs.UnexpectedError) as e:
        bs._check_error_body(httpx.Response(500, json={"error": {"message": "boom"}}), 400)
    assert e.value.outcome == "server_error"
    with pytest.raises(bs.UnexpectedError) as e:
        bs._check_error_body(httpx.Response(400, text="plain"), 400)
    assert e.value.outcome == "bad_error_body"
    with pytest.raises(bs.UnexpectedError) as e:
        bs._check_complete("cancelled", 3, 8, "x")
    assert e.value.outcome == "incomplete"
