"""Speculative decoding inside the engine: proposers of draft tokens that the target model verifies.

A decode step asks the engine's ``Speculator`` for draft tokens for every running request that can take them,
then runs the target once over ``[last token, d1 .. dn]`` of each request (one forward for the whole batch,
through the engine's one step). Verification (Leviathan et al. 2023) accepts draft token d with probability
min(1, p(d) / q(d)) and, at the first rejection, samples from the residual max(0, p - q) normalized; if all
are accepted the target's own next token comes free. This leaves every request's distribution unchanged; for
greedy requests p and q are one-hot, so the output is exactly the target's greedy output.

Two proposers:

- ``PromptLookup``: n-gram lookup in the request's own prompt and output (llama.cpp's lookup decoding,
  vLLM's ``ngram``): the longest recent n-gram that ended the text before continues as it did then. It needs
  no second model and pays off where outputs copy the input (summaries, edits, code, extraction).
  Its proposals are deterministic (q one-hot). Defaults are short (3 tokens after a match of at least 2):
  on CPU each verified row costs a good part of a step (benchmarks/RESULTS.md), so long or loose guesses lose.
- ``DraftModel``: a smaller model with the same tokenizer proposes n tokens, batched over the requests, with
  its own paged KV cache (and prefix reuse) and its own step; sampled requests draw drafts from the draft's
  processed distribution q.

Requests with repetition/presence/frequency penalties or their own logits processors decode without drafts
(the processors would need the history of every hypothetical prefix); the rest of the batch still speculates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..model import Transformer
from .cache import BLOCK_SIZE, PagedKVCache, Sequence
from .sampling import SamplingBatch, sample_from_probs
from .step import Step, select_step

if TYPE_CHECKING:
    from .engine import _Request


@dataclass
class Draft:
    tokens: list[int]
    probs: Tensor | None = None  # [n, V]: the distributions the tokens were drawn from; None: one-hot


class Speculator:
    """Proposes draft tokens for running requests (see the module docstring)."""

    name = ""

    def __init__(self, num_tokens: int) -> None:
        if num_tokens < 1:
            raise ValueError(f"the number of speculative tokens must be >= 1, got {num_tokens}")
        self.num_tokens = num_tokens

    def start(self, req: _Request) -> bool:
        """A request was admitted; False when it cannot be drafted for (it then decodes normally)."""
        return True

    def propose(self, reqs: list[_Request], limits: list[int]) -> list[Draft]:
        """Up to limits[i] draft tokens for reqs[i], which ends in its last sampled token."""
        raise NotImplementedError

    def verified(self, req: _Request, drafted: int, accepted: int) -> None:
        """`accepted` of the `drafted` tokens proposed for `req` were accepted (its tokens are updated)."""

    def finish(self, req: _Request) -> None:
        """The request left the engine."""

    def describe(self) -> str:
        return f"{self.name}, {self.num_tokens} tokens"


# Prompt lookup -----------------------------------------------------------------------------------------------
class PromptLookup(Speculator):
    """Drafts by n-gram lookup in the request's own tokens: for n from `max_ngram` down to `min_ngram`, if the
    last n tokens occurred earlier, propose the tokens that followed their latest earlier occurrence."""

    name = "prompt lookup"

    def __init__(self, num_tokens: int = 3, max_ngram: int = 3, min_ngram: int = 2) -> None:
        super().__init__(num_tokens)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._index: dict[int, _NgramIndex] = {}

    def start(self, req: _Request) -> bool:
        self._index[req.handle] = _NgramIndex(self.min_ngram, self.max_ngram)
        return True

    def propose(self, reqs: list[_Request], limits: list[int]) -> list[Draft]:
        out = []
        for req, limit in zip(reqs, limits):
            index = self._index[req.handle]
            tokens = req.all_ids
            index.extend(tokens)
            out.append(Draft(index.lookup(tokens, limit)))
        return out

    def finish(self, req: _Request) -> None:
        self._index.pop(req.handle, None)

    def describe(self) -> str:
        return f"prompt lookup, {self.num_tokens} tokens, n-grams {self.max_ngram}..{self.min_ngram}"


class _NgramIndex:
    """For each n, where the latest earlier occurrence of every n-gram was followed by something."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(max_n, min_n - 1, -1)
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.done = 0  # continuations indexed: positions 1..done-1 of the tokens

    def extend(self, tokens: list[int]) -> None:
        for end in range(max(self.done, 1), len(tokens)):  # an n-gram ending before `end` continues at `end`
            for n in self.sizes:
                if end >= n:
                    self.maps[n][tuple(tokens[end - n : end])] = end
        self.done = max(self.done, len(tokens))

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        if limit < 1:
            return []
        for n in self.sizes:
            if len(tokens) > n:
                start = self.maps[n].get(tuple(tokens[-n:]))
                if start is not None:
                    return tokens[start : start + limit]
        return []


