"""Inference: the KV cache, sampling, the one engine, step selection and speculative decoding.

- ``cache.py``: ``PagedKVCache`` (blocks, block tables, automatic prefix reuse) and the view a forward takes;
- ``sampling.py``: ``SamplingParams`` and the batched logits processors;
- ``step.py``: ``select_step`` (native kernels / compiled / eager), chosen once per engine;
- ``engine.py``: ``Engine`` (continuous batching), ``Completion`` and ``Event``;
- ``speculative.py``: draft proposers (``PromptLookup``, ``DraftModel``) verified inside the engine;
- ``prompt_cache.py``: saving a prompt's KV cache to a file and loading it back;
- ``prompts.py``: prompts into ids and the one prompt-fit check;
- ``generate.py``: the Python API's calls on an engine (what ``LLM.generate/stream/chat`` run).

Nothing here imports ``llamaforge.llm``: an engine takes any object with ``model`` and ``tokenizer``.
"""

from .cache import BLOCK_SIZE, PagedKVCache, PagedView, Sequence
from .engine import (
    PREFILL_BUDGET,
    PREFILL_CHUNK,
    Completion,
    Engine,
    Event,
    StopStringMatcher,
    TokenLogprob,
    TopLogprob,
)
from .generate import TOOL_OPTIONS, chat_with_tools, generate, stream, stream_events
from .prompt_cache import PromptCacheError, load_prompt_cache, save_prompt_cache
from .prompts import (
    PromptTooLongError,
    chat_prompt,
    chat_prompt_ids,
    chat_prompt_sources,
    check_fits,
    encode_prompt,
    image_prompt,
    infill_prompt_ids,
    load_image_sources,
    prompt_ids,
    stop_token_ids,
)
from .sampling import SamplingBatch, SamplingParams, TokenHistory
from .speculative import DraftModel, PromptLookup, Speculator, make_speculator
from .step import FastForward, Step, select_step

__all__ = [
    "BLOCK_SIZE",
    "PREFILL_BUDGET",
    "PREFILL_CHUNK",
    "TOOL_OPTIONS",
    "Completion",
    "DraftModel",
    "Engine",
    "Event",
    "FastForward",
    "PagedKVCache",
    "PagedView",
    "PromptCacheError",
    "PromptLookup",
    "PromptTooLongError",
    "SamplingBatch",
    "SamplingParams",
    "Sequence",
    "Speculator",
    "Step",
    "StopStringMatcher",
    "TokenHistory",
    "TokenLogprob",
    "TopLogprob",
    "chat_prompt",
    "chat_prompt_ids",
    "chat_prompt_sources",
    "chat_with_tools",
    "check_fits",
    "encode_prompt",
    "generate",
    "image_prompt",
    "infill_prompt_ids",
    "load_image_sources",
    "load_prompt_cache",
    "make_speculator",
    "prompt_ids",
    "save_prompt_cache",
    "select_step",
    "stop_token_ids",
    "stream",
    "stream_events",
]
