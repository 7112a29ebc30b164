"""``LLM``: a loaded model with its tokenizer and config, and ``load()`` that builds one from any source."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import load_model
from .config import ModelConfig
from .model import Transformer

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


@dataclass
class LLM:
    """A model ready to use. ``llm.model(tokens[B, T]) -> logits[B, T, vocab]``."""

    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str = ""
    format: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: this checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def generate(self, prompt: Any, **kwargs: Any) -> Any:
        """Complete `prompt` (text or token ids); see ``llamaforge.generate.generate`` for the options."""
        from .generate import generate

        return generate(self, prompt, **kwargs)

    def stream(self, prompt: Any, **kwargs: Any) -> Any:
        """Yield the completion of `prompt` piece by piece as it is generated."""
        from .generate import stream

        return stream(self, prompt, **kwargs)

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) in the model's chat format; with
        ``tools=[...]`` the Completion's ``tool_calls`` holds the calls the model made."""
        from .generate import chat

        return chat(self, messages, **kwargs)

    def embed(self, texts: Any, pooling: str = "mean", normalize: bool = True) -> Any:
        """Embeddings [N, dim] of texts (or token-id lists): the final hidden states, pooled ("mean" or
        "last") and L2-normalized; see ``llamaforge.embeddings``."""
        from .embeddings import embed

        return embed(self, texts, pooling=pooling, normalize=normalize)


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path as it is; otherwise a built-in model name or hub id, fetched into the cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    try:
        from .hub import resolve_model
    except ModuleNotFoundError as exc:  # pragma: no cover - hub support not installed
        raise FileNotFoundError(f"no such file or directory: {source}") from exc
    return resolve_model(str(source))


def load(source: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         quantize: str | None = None, adapter: str | os.PathLike | None = None) -> LLM:  # fmt: skip
    """Load a model from a Hugging Face directory, a Meta directory, a GGUF file, a hub id or a built-in name.

    A quantized GGUF file (Q4_K_M, Q8_0, ...) runs in its own blocks, memory-mapped, as llama.cpp runs it
    (``quantize.GGUF_BLOCK_TYPES``); giving a ``dtype`` dequantizes its weights to that dtype instead (the memory
    that takes is printed first). Other checkpoints load in their own dtype unless ``dtype`` is given.
    ``quantize``: "int8", "int4" or "int4-g32/64/128" quantizes the weights on load; "gguf" keeps a GGUF file's
    blocks whatever ``dtype`` says (then the dtype of the activations). A directory written by
    ``llamaforge.quantize.save_quantized`` loads quantized as it was saved. ``adapter``: a LoRA adapter
    directory (PEFT or llamaforge layout) applied unmerged on top of the base. A model that cannot fit in the
    memory available is refused before loading (``memory.InsufficientMemoryError``, with the numbers).
    """
    from . import quantize as q
    from .memory import check_fits, format_bytes

    path = resolve_source(source)
    if q.is_quantized_dir(path):
        model, fmt = q.load_quantized(path, device=device), "quantized"
    elif quantize == "gguf" or (quantize is None and dtype is None and q.is_quantized_gguf(path)):
        check_fits(q.gguf_model_bytes(path), f"{path}")
        model, fmt = q.load_gguf_quantized(path, device=device, dtype=dtype or torch.float32), "gguf"
    else:
        if q.is_quantized_gguf(path):
            need = q.gguf_model_bytes(path, dtype or torch.float32)
            print(f"llamaforge: dequantizing {path.name} to {dtype or torch.float32}: {format_bytes(need)} of "
                  f"weights (its blocks take {format_bytes(q.gguf_model_bytes(path))})", file=sys.stderr)  # fmt: skip
            check_fits(need, f"{path} dequantized to {dtype or torch.float32}",
                       "load it without a dtype to run its blocks as stored")  # fmt: skip
        model, fmt = load_model(path, device=device, dtype=dtype)
        if quantize:
            q.quantize_model(model, quantize)
    if adapter is not None:
        from .train.lora import apply_adapter

        apply_adapter(model, adapter)
    model.eval()
    tokenizer = _load_tokenizer_if_present(path)
    return LLM(model=model, tokenizer=tokenizer, config=model.config, source=str(source), format=fmt)


def _load_tokenizer_if_present(path: Path) -> Tokenizer | None:
    try:
        from .tokenizer import load_tokenizer
    except ModuleNotFoundError:
        return None
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        return None
