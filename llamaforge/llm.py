"""``LLM``: a loaded model with its tokenizer and config, and ``load()`` that builds one from any source."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import inference
from .checkpoint import load_model
from .config import ModelConfig
from .inference import Completion, Engine
from .model import Transformer
from .tokenizer import Tokenizer, load_tokenizer
from .vision import VisionAdapter, load_vision
from .vision.inputs import ImageLimits

ENGINE_BATCH = 32  # requests the Python API's engine runs together (more are queued)


@dataclass
class LLM:
    """A model ready to use. ``llm.model(tokens[B, T]) -> logits[B, T, vocab]``.

    ``generate``, ``stream`` and ``chat`` run on one engine that this object keeps (``llm.engine()``), so its KV
    cache outlives a call: a prompt that starts like an earlier one (the same system prompt, a chat's earlier
    turns) reuses the cached prefix instead of computing it again."""

    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str = ""
    format: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    vision: VisionAdapter | None = None  # an image model's image side (``llamaforge.vision``)
    image_limits: ImageLimits = field(default_factory=ImageLimits)  # what generate/chat accept as images
    _engine: Engine | None = field(default=None, init=False, repr=False, compare=False)
    _engine_key: tuple = field(default=(), init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: this checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def engine(self, *, compile: bool = False, draft: LLM | None = None, speculative: str | None = None,
               num_speculative: int | None = None, max_batch: int = ENGINE_BATCH,
               cache_type: str | None = None) -> Engine:  # fmt: skip
        """The engine behind ``generate/stream/chat``, built on first use and kept while these settings stay the
        same (and the weights are not moved or replaced). An engine that is busy (a stream still open) is left
        alone: the call gets a fresh one for itself.

        `draft`: speculative decoding with this smaller model (same tokenizer); `speculative="ngram"`: with
        prompt lookup, no second model; `num_speculative`: draft tokens per step (default 4 with a draft, 3
        with prompt lookup); `cache_type`: the KV cache's "float32", "float16", "bfloat16" or "q8_0" (default: the
        model's dtype, float16 for float32 models with quantized weights)."""
        if speculative not in (None, "ngram", "draft"):
            raise ValueError(f"speculative must be 'ngram' or None (or pass draft=), got {speculative!r}")
        key = (compile, id(draft.model) if draft is not None else None, speculative, num_speculative, max_batch,
               id(self.tokenizer), cache_type)  # fmt: skip
        engine = self._engine
        reusable = engine is not None and key == self._engine_key and engine.step_fn.is_current(self.model)
        if reusable and engine.idle:  # type: ignore[union-attr]
            return engine  # type: ignore[return-value]
        step = engine.step_fn if reusable else None  # a busy engine: share its step (fused weights), not its cache
        if speculative == "draft" and draft is None:
            raise ValueError("speculative='draft' needs draft=<a smaller LLM with the same tokenizer>")
        speculator = inference.make_speculator(self, draft, speculative == "ngram", num_speculative)
        fresh = Engine(self, max_batch=max_batch, compile=compile, preallocate=False, speculator=speculator, step=step,
                       cache_dtype=cache_type)  # fmt: skip
        if not reusable or engine is None:
            self._engine, self._engine_key = fresh, key
        return fresh

    def embed(self, texts: Any, pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
        """Embeddings [N, dim] of texts (or token-id lists): the final hidden states, pooled ("mean" or "last")
        and L2-normalized; see ``llamaforge.embeddings``."""
        from .embeddings import embed

        return embed(self, texts, pooling=pooling, normalize=normalize)

    def clear_cache(self) -> None:
        """Drop the engine and its KV cache (with every prefix it holds), e.g. to free the memory for training."""
        self._engine, self._engine_key = None, ()

    def generate(self, prompt: Any, *, images: list[Any] | None = None, compile: bool = False,
                 draft: LLM | None = None, speculative: str | None = None, num_speculative: int | None = None,
                 max_batch: int = ENGINE_BATCH, cache_type: str | None = None,
                 **options: Any) -> Completion | list[Completion]:  # fmt: skip
        """Complete `prompt` (text or token ids), or a list of prompts together (a list of Completions).
        Options: the fields of ``SamplingParams`` and one output constraint (``json_schema=``, ``json_object=True``,
        ``regex=``, ``choice=[...]``, ``grammar=`` GBNF or Lark; ``llamaforge.inference.generate``); see ``engine``
        for the rest. `images` (an image model's; paths, bytes, data: URIs, PIL images): one per image token in
        the prompt (``llm.vision.image_token``), or, when it has none, in front of it (``inference.image_prompt``)."""
        engine = self.engine(compile=compile, draft=draft, speculative=speculative, num_speculative=num_speculative,
                             max_batch=max_batch, cache_type=cache_type)  # fmt: skip
        if images:
            prompt, images = self._image_prompt(prompt, images)
        return inference.generate(engine, prompt, images=images, **options)

    def stream(self, prompt: Any, *, images: list[Any] | None = None, compile: bool = False,
               **options: Any) -> Iterator[str]:  # fmt: skip
        """Yield the completion of `prompt` piece by piece (complete UTF-8) as it is generated."""
        if images:
            prompt, images = self._image_prompt(prompt, images)
        return inference.stream(self.engine(compile=compile), prompt, images=images, **options)

    def _image_prompt(self, prompt: Any, images: list[Any]) -> tuple[list[int], list[Any]]:
        from .inference.generate import is_batch

        if is_batch(prompt):
            raise ValueError("images go with one prompt: give a batch of prompts without images, or one prompt")
        return inference.image_prompt(self.tokenizer, prompt, self.vision, images, self.image_limits)

    def stream_events(self, prompt: Any, params: inference.SamplingParams | None = None, *,
                      compile: bool = False) -> Iterator[inference.Event]:  # fmt: skip
        """The events of one request (token ids, text, logprobs, finish_reason); closing the iterator cancels it."""
        return inference.stream_events(self.engine(compile=compile), prompt, params)

    def chat(self, messages: list[dict[str, Any]], *, images: list[Any] | None = None, stream: bool = False,
             **options: Any) -> Completion | Iterator[Any]:  # fmt: skip
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) in the model's chat format; ``stream=True``
        yields text pieces instead. Earlier turns come from the engine's prefix cache. With ``tools=[...]`` (and
        ``tool_choice``, ``parallel_tool_calls``, ``tool_format``) the Completion's ``tool_calls`` holds the calls
        the model made (``inference.chat_with_tools``; streamed as ``tools.Delta`` pieces).

        An image model takes images as content parts: ``{"type": "image", "image": <path | bytes | PIL image>}``
        (HF's), ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (OpenAI's), or bare
        ``{"type": "image"}`` parts filled from `images` in order (``inference.chat_prompt``)."""
        if any(options.get(k) is not None for k in inference.TOOL_OPTIONS):
            compile = options.pop("compile", False)
            if images:
                raise ValueError("with tools, give the images in the messages' image parts")
            return inference.chat_with_tools(self.engine(compile=compile), messages, stream=stream,
                                             image_limits=self.image_limits, **options)  # fmt: skip
        ids, loaded = inference.chat_prompt(self.require_tokenizer(), messages, self.vision, self.image_limits, images)
        if stream:
            return self.stream(ids, images=loaded, **options)
        return self.generate(ids, images=loaded, **options)

    def infill(self, prefix: str, suffix: str, *, suffix_first: bool = False, stream: bool = False,
               **options: Any) -> Completion | Iterator[str]:  # fmt: skip
        """Fill in the middle: the text that goes between `prefix` and `suffix` (Code Llama's ``<PRE> prefix
        <SUF>suffix <MID>`` prompt, or the FIM tokens the vocabulary declares; generation stops at ``<EOT>``).
        ``suffix_first``: Code Llama's suffix-prefix-middle order. Options: as ``generate``."""
        ids = inference.infill_prompt_ids(self.require_tokenizer(), prefix, suffix, suffix_first)
        if stream:
            return self.stream(ids, **options)
        return self.generate(ids, **options)


