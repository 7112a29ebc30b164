"""Sliding-window perplexity, bits per byte, and the KL divergence of one model against another.

Windows of ``context`` tokens advance by ``stride`` tokens; each scores only the tokens that no earlier
window scored, so every token (but the first of the text, which has nothing to condition on) is scored
exactly once, with at least ``context - stride`` tokens of history after the first window (at least one:
``stride == context`` gives lm-eval's rolling windows). Windows of the same length run together in batches.

With a reference model (same tokenizer), every scored position also yields KL(P_ref || P_model) over
the whole vocabulary and whether both models rank the same token first: how llama.cpp's
``perplexity --kl-divergence`` reports the damage quantization does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..model import Transformer

LN2 = math.log(2.0)
PROJECT_CHUNK = 512  # positions projected onto the vocabulary at once (bounds the logits' memory)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of each window over `n_tokens` tokens: tokens first_target..end-1 are
    scored from the window tokens[begin:end].

    The first window scores tokens 1..context-1; each later one scores the next `stride` tokens (at most
    context - 1, so that even disjoint windows keep one token of history) after the tokens before them,
    filling the window: every window but a short text's only one is `context` tokens long.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    step = min(stride, context - 1)
    end = min(context, n_tokens)
    windows = [(0, end, 1)] if n_tokens > 1 else []
    while end < n_tokens:
        first, end = end, min(end + step, n_tokens)
        windows.append((max(0, end - context), end, first))
    return windows


@dataclass
class KLStats:
    """Per-token KL(P_ref || P_model) in nats, and how often the two models agree on the top token."""

    kl: Tensor  # float64 [n]
    same_top: Tensor  # bool [n]
    reference_nll: Tensor  # float64 [n]: the reference model's own negative log-likelihoods

    @property
    def mean(self) -> float:
        return float(self.kl.mean())

    @property
    def stderr(self) -> float:
        return _mean_stderr(self.kl)

    def quantile(self, q: float) -> float:
        return float(torch.quantile(self.kl, q))

    @property
    def top1(self) -> float:
        return float(self.same_top.double().mean())

    @property
    def top1_stderr(self) -> float:
        return _mean_stderr(self.same_top.double())

    @property
    def reference_ppl(self) -> float:
        return math.exp(float(self.reference_nll.mean()))

    def to_dict(self) -> dict[str, float]:
        return {"mean_kl": self.mean, "mean_kl_stderr": self.stderr, "median_kl": self.quantile(0.5),
                "p99_kl": self.quantile(0.99), "p99.9_kl": self.quantile(0.999), "max_kl": float(self.kl.max()),
                "top1_agreement": self.top1, "top1_agreement_stderr": self.top1_stderr,
                "reference_ppl": self.reference_ppl}  # fmt: skip


@dataclass
class PerplexityResult:
    """Negative log-likelihoods (nats) of every scored token, in text order, and what follows from them."""

    token_nll: Tensor  # float64 [n]
    n_bytes: int | None = None  # UTF-8 bytes of the text, for bits per byte
    context: int = 0
    stride: int = 0
    n_windows: int = 0
    kl: KLStats | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.token_nll.numel())

    @property
    def nll(self) -> float:
        return float(self.token_nll.sum())

    @property
    def mean_nll(self) -> float:
        return float(self.token_nll.mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def ppl_stderr(self) -> float:
        """Standard error of the perplexity (delta method on the mean NLL)."""
        return self.ppl * _mean_stderr(self.token_nll)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.n_bytes else self.nll / LN2 / self.n_bytes

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "tokens": self.n_tokens, "bytes": self.n_bytes,
                               "windows": self.n_windows, "context": self.context, "stride": self.stride,
                               "nll": self.nll, "mean_nll": self.mean_nll, "ppl": self.ppl,
                               "ppl_stderr": self.ppl_stderr, "bits_per_byte": self.bits_per_byte}  # fmt: skip
        if self.kl is not None:
            out.update(self.kl.to_dict())
            out["ln_ppl_ratio"] = self.mean_nll - float(self.kl.reference_nll.mean())
        return out


def _mean_stderr(x: Tensor) -> float:
    n = x.numel()
    return float(x.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def perplexity(model: Transformer, tokens: Sequence[int], *, context: int | None = None, stride: int | None = None,
               batch_size: int = 4, reference: Transformer | None = None, n_bytes: int | None = None,
               progress: bool | tqdm = True, name: str = "") -> PerplexityResult:  # fmt: skip
    """Perplexity of `model` on `tokens` with sliding windows (default: the model's context, stride half
    of it); with `reference`, also KL(P_reference || P_model) and top-1 agreement at every position."""
    context = min(context or model.config.max_seq_len, model.config.max_seq_len)
    stride = stride or max(1, context // 2)
    if reference is not None:
        if reference.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the reference model's vocabulary ({reference.config.vocab_size}) differs from the "
                             f"model's ({model.config.vocab_size}); they must share a tokenizer")  # fmt: skip
        context = min(context, reference.config.max_seq_len)
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"{name or 'text'}: perplexity needs at least 2 tokens, got {ids.numel()}")
    windows = sliding_windows(ids.numel(), context, stride)
    nll = torch.empty(ids.numel(), dtype=torch.float64)
    kl = torch.empty_like(nll) if reference is not None else None
    same = torch.zeros(ids.numel(), dtype=torch.bool) if reference is not None else None
    ref_nll = torch.empty_like(nll) if reference is not None else None
    bar = progress if isinstance(progress, tqdm) else tqdm(total=len(windows), desc="perplexity", unit="window",
                                                           disable=not progress, leave=False)  # fmt: skip
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        by_length.setdefault(w[1] - w[0], []).append(w)
    device = model.tok_embeddings.weight.device
    with torch.inference_mode():
        for group in by_length.values():
            for s in range(0, len(group), batch_size):
                batch = group[s : s + batch_size]
                x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
                # (row, position) whose output predicts target token t: position t - 1 - begin.
                rows = torch.tensor([r for r, (_, e, f) in enumerate(batch) for _ in range(f, e)])
                cols = torch.tensor([t - 1 - b for b, e, f in batch for t in range(f, e)])
                targets = torch.cat([torch.arange(f, e) for _, e, f in batch])
                hidden = model(x, return_hidden=True)
                ref_hidden = reference(x.to(_device(reference)), return_hidden=True) if reference is not None else None
                for c in range(0, targets.numel(), PROJECT_CHUNK):
                    sl = slice(c, c + PROJECT_CHUNK)
                    tgt = targets[sl]
                    lp = F.log_softmax(model.output(hidden[rows[sl], cols[sl]]).float(), dim=-1).cpu()
                    y = ids[tgt]
                    nll[tgt] = -lp.gather(-1, y[:, None])[:, 0].double()
                    if reference is not None:
                        ref_logits = reference.output(ref_hidden[rows[sl], cols[sl]]).float()
                        ref_lp = F.log_softmax(ref_logits, dim=-1).cpu()
                        kl[tgt] = (ref_lp.exp() * (ref_lp - lp)).sum(-1).double()
                        same[tgt] = ref_lp.argmax(-1) == lp.argmax(-1)
                        ref_nll[tgt] = -ref_lp.gather(-1, y[:, None])[:, 0].double()
                bar.update(len(batch))
    if not isinstance(progress, tqdm):
        bar.close()
    scored = torch.zeros(ids.numel(), dtype=torch.bool)
    for _, e, f in windows:
        scored[f:e] = True
    stats = None
    if reference is not None:
        stats = KLStats(kl=kl[scored], same_top=same[scored], reference_nll=ref_nll[scored])
    return PerplexityResult(token_nll=nll[scored], n_bytes=n_bytes, context=context, stride=stride,
                            n_windows=len(windows), kl=stats, name=name)  # fmt: skip


def _device(model: Transformer) -> torch.device:
    return model.tok_embeddings.weight.device


def combine(results: Sequence[PerplexityResult], name: str = "total") -> PerplexityResult:
    """All files' scored tokens together, as if one corpus (windows never cross a file boundary)."""
    if not results:
        raise ValueError("no perplexity results to combine")
    kl = None
    if all(r.kl is not None for r in results):
        kl = KLStats(kl=torch.cat([r.kl.kl for r in results]), same_top=torch.cat([r.kl.same_top for r in results]),
                     reference_nll=torch.cat([r.kl.reference_nll for r in results]))  # fmt: skip
    n_bytes = sum(r.n_bytes for r in results) if all(r.n_bytes for r in results) else None
    first = results[0]
    return PerplexityResult(token_nll=torch.cat([r.token_nll for r in results]), n_bytes=n_bytes,
                            context=first.context, stride=first.stride, n_windows=sum(r.n_windows for r in results),
                            kl=kl, name=name)  # fmt: skip