# A draft model -----------------------------------------------------------------------------------------------
@dataclass
class _DraftState:
    seq: Sequence
    valid: int = 0  # positions of the draft's cache that hold the request's real tokens


class DraftModel(Speculator):
    """Drafts with a smaller model that shares the target's tokenizer (its own KV cache and step)."""

    name = "draft model"

    def __init__(self, draft: Any, num_tokens: int = 4, *, vocab_size: int | None = None, cache_tokens: int = 1024,
                 cache_dtype: torch.dtype | None = None, prefill_chunk: int = 512, step: Step | None = None,
                 vocab_limit: int | None = None) -> None:  # fmt: skip
        super().__init__(num_tokens)
        model: Transformer = draft if isinstance(draft, Transformer) else draft.model
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size}) differs from the target's "
                             f"({vocab_size}); they must share a tokenizer")  # fmt: skip
        self.model = model
        self.source = getattr(draft, "source", "") or type(model).__name__
        self.step = step or select_step(model)
        self.cache = PagedKVCache.for_model(model, cache_tokens, block_size=BLOCK_SIZE, dtype=cache_dtype)
        self.prefill_chunk = prefill_chunk
        self.vocab_limit = vocab_limit
        self.device = model.tok_embeddings.weight.device
        self._state: dict[int, _DraftState] = {}

    def describe(self) -> str:
        return f"draft model {self.source}, {self.num_tokens} tokens, step {self.step.name}"

    def start(self, req: _Request) -> bool:
        max_tokens = len(req.prompt_ids) + req.max_new
        if max_tokens > self.cache.capacity:
            self.cache.grow(self.cache.blocks_for(max_tokens) + 1)
        seq = self.cache.admit(req.prompt_ids, max_tokens)
        if seq is None:
            self.cache.grow(self.cache.num_blocks + self.cache.blocks_for(max_tokens))
            seq = self.cache.admit(req.prompt_ids, max_tokens)
        if seq is None:
            return False
        self._state[req.handle] = _DraftState(seq, seq.num_tokens)
        return True

    def finish(self, req: _Request) -> None:
        state = self._state.pop(req.handle, None)
        if state is not None:
            self.cache.release(state.seq)

    def verified(self, req: _Request, drafted: int, accepted: int) -> None:
        state = self._state.get(req.handle)
        if state is None:
            return
        # The draft's cache holds [last, d1 .. d_{n-1}] past the confirmed tokens; d1..d_accepted are real now.
        confirmed = len(req.all_ids) - 1  # the newest token is not in any cache yet
        state.valid = min(state.valid, confirmed)
        self.cache.commit(state.seq, req.all_ids, state.valid)

    def propose(self, reqs: list[_Request], limits: list[int]) -> list[Draft]:
        drafts = [Draft([], [] if not r.params.greedy else None) for r in reqs]  # type: ignore[arg-type]
        live = [i for i, (r, n) in enumerate(zip(reqs, limits)) if n > 0 and r.handle in self._state]
        if not live:
            return [Draft([]) for _ in reqs]
        # Round 0 feeds what the draft has not seen (the last token, more after a full acceptance or at start),
        # later rounds one draft token each.
        feeds = {i: reqs[i].all_ids[self._state[reqs[i].handle].valid :] for i in live}
        batch = SamplingBatch.build([reqs[i].params for i in live], [reqs[i].generator for i in live], self.device)
        rounds = max(limits[i] for i in live)
        active = list(live)
        for _ in range(rounds):
            logits = self._forward([reqs[i] for i in active], [feeds[i] for i in active])
            sub = batch if len(active) == len(live) else SamplingBatch.build(
                [reqs[i].params for i in active], [reqs[i].generator for i in active], self.device)  # fmt: skip
            probs = sub.probs(logits)
            greedy = [reqs[i].params.greedy for i in active]
            picks = probs.argmax(-1) if all(greedy) else sample_from_probs(probs, [reqs[i].generator for i in active])
            if any(greedy) and not all(greedy):
                picks = torch.where(torch.tensor(greedy, device=self.device), probs.argmax(-1), picks)
            for row, (i, tok) in enumerate(zip(active, picks.tolist())):
                drafts[i].tokens.append(int(tok))
                if drafts[i].probs is not None:
                    drafts[i].probs.append(probs[row])  # type: ignore[union-attr]
                feeds[i] = [int(tok)]
            active = [i for i in active if len(drafts[i].tokens) < limits[i]]
            if not active:
                break
        for d in drafts:
            if isinstance(d.probs, list):
                d.probs = torch.stack(d.probs) if d.probs else None
        return drafts

    def _forward(self, reqs: list[_Request], feeds: list[list[int]]) -> Tensor:
        """Feed each request's tokens to the draft (long ones in chunks) and return the logits after its last one."""
        out: list[Tensor | None] = [None] * len(reqs)
        todo = list(range(len(reqs)))
        while todo:
            width = min(max(len(feeds[i]) for i in todo), self.prefill_chunk)
            rows = [i for i in todo if len(feeds[i]) <= width] or todo[:1]
            B = len(rows)
            T = max(min(len(feeds[i]), width) for i in rows)
            tokens = torch.zeros(B, T, dtype=torch.long)
            starts = []
            for r, i in enumerate(rows):
                part = feeds[i][:T]
                tokens[r, : len(part)] = torch.tensor(part)
                state = self._state[reqs[i].handle]
                starts.append(state.valid)
                self.cache.ensure(state.seq, state.valid + len(part))
            pos = torch.tensor(starts)[:, None] + torch.arange(T)
            view = self.cache.view([self._state[reqs[i].handle].seq for i in rows], pos)
            hidden = self.step.hidden(tokens.to(self.device), pos.to(self.device), view)
            lasts = []
            for r, i in enumerate(rows):
                n = min(len(feeds[i]), T)
                state = self._state[reqs[i].handle]
                state.valid += n
                feeds[i] = feeds[i][n:]
                if not feeds[i]:
                    lasts.append((r, n - 1, i))
            if lasts:
                sel = hidden[torch.tensor([r for r, _, _ in lasts]), torch.tensor([j for _, j, _ in lasts])]
                logits = self.step.head(sel).float()
                if self.vocab_limit is not None:
                    logits[:, self.vocab_limit :] = float("-inf")
                for k, (_, _, i) in enumerate(lasts):
                    out[i] = logits[k]
            todo = [i for i in todo if feeds[i]]
        return torch.stack(out)  # type: ignore[arg-type]


def make_speculator(target: Any, draft: Any = None, ngram: bool = False, num_tokens: int | None = None,
                    cache_tokens: int = 1024) -> Speculator | None:  # fmt: skip
    """The speculator for `target` (an ``LLM``): a ``DraftModel`` when `draft` (an LLM sharing its tokenizer) is
    given, ``PromptLookup`` when `ngram`, else None. `num_tokens` defaults to 4 for a draft model, 3 for lookup."""
    if draft is not None and ngram:
        raise ValueError("choose one kind of speculative decoding: a draft model or n-gram prompt lookup")
    if draft is not None:
        tokenizer = target.tokenizer
        vocab = target.config.vocab_size
        limit = tokenizer.vocab_size if tokenizer is not None and tokenizer.vocab_size < vocab else None
        return DraftModel(draft, num_tokens or 4, vocab_size=vocab, vocab_limit=limit, cache_tokens=cache_tokens)
    if ngram:
        return PromptLookup(num_tokens or 3)
    return None