def resolve_source(source: str | os.PathLike) -> Path:
    """A local path as it is; otherwise a built-in model name or hub id, fetched into the cache."""
    from .hub import resolve_model

    path = Path(source).expanduser()
    if path.exists():
        return path
    return resolve_model(str(source))


def load(source: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
         quantize: str | None = None, adapter: str | os.PathLike | None = None, mmap: bool = False) -> LLM:  # fmt: skip
    """Load a model from a Hugging Face directory, a Meta directory, a GGUF file, a hub id or a built-in name.

    A quantized GGUF file (Q4_K_M, Q8_0, ...) runs in its own blocks, memory-mapped, as llama.cpp runs it
    (``quantize.GGUF_BLOCK_TYPES``); giving a ``dtype`` dequantizes its weights to that dtype instead (the memory
    that takes is printed first). Other checkpoints load in their own dtype unless ``dtype`` is given.
    ``quantize``: "int8", "int4" or "int4-g32/64/128" quantizes the weights on load; "gguf" keeps a GGUF file's
    blocks whatever ``dtype`` says (then the dtype of the activations). An image checkpoint (Llama 4 with its vision
    encoder) also loads its image side into ``llm.vision`` (``llamaforge.vision``). A directory written by
    ``llamaforge.quantize.save_quantized`` loads quantized as it was saved. ``adapter``: a LoRA adapter
    directory (PEFT or llamaforge layout) applied unmerged on top of the base. A model that cannot fit in the
    memory available is refused before loading (``memory.InsufficientMemoryError``, with the numbers).
    ``mmap=True``: a quantized GGUF's blocks stay memory-mapped instead of being read into memory (see
    ``quantize.load_gguf_quantized``).
    """
    from . import quantize as q
    from .memory import check_fits, format_bytes

    path = resolve_source(source)
    if q.is_quantized_dir(path):
        model, fmt = q.load_quantized(path, device=device), "quantized"
    elif quantize == "gguf" or (quantize is None and dtype is None and q.is_quantized_gguf(path)):
        check_fits(q.gguf_model_bytes(path), f"{path}")
        model, fmt = q.load_gguf_quantized(path, device=device, dtype=dtype or torch.float32, mmap=mmap), "gguf"
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
    vision = load_vision(path, model, tokenizer, dtype) if fmt == "hf" else None  # an image model's encoder
    return LLM(model=model, tokenizer=tokenizer, config=model.config, source=str(source), format=fmt, vision=vision)


def _load_tokenizer_if_present(path: Path) -> Tokenizer | None:
    try:
        return load_tokenizer(path)
    except FileNotFoundError:
        return None
