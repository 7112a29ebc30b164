"""Batched log-likelihood scoring: the prefix-reuse path, the plain path and a one-request-at-a-time reference."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from llamaforge.config import get_preset
from llamaforge.evaluate.scoring import Scorer, encode_pair
from llamaforge.model import build_model


def reference_score(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Log-likelihood from one full causal forward pass of context + continuation, no batching, no cache."""
    seq = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = F.log_softmax(model(seq)[0].double(), dim=-1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    lp = sum(float(logp[p, t]) for p, t in zip(positions, cont))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, cont))
    return lp, greedy


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny").replace(max_seq_len=64)).eval()


def _requests(vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(7):  # items: one context, several continuations of mixed lengths (some of one token)
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        for _ in range(rng.randint(1, 5)):
            reqs.append((ctx, [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]))
    reqs.append(reqs[0])  # a duplicate
    return reqs


@pytest.mark.parametrize("prefix_reuse", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_match_reference(model, prefix_reuse: bool, batch_size: int) -> None:
    reqs = _requests(model.config.vocab_size)
    scorer = Scorer(model, batch_size=batch_size, prefix_reuse=prefix_reuse, progress=False)
    scores = scorer.score(reqs)
    assert len(scores) == len(reqs)
    for (ctx, cont), s in zip(reqs, scores):
        lp, greedy = reference_score(model, ctx, cont)
        assert s.logprob == pytest.approx(lp, abs=2e-4)
        assert s.n_tokens == len(cont)
        assert s.greedy == greedy


def test_prefix_reuse_with_moe_and_chunked_attention() -> None:
    torch.manual_seed(1)
    moe = build_model(get_preset("tiny-moe").replace(max_seq_len=64)).eval()  # chunk of 16 tokens, NoPE layers
    reqs = [(ctx, cont) for ctx, cont in _requests(moe.config.vocab_size, seed=3) if len(ctx) + len(cont) > 16]
    assert reqs
    for (ctx, cont), s in zip(reqs, Scorer(moe, batch_size=4, progress=False).score(reqs)):
        assert s.logprob == pytest.approx(reference_score(moe, ctx, cont)[0], abs=2e-4)


def test_greedy_continuation_is_detected(model) -> None:
    ctx = [5, 9, 2]
    cont = []
    with torch.inference_mode():
        for _ in range(4):  # build the model's own greedy continuation
            cont.append(int(model(torch.tensor([ctx + cont]))[0, -1].argmax()))
    for reuse in (True, False):
        (s,) = Scorer(model, prefix_reuse=reuse, progress=False).score([(ctx, cont)])
        assert s.greedy
        (s,) = Scorer(model, prefix_reuse=reuse, progress=False).score([(ctx, [*cont[:-1], (cont[-1] + 1) % 100])])
        assert not s.greedy


def test_long_requests_are_left_truncated(model) -> None:
    ctx, cont = list(range(1, 90)), [7, 8, 9]  # 92 tokens for a 64-token model
    for reuse in (True, False):
        (s,) = Scorer(model, prefix_reuse=reuse, progress=False).score([(ctx, cont)])
        lp, _ = reference_score(model, ctx[-(64 + 1 - len(cont)) :], cont)
        assert s.logprob == pytest.approx(lp, abs=2e-4)
    with pytest.raises(ValueError, match="exceeds the context"):
        Scorer(model, progress=False).score([([1], list(range(70)))])
    with pytest.raises(ValueError, match="at least one token"):
        Scorer(model, progress=False).score([([], [1])])


def test_empty_continuation_scores_zero_and_the_model_keeps_no_state(model) -> None:
    before = {name: t.clone() for name, t in model.state_dict().items()}
    scores = Scorer(model, progress=False).score([([1, 2], []), ([1, 2], [3, 4])])
    assert scores[0].logprob == 0.0 and scores[0].n_tokens == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("cache" in name for name, _ in model.named_buffers())


def test_encode_pair_moves_trailing_spaces_and_handles_empty_context() -> None:
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    assert encode_pair(encode, "Answer: ", "yes") == ([ord(c) for c in "Answer:"], [ord(" "), *map(ord, "yes")])
    assert encode_pair(encode, "", "ab", empty_context_token=1) == ([1], [97, 98])
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(encode, "", "ab")

    # A tokenizer that adds BOS: the split is after the context's own tokens.
    def with_bos(text: str) -> list[int]:
        return [1, *map(ord, text)]

    assert encode_pair(with_bos, "Q", " A") == ([1, 81], [32, 65])
    assert encode_pair(with_bos, "", "x", empty_context_token=1) == ([1], [120])
