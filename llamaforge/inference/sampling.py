"""Sampling: per-request parameters and the logits processors that turn logits into the next token.

Every processor works on a batch of logits ``[B, V]`` whose rows belong to different requests, each
with its own parameters (held as ``[B, 1]`` tensors), so one decode step samples for every request at
once without leaving the device. ``SamplingBatch`` builds, from the rows' ``SamplingParams``, the chain
of processors that at least one row needs, in the order Hugging Face applies them:

    repetition penalty -> presence/frequency penalties -> temperature -> top-k -> top-p -> min-p

Temperature 0 means greedy: such rows take the argmax of the penalized logits. Sampled rows draw with
their own ``torch.Generator`` (seeded from ``SamplingParams.seed``), so a seeded request gives the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """How one request is completed. Validated on construction; bad values raise ValueError."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # CTRL-style, on prompt and output tokens; 1: off
    presence_penalty: float = 0.0  # OpenAI-style, on output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings: generation ends before them, they are not emitted
    stop_token_ids: Sequence[int] = ()  # extra stop tokens besides the tokenizer's own
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's logprob and the top N
    # None: none; N >= 0: each prompt token's logprob given the ones before it (None for the first) and the
    # top N alternatives, computed from the prefill's hidden states
    prompt_logprobs: int | None = None
    # Per-request hooks (e.g. constrained decoding): fn(output_ids, logits[V]) -> logits[V], applied before
    # sampling (after the logprobs are taken); -inf bans a token.
    logits_processors: Sequence[Callable[[list[int], Tensor], Tensor]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop]
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            problems.append(f"logprobs must be an integer in 0..20 or None, got {self.logprobs!r}")
        n = self.prompt_logprobs
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 20):
            problems.append(f"prompt_logprobs must be an integer in 0..20 or None, got {n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop strings must be non-empty strings, got {self.stop!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (None for greedy); unseeded requests draw a seed now."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator(device=device).manual_seed(seed)


# Token history for the penalties -------------------------------------------------------------------
@dataclass
class TokenHistory:
    """What the penalties look at, per row: ``seen`` [B, V] (prompt and output tokens, for the
    repetition penalty) and ``counts`` [B, V] (how often each token was generated)."""

    seen: Tensor
    counts: Tensor

    @classmethod
    def from_ids(cls, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> TokenHistory:  # fmt: skip
        B = len(prompts)
        seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
        for i, (p, o) in enumerate(zip(prompts, outputs)):
            ids = torch.tensor(list(p) + list(o), dtype=torch.long, device=device)
            seen[i, ids] = True
            out = torch.tensor(list(o), dtype=torch.long, device=device)
            counts[i].index_add_(0, out, torch.ones(len(o), device=device))
        return cls(seen, counts)


# Logits processors ---------------------------------------------------------------------------------
class LogitsProcessor:
    """Maps logits [B, V] (float32) to logits [B, V]; -inf removes a token."""

    def __call__(self, logits: Tensor, history: TokenHistory | None) -> Tensor:
        raise NotImplementedError


class RepetitionPenalty(LogitsProcessor):
    """CTRL (Keskar et al. 2019): a seen token's positive logit is divided by the penalty, a negative one
    multiplied, so the penalty always makes it less likely."""

    def __init__(self, penalty: Tensor) -> None:
        self.penalty = penalty

    def __call__(self, logits: Tensor, history: TokenHistory | None) -> Tensor:
        assert history is not None
        penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(history.seen, penalized, logits)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties: logit - presence * [count > 0] - frequency * count over generated tokens."""

    def __init__(self, presence: Tensor, frequency: Tensor) -> None:
        self.presence, self.frequency = presence, frequency

    def __call__(self, logits: Tensor, history: TokenHistory | None) -> Tensor:
        assert history is not None
        counts = history.counts
        return logits - self.presence * (counts > 0).to(logits.dtype) - self.frequency * counts


class Temperature(LogitsProcessor):
    def __init__(self, temperature: Tensor) -> None:
        self.temperature = temperature  # greedy rows hold 1: their argmax is unaffected anyway

    def __call__(self, logits: Tensor, history: TokenHistory | None) -> Tensor:
        return logits / self.temperature


class TopK(LogitsProcessor):
    """Keep each row's k highest logits (ties with the k-th are kept); rows with k = 0 keep all."""

    def __init__(self, k: Tensor, max_k: int) -> None:
        self.k, self.max_k = k, max_k

    def __call__(self, logits: Tensor, history: TokenHistory | None) -> Tensor:
        top = torch.topk(logits, min(self.max_k, logits.shape[-1]), dim=-1).values
        kth = top.gather(-1, (self.k.clamp(1, top.shape[-1]) - 1))
        kth = kth.masked_fill(self.k == 0, NEG_INF)
        return logits.masked_fill(logits < kth, NEG_INF)


class TopP(LogitsProcessor):
    """Nucleus sampling: keep the most likely tokens until their mass reaches p (at least one token)."""

    def __init__(self, p: Tensor) -> None:
        self.p = p

    def __call__(self, logits: Tensor, history: TokenHistory | None) -> Tensor:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = (mass_before >= self.p) & (self.p < 1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)


class MinP(LogitsProcessor):
    """Keep tokens whose probability is at least min_p times the most likely token's."""

    def __init__(self, min_p: Tensor) -> None:
        self.min_p = min_p

    def __call__(self, logits: Tensor, history: TokenHistory | None) -> Tensor:
        probs = logits.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * self.min_p
        return logits.masked_fill(probs < threshold, NEG_INF)


# A batch of rows with their own parameters ----------------------------------------------------------
@dataclass
class SamplingBatch:
    """The processors and random streams for one fixed set of rows; rebuild when the rows change."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    processors: list[LogitsProcessor] = field(default_factory=list)
    greedy_mask: Tensor | None = None  # [B] bool, None when no row is greedy or all are
    all_greedy: bool = False
    needs_history: bool = False
    max_logprobs: int | None = None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              device: torch.device | str) -> SamplingBatch:  # fmt: skip
        params = list(params)

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.tensor(values, dtype=dtype).view(-1, 1).to(device, non_blocking=True)

        processors: list[LogitsProcessor] = []
        if any(p.repetition_penalty != 1 for p in params):
            processors.append(RepetitionPenalty(column([p.repetition_penalty for p in params])))
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            processors.append(PresenceFrequencyPenalty(column([p.presence_penalty for p in params]),
                                                       column([p.frequency_penalty for p in params])))  # fmt: skip
        sampled = [p for p in params if not p.greedy]
        if sampled:
            # Truncation only changes sampled rows; greedy rows take the argmax, which they all keep.
            if any(p.temperature != 1 for p in sampled):
                processors.append(Temperature(column([p.temperature or 1.0 for p in params])))
            if any(p.top_k for p in sampled):
                ks = [0 if p.greedy else p.top_k for p in params]
                processors.append(TopK(column(ks, torch.long), max(ks)))
            if any(p.top_p < 1 for p in sampled):
                processors.append(TopP(column([1.0 if p.greedy else p.top_p for p in params])))
            if any(p.min_p > 0 for p in sampled):
                processors.append(MinP(column([0.0 if p.greedy else p.min_p for p in params])))
        greedy = [p.greedy for p in params]
        logprob_counts = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            params=params,
            generators=list(generators),
            processors=processors,
            greedy_mask=None if all(greedy) or not any(greedy) else column(greedy, torch.bool).view(-1),
            all_greedy=all(greedy),
            needs_history=any(p.uses_penalties for p in params),
            max_logprobs=max(logprob_counts) if logprob_counts else None,
        )

    def process(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        """Apply the processor chain to logits [B, V] (in float32)."""
        logits = logits.float()
        for proc in self.processors:
            logits = proc(logits, history)
        return logits

    def probs(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        """The distribution each row samples from, [B, V]: one-hot at the argmax for greedy rows."""
        processed = self.process(logits, history)
        probs = processed.softmax(-1)
        if self.all_greedy or self.greedy_mask is not None:
            one_hot = torch.zeros_like(probs).scatter_(-1, processed.argmax(-1, keepdim=True), 1.0)
            if self.all_greedy:
                return one_hot
            probs = torch.where(self.greedy_mask[:, None], one_hot, probs)
        return probs

    def sample(self, logits: Tensor, history: TokenHistory | None = None) -> Tensor:
        """Next token per row, [B] (long), without synchronizing with the device."""
        processed = self.process(logits, history)
        greedy_tokens = processed.argmax(-1)
        if self.all_greedy:
            return greedy_tokens
        sampled = sample_from_probs(processed.softmax(-1), self.generators)
        if self.greedy_mask is None:
            return sampled
        return torch.where(self.greedy_mask, greedy_tokens, sampled)


def sample_from_probs(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Draw one token per row of probs [B, V], row i with generators[i] (the exponential-race trick:
    argmax(p / E) with E ~ Exp(1) is a sample from p, and needs no host synchronization)."""
    noise = torch.empty_like(probs)
    for i, gen in enumerate(generators):
        noise[i].exponential_(generator=gen)
    return (probs / noise).argmax(-1)


def token_logprobs(logits: Tensor, tokens: Tensor, top_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The model's log-probabilities (before any processing): of `tokens` [B], and the top_n
    alternatives per row as (values [B, top_n], ids [B, top_n])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.view(-1, 1)).view(-1)
    top = torch.topk(logp, top_n, dim=-1) if top_n else (logp[:, :0], logp[:, :0].long())
    return chosen, top[0], top[1]


def processed_probs(logits: Tensor, params: SamplingParams, prompt_ids: Sequence[int] = (),
                    output_ids: Sequence[int] = ()) -> Tensor:  # fmt: skip
    """The distribution that `params` samples from, for logits [V] (one-hot for greedy) — a reference
    for tests and for inspecting a sampler setting."""
    batch = SamplingBatch.build([params], [None], logits.device)
    history = None
    if batch.needs_history:
        history = TokenHistory.from_ids([prompt_ids], [output_ids], logits.shape[-1], logits.device)
    return batch.probs(logits.view(1, -1), history)[0]
