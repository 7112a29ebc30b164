"""Speculative decoding inside the engine (llamaforge/inference/speculative.py): prompt lookup and a draft model,
with continuous batching; greedy output identical to decoding without it."""

from __future__ import annotations

import pytest
import torch

from llamaforge.config import get_preset
from llamaforge.inference import DraftModel, Engine, PromptLookup, SamplingParams
from llamaforge.inference.speculative import _NgramIndex
from llamaforge.model import build_model

GREEDY = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(n: int, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    handles = [engine.add(p, sp) for p, sp in zip(prompts, params)]
    return [c.token_ids for c in engine.run(handles)]


def test_ngram_index_finds_the_latest_earlier_continuation():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    index = _NgramIndex(1, 3)
    index.extend(tokens)
    assert index.lookup(tokens, 4) == [7, 5, 1, 2]  # "1 2 3" last continued with 7 (position 7)
    assert index.lookup(tokens, 0) == []
    assert index.lookup([4, 4, 8], 2) == []  # nothing seen
    tokens += [7]
    index.extend(tokens)  # incremental
    assert index.lookup(tokens, 2) == [5, 1]


def test_prompt_lookup_keeps_greedy_output_with_continuous_batching(model):
    """Several requests join at different times; some speculate, one samples with penalties (no drafts); the
    greedy ones equal the engine without speculation, and drafts were accepted (random tiny models loop)."""
    prompts = _prompts(4)
    sampled = SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, repetition_penalty=1.2, ignore_eos=True)
    params = [GREEDY, GREEDY, sampled, GREEDY.replace(max_new_tokens=9)]
    plain = _run(Engine(model, max_batch=3, max_seq_len=256), prompts, params)
    spec = Engine(model, max_batch=3, max_seq_len=256, speculator=PromptLookup(4))
    assert _run(spec, prompts, params) == plain
    assert spec.stats["accepted"] > 10 and spec.stats["drafted"] >= spec.stats["accepted"]
    assert spec.cache.num_used == 0  # every block came back


@pytest.mark.parametrize("k", [1, 4])
def test_draft_model_keeps_greedy_output(model, k):
    prompts = _prompts(3)
    params = [GREEDY.replace(max_new_tokens=25)] * 3
    plain = _run(Engine(model, max_batch=2, max_seq_len=256), prompts, params)
    same = Engine(model, max_batch=2, max_seq_len=256, speculator=DraftModel(model, k))
    assert _run(same, prompts, params) == plain
    assert same.stats["accepted"] == same.stats["drafted"] > 0  # the target as its own draft: all accepted
    other = Engine(model, max_batch=2, max_seq_len=256, speculator=DraftModel(_model(5, n_layers=1), k))
    assert _run(other, prompts, params) == plain
    assert other.stats["drafted"] > other.stats["accepted"]


def test_speculative_steps_emit_several_tokens_and_respect_the_length(model):
    prompt = _prompts(1)[0]
    engine = Engine(model, max_batch=1, max_seq_len=256, speculator=DraftModel(model, 4))
    h = engine.add(prompt, GREEDY.replace(max_new_tokens=11))
    sizes = []
    while engine.has_work:
        sizes += [len(ev.token_ids) for ev in engine.step() if ev.handle == h]
    assert sum(sizes) == 11 and max(sizes) == 5  # four accepted drafts and the target's own token
    assert engine.result(h).finish_reason == "length"


def test_stop_tokens_inside_accepted_drafts_end_the_request(model):
    prompt = _prompts(1)[0]
    plain = Engine(model, max_batch=1, max_seq_len=256)
    free = _run(plain, [prompt], [GREEDY])[0]
    stop = free[7]
    spec = Engine(model, max_batch=1, max_seq_len=256, speculator=DraftModel(model, 4))
    out = spec.run([spec.add(prompt, GREEDY.replace(stop_token_ids=[stop]))])[0]
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"


def test_logprobs_of_verified_tokens_match_plain_decoding(model):
    prompt = _prompts(1)[0]
    params = GREEDY.replace(max_new_tokens=12, logprobs=2)
    engine = Engine(model, max_batch=1, max_seq_len=256)
    plain = engine.run([engine.add(prompt, params)])[0]
    spec = Engine(model, max_batch=1, max_seq_len=256, speculator=DraftModel(model, 3))
    got = spec.run([spec.add(prompt, params)])[0]
    assert got.token_ids == plain.token_ids
    for a, b in zip(got.logprobs, plain.logprobs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token_id for t in a.top] == [t.token_id for t in b.top]


def test_sampling_with_a_draft_keeps_the_target_distribution():
    """One verification step: the second token's frequencies match the target's distribution (Leviathan)."""
    target, draft = _model(0, vocab_size=8), _model(1, vocab_size=8)
    ids = [1, 2, 3]
    with torch.inference_mode():
        logits = target(torch.tensor([[*ids, 0]]))[0].float()
    engine = Engine(target, max_batch=1, max_seq_len=64, speculator=DraftModel(draft, 1))
    counts = torch.zeros(8)
    for seed in range(300):
        out = engine.run([engine.add(ids, SamplingParams(max_new_tokens=2, seed=seed))])[0]
        if out.token_ids[0] == 0:
            counts[out.token_ids[1]] += 1
    p = logits[-1].softmax(-1)
    total = counts.sum()
    assert total > 10
    assert (counts / total - p).abs().max() < 4 * (0.25 / total).sqrt() + 0.02


def test_a_draft_with_another_vocabulary_is_refused(model):
    with pytest.raises(ValueError, match="vocabulary"):
        DraftModel(_model(vocab_size=256), 4, vocab_size=512)
    with pytest.raises(ValueError, match=">= 1"):
        PromptLookup(0)
