"""Batched log-likelihood of continuations given contexts, scoring each shared context once.

A multiple-choice item asks for ``log P(continuation_i | context)`` for several continuations of one
context. ``Scorer`` groups requests by context and, with ``prefix_reuse=True`` (the default), runs each
context once into a paged KV cache that the scorer owns, gives each continuation a block table that shares
the context's blocks (its partial last block copied), and then runs all continuations of a batch together at
their own positions. Only the
positions that are scored go through the output matrix, so padding and context tokens never pay for
the vocabulary projection. ``prefix_reuse=False`` scores every ``context + continuation`` as its own
row of a causal batch (what lm-evaluation-harness does), for comparison.

Text is turned into tokens as lm-evaluation-harness does for causal models (``encode_pair``): the
context's trailing spaces move to the continuation, the pair is encoded whole and split after the
context's own tokens, so the scores agree with its Hugging Face backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import UserError
from ..inference.cache import PagedKVCache
from ..model import Transformer

TokenPair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Score:
    """``logprob``: sum of the continuation's token log-probabilities; ``greedy``: every continuation
    token is the model's top choice; ``n_tokens``: how many tokens were scored."""

    logprob: float
    greedy: bool
    n_tokens: int


def text_encoder(tokenizer, add_bos: bool | None = None) -> Callable[[str], list[int]]:
    """``encode(text)`` with the tokenizer's own BOS policy (or `add_bos` when given)."""
    bos = tokenizer.add_bos_default if add_bos is None else add_bos
    return lambda text: list(tokenizer.encode(text, bos=bool(bos)))


def prefix_token(tokenizer) -> int:
    """The token that stands for an empty context: BOS, else EOS."""
    token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return int(token)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                empty_context_token: int | None = None) -> tuple[list[int], list[int]]:  # fmt: skip
    """Token ids of (context, continuation), split the way lm-evaluation-harness splits them."""
    if context == "":
        if empty_context_token is None:
            raise ValueError("an empty context needs a token to stand for it (BOS or EOS)")
        ids = encode(continuation)
        if ids and ids[0] == empty_context_token:  # the tokenizer already put BOS first
            return ids[:1], ids[1:]
        return [empty_context_token], ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


