"""Text embeddings from a LLaMA-family model: the final (normalized) hidden states, pooled per text.

``embed(llm, texts)`` returns a float32 tensor [N, dim]. Pooling is ``"mean"`` (the average over the text's
tokens) or ``"last"`` (the last token's state, which has seen the whole text); rows are L2-normalized unless
``normalize=False``. Texts are encoded like prompts (with BOS when the model expects one); token-id inputs
are used as they are.

Texts run through the model in batches: sorted by length, right-padded, at most ``max_batch_tokens`` padded
tokens per forward. A causal model never lets a token see the padding after it, so padded rows give the same
states as unpadded ones, and the pooling reads only each row's real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .llm import LLM

POOLING = ("mean", "last")
MAX_BATCH_TOKENS = 4096


def encode_inputs(llm: LLM, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids of each input: one text, a list of texts, one list of ids, or a list of id lists."""
    from .inference import encode_prompt

    if isinstance(inputs, str):
        inputs = [inputs]
    elif isinstance(inputs, Sequence) and inputs and all(isinstance(t, int) for t in inputs):
        inputs = [inputs]  # type: ignore[list-item]
    if not isinstance(inputs, Sequence) or not inputs:
        raise ValueError("give at least one input to embed (a string, a list of strings or lists of token ids)")
    vocab = llm.config.vocab_size
    out = []
    for n, item in enumerate(inputs):
        if isinstance(item, str):
            ids = encode_prompt(llm.require_tokenizer(), item)
        elif isinstance(item, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"input {n}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
        else:
            raise ValueError(f"input {n} must be a string or a list of token ids, got {type(item).__name__}")
        if not ids:
            raise ValueError(f"input {n} is empty: it has no tokens to embed")
        out.append(ids)
    return out


@torch.inference_mode()
def embed_ids(model: Any, sequences: Sequence[Sequence[int]], pooling: str = "mean", normalize: bool = True,
              max_batch_tokens: int = MAX_BATCH_TOKENS) -> Tensor:  # fmt: skip
    """Embeddings [N, dim] (float32, on the CPU) of token-id sequences."""
    if pooling not in POOLING:
        raise ValueError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
    context = model.config.max_seq_len
    for n, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"input {n} is empty: it has no tokens to embed")
        if len(seq) > context:
            raise ValueError(f"input {n} has {len(seq)} tokens, more than the model's context of {context}")
    device = model.tok_embeddings.weight.device
    out = torch.empty(len(sequences), model.config.dim, dtype=torch.float32)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    start = 0
    while start < len(order):
        end = start + 1  # rows are sorted by length, so the last row of a batch sets its width
        while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= max_batch_tokens:
            end += 1
        rows = order[start:end]
        lengths = torch.tensor([len(sequences[i]) for i in rows], device=device)
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
        for r, i in enumerate(rows):
            tokens[r, : len(sequences[i])] = torch.tensor(sequences[i], device=device)
        hidden = model(tokens, return_hidden=True).float()
        if pooling == "mean":
            real = (torch.arange(tokens.shape[1], device=device) < lengths[:, None]).unsqueeze(-1)
            pooled = (hidden * real).sum(1) / lengths[:, None]
        else:
            pooled = hidden[torch.arange(len(rows), device=device), lengths - 1]
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        out[rows] = pooled.cpu()
        start = end
    return out


def embed(llm: LLM, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], pooling: str = "mean",
          normalize: bool = True, max_batch_tokens: int = MAX_BATCH_TOKENS) -> Tensor:  # fmt: skip
    """Embeddings [N, dim] of texts (or token-id lists); see the module docstring."""
    return embed_ids(llm.model, encode_inputs(llm, inputs), pooling, normalize, max_batch_tokens)


__all__ = ["MAX_BATCH_TOKENS", "POOLING", "embed", "embed_ids", "encode_inputs"]