class Scorer:
    """Log-likelihoods of token continuations under `model`, in batches of at most `batch_size` rows.

    Sequences longer than ``max_length`` (default: the model's context) lose tokens from the left of
    the context; a continuation longer than that is an error.

    A tensor-parallel model (``inference.tensor_parallel``, on rank 0) runs its forwards and output head with the
    other ranks through the engine's step, so it scores through the KV cache (``prefix_reuse``) only.
    """

    def __init__(self, model: Transformer, batch_size: int = 16, max_length: int | None = None,
                 prefix_reuse: bool = True, progress: bool = True) -> None:  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
        self.prefix_reuse = prefix_reuse
        self.progress = progress
        # the cached forward and the output head: the model's own, or a tensor-parallel leader's
        self._forward, self._head = model, model.output
        if getattr(model, "tensor_parallel", None) is not None:
            if not prefix_reuse:
                raise UserError("a tensor-parallel model (--tp) scores through its KV cache: drop --no-prefix-reuse")
            from ..inference.tensor_parallel import leader_step

            step = leader_step(model)
            self._forward, self._head = step.forward, step.head

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # Public API -------------------------------------------------------------------------------
    def score(self, requests: Sequence[TokenPair], desc: str = "scoring") -> list[Score]:
        """One ``Score`` per (context ids, continuation ids); duplicate requests are scored once."""
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for ctx, cont in requests:
            if len(ctx) == 0:
                raise ValueError("a context must have at least one token (use BOS for an empty context)")
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds the context of {self.max_length}")
            unique.setdefault((tuple(int(t) for t in ctx), tuple(int(t) for t in cont)), len(unique))
        keys = list(unique)
        results: list[Score | None] = [None] * len(keys)
        for i, (_, cont) in enumerate(keys):
            if not cont:
                results[i] = Score(0.0, True, 0)
        todo = [i for i in range(len(keys)) if results[i] is None]
        bar = tqdm(total=len(todo), desc=desc, unit="req", disable=not self.progress or not todo, leave=False)
        with torch.inference_mode():
            if self.prefix_reuse:
                self._score_with_cache([(i, *keys[i]) for i in todo], results, bar)
            else:
                self._score_plain([(i, *keys[i]) for i in todo], results, bar)
        bar.close()
        return [results[unique[(tuple(int(t) for t in c), tuple(int(t) for t in k))]] for c, k in requests]  # type: ignore[misc]

    # Plain batches: one causal row per request ------------------------------------------------------
    def _score_plain(self, reqs: list[tuple[int, tuple[int, ...], tuple[int, ...]]], results: list, bar: tqdm) -> None:
        rows = []
        for i, ctx, cont in reqs:
            seq = (ctx + cont)[-(self.max_length + 1) :][:-1]
            rows.append((i, seq, cont))
        rows.sort(key=lambda r: -len(r[1]))
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            width = len(batch[0][1])
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for b, (_, seq, _) in enumerate(batch):
                tokens[b, : len(seq)] = torch.tensor(seq)
            hidden = self.model(tokens.to(self.device), return_hidden=True)
            # Positions whose output predicts a continuation token: the last len(cont) of each row.
            select = [(b, len(seq) - len(cont) + j) for b, (_, seq, cont) in enumerate(batch) for j in range(len(cont))]
            targets = [t for _, _, cont in batch for t in cont]
            scores = self._token_scores(hidden, select, targets)
            self._collect(batch, scores, results)
            bar.update(len(batch))

    # Prefix reuse: each context once through the KV cache, then every continuation -----------------
    def _score_with_cache(self, reqs: list[tuple[int, tuple[int, ...], tuple[int, ...]]], results: list,
                          bar: tqdm) -> None:  # fmt: skip
        groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
        for i, ctx, cont in reqs:
            groups.setdefault(ctx, []).append((i, cont))
        # A group larger than a batch is split; each part runs its context again.
        parts = []
        for ctx, conts in groups.items():
            for s in range(0, len(conts), self.batch_size):
                chunk = conts[s : s + self.batch_size]
                keep = self.max_length + 1 - max(len(c) for _, c in chunk)  # context tokens that fit
                parts.append((ctx[-keep:], chunk))
        # Continuation rows outnumber contexts: batch parts whose continuations have similar lengths.
        parts.sort(key=lambda p: (-max(len(c) for _, c in p[1]), -len(p[0])))
        # Every row of a batch runs at positions up to the longest context plus the longest continuation.
        cache_size = min(max(len(ctx) for ctx, _ in parts) + max(len(c) for _, ch in parts for _, c in ch) - 1,
                         self.model.config.max_seq_len)  # fmt: skip
        longest_cont = max(len(c) for _, ch in parts for _, c in ch)
        cache = PagedKVCache.for_model(self.model, self.batch_size * (cache_size + longest_cont + 32),
                                       prefix_caching=False)  # fmt: skip
        batch: list = []
        for part in parts:
            rows = sum(len(c) for _, c in batch) + len(part[1])
            span = max(len(ctx) for ctx, _ in [*batch, part]) + max(len(c) for _, ch in [*batch, part] for _, c in ch)
            if batch and (rows > self.batch_size or span - 1 > cache_size):
                self._run_groups(batch, results, cache)
                bar.update(sum(len(c) for _, c in batch))
                batch = []
            batch.append(part)
        if batch:
            self._run_groups(batch, results, cache)
            bar.update(sum(len(c) for _, c in batch))

    def _run_groups(self, groups: list[tuple[tuple[int, ...], list[tuple[int, tuple[int, ...]]]]], results: list,
                    cache: PagedKVCache) -> None:  # fmt: skip
        device = self.device
        G = len(groups)
        ctx_len = [len(ctx) for ctx, _ in groups]
        width = max(ctx_len)
        tokens = torch.zeros(G, width, dtype=torch.long)
        seqs = []
        for g, (ctx, _) in enumerate(groups):
            tokens[g, : len(ctx)] = torch.tensor(ctx)
            seq = cache.admit(ctx, len(ctx), reuse=False)
            assert seq is not None, "the scorer's cache holds a batch"
            cache.ensure(seq, len(ctx))
            seqs.append(seq)
        pos = torch.arange(width).expand(G, width)
        hidden = self._forward(tokens.to(device), pos.to(device), cache=cache.view(seqs, pos), return_hidden=True)
        # First continuation token of every request, from its context's last position.
        members = [(g, i, cont) for g, (_, conts) in enumerate(groups) for i, cont in conts]
        first = self._token_scores(hidden, [(g, ctx_len[g] - 1) for g, _, _ in members], [c[0] for _, _, c in members])
        # The rest: continuations of two or more tokens, each in its own cache row holding its context.
        longer = [(r, m) for r, m in enumerate(members) if len(m[2]) > 1]
        rest: dict[int, tuple[float, bool]] = {}
        forks = []
        if longer:
            R, T = len(longer), max(len(c) for _, (_, _, c) in longer) - 1
            tokens = torch.zeros(R, T, dtype=torch.long)
            for r, (_, (g, _, cont)) in enumerate(longer):
                tokens[r, : len(cont) - 1] = torch.tensor(cont[:-1])
                fork = cache.fork(seqs[g], ctx_len[g], ctx_len[g] + len(cont) - 1)
                assert fork is not None, "the scorer's cache holds a batch"
                cache.ensure(fork, ctx_len[g] + len(cont) - 1)
                forks.append(fork)
            start = torch.tensor([ctx_len[g] for _, (g, _, _) in longer])
            pos = start[:, None] + torch.arange(T)
            hidden = self._forward(tokens.to(device), pos.to(device), cache=cache.view(forks, pos), return_hidden=True)
            select = [(r, j) for r, (_, (_, _, c)) in enumerate(longer) for j in range(len(c) - 1)]
            targets = [t for _, (_, _, c) in longer for t in c[1:]]
            scores = self._token_scores(hidden, select, targets)
            at = 0
            for r, (_, _, cont) in longer:
                n = len(cont) - 1
                rest[r] = (float(scores[0][at : at + n].sum()), bool(scores[1][at : at + n].all()))
                at += n
        for seq in seqs + forks:
            cache.release(seq)
        for r, (_, i, cont) in enumerate(members):
            lp, greedy = float(first[0][r]), bool(first[1][r])
            if r in rest:
                lp, greedy = lp + rest[r][0], greedy and rest[r][1]
            results[i] = Score(lp, greedy, len(cont))

    # Shared helpers ----------------------------------------------------------------------------------
    def _token_scores(self, hidden: Tensor, select: list[tuple[int, int]], targets: list[int]) -> tuple[Tensor, Tensor]:
        """Log-probability of each target and whether it is the argmax, for hidden states at `select`."""
        b = torch.tensor([s[0] for s in select], device=hidden.device)
        t = torch.tensor([s[1] for s in select], device=hidden.device)
        logits = self._head(hidden[b, t]).float()
        logprobs = F.log_softmax(logits, dim=-1)
        target = torch.tensor(targets, device=hidden.device)
        chosen = logprobs.gather(-1, target[:, None])[:, 0]
        greedy = logprobs.argmax(-1) == target
        return chosen.double().cpu(), greedy.cpu()

    @staticmethod
    def _collect(batch: list, scores: tuple[Tensor, Tensor], results: list) -> None:
        at = 0
        for i, _, cont in batch:
            n = len(cont)
            results[i] = Score(float(scores[0][at : at + n].sum()), bool(scores[1][at : at + n].all()), n)
            at += n


def loglikelihoods(scorer: Scorer, encode: Callable[[str], list[int]], pairs: Sequence[tuple[str, str]],
                   empty_context_token: int | None = None, desc: str = "scoring") -> list[Score]:  # fmt: skip
    """Scores of text (context, continuation) pairs."""
    tokens = [encode_pair(encode, ctx, cont, empty_context_token) for ctx, cont in pairs]
    return scorer.score(tokens, desc=desc)
