"""The one generation loop: an engine that the Python API, the CLI and the server all drive.

Python API (what ``LLM.generate/stream/chat`` call)::

    generate(llm, prompt, **options) -> Completion          # prompt: str | list[int]
    generate(llm, [p1, p2, ...], **options) -> list[Completion]   # a batch, generated together
    stream(llm, prompt, **options) -> Iterator[str]          # complete UTF-8 pieces as they come
    chat(llm, messages, **options) -> Completion             # in the model's chat format

``options`` are the fields of ``sampling.SamplingParams`` (max_new_tokens, temperature (0 = greedy),
top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stop, stop_token_ids,
ignore_eos, logprobs, prompt_logprobs) plus ``compile`` (torch.compile the decode step), ``draft`` and
``num_speculative`` (speculative decoding with a smaller model that shares the tokenizer).

Engine (continuous batching; the server builds on this)::

    engine = Engine(llm, max_batch=8, max_seq_len=2048, compile=False, prefill_budget=512)
    handle = engine.add(prompt_ids, SamplingParams(...))   # queued; takes a free slot at the next step
    events = engine.step()      # queued requests take free slots; prompts are prefilled together, up to
                                # prefill_budget tokens per step (a prompt that completes samples its
                                # first token); every request already running decodes one token
    engine.cancel(handle)       # frees the slot at once; the next step reports finish_reason="cancelled"
    engine.has_work             # anything queued or running

Each ``Event`` carries the request's new token ids, the new text (complete UTF-8, with text that might
begin a stop string held back until resolved), their logprobs when asked for, and ``finish_reason``
("stop", "length" or "cancelled") on the request's last event. With ``prompt_logprobs=N`` the request's
first event also carries ``prompt_logprobs``: for each prompt token, its logprob given the ones before it
and the top N alternatives (None for the first token), from the prefill's own hidden states. A request
that finishes leaves its slot in the same step, and a queued one takes it at the next.

How the engine runs the model: one static KV cache of ``max_batch`` rows (``model.setup_caches``; in
float16 for float32 models with quantized weights, see ``quantize.kv_cache_dtype``); a request owns a row
(its slot) while it runs. Each step prefills the waiting prompts in one forward: the
rows are right-padded to a common length T, each at its own positions (a pad's cache entry lies past the
row's last real token, so the row's real token overwrites it before anything attends to it; pad queries
are ignored), with B x T <= ``prefill_budget`` and at most ``prefill_chunk`` tokens of one prompt per
step. A long prompt is thus prefilled over several steps, between which the running requests keep
decoding. Output logits are computed for each completed prompt's last position only (and for every
position of a request that asked for prompt logprobs). Decode steps batch every running slot with
per-row positions, and attend over the used part of the cache only (``cache_len``
rounded up to a multiple of 256, so a compiled step recompiles rarely). Sampling stays on the device;
each step reads the sampled tokens back once, for the stop checks.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .model import Transformer
from .quantize import kv_cache_dtype
from .sampling import SamplingBatch, SamplingParams, TokenHistory, sample_from_probs, token_logprobs

if TYPE_CHECKING:
    from .llm import LLM

CACHE_ROUND = 256  # cache_len granularity: attention reads only the used part of the cache
PREFILL_CHUNK = 512  # at most this many tokens of one prompt per forward
PREFILL_BUDGET = 512  # at most this many (padded) prompt tokens per engine step
_SCORE_ROWS = 128  # prompt logprobs: positions per output-head call (bounds the [rows, vocab] logits)
_DETOK_CONTEXT = 6  # prompt tokens kept as context for the incremental detokenizer


# Results ---------------------------------------------------------------------------------------------
@dataclass
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    """The model's log-probability of the chosen token (before sampling adjustments) and the top-N."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # new tokens only; a final stop token is included, its text is not
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs
    tool_calls: list[Any] | None = None  # chat with tools: the calls the model made (llamaforge.tools.ToolCall)


@dataclass
class Event:
    handle: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# Text assembly -----------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that are always complete UTF-8.

    It decodes a short window (a few earlier tokens as context, so that tokenizers which drop a leading
    space at the start of a decode still produce it) and emits the new part once it no longer ends in
    an incomplete character (U+FFFD).
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self.decode = decode
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is left, invalid bytes included (as U+FFFD)."""
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else ""


class _PrimedDecoder:
    """The tokenizer's own incremental decoder, primed with the prompt's last tokens (their text is
    dropped) so that the first new token keeps its leading space."""

    def __init__(self, tokenizer: Any, context: Sequence[int]) -> None:
        self.inner = tokenizer.decoder(skip_special=True)
        for t in context:
            self.inner.add(t)

    def add(self, token_id: int) -> str:
        return self.inner.add(token_id)

    def flush(self) -> str:
        return self.inner.flush()


def make_detokenizer(tokenizer: Any, context: Sequence[int] = ()) -> IncrementalDetokenizer | _PrimedDecoder:
    """The tokenizer's incremental decoder when it has one (llamaforge tokenizers), else a generic one."""
    if hasattr(tokenizer, "decoder"):
        return _PrimedDecoder(tokenizer, context)
    return IncrementalDetokenizer(tokenizer.decode, context)


class StopStringMatcher:
    """Finds stop strings in streamed text, even across pieces; holds back any tail that could still
    become one, and never emits the stop string or anything after it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""

    def push(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0 if final else self._longest_partial(buf)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def _longest_partial(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


# One request's state -------------------------------------------------------------------------------------
class _Request:
    def __init__(self, handle: int, prompt_ids: list[int], params: SamplingParams, max_len: int,
                 tokenizer: Any, stop_ids: set[int], device: torch.device) -> None:  # fmt: skip
        self.handle = handle
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = params.make_generator(device)
        self.max_new = min(params.max_new_tokens, max_len - len(prompt_ids))
        self.stop_ids = set() if params.ignore_eos else set(stop_ids)
        self.stop_ids.update(params.stop_token_ids)
        self.tokenizer = tokenizer
        self.detok = make_detokenizer(tokenizer, prompt_ids[-_DETOK_CONTEXT:]) if tokenizer else None
        self.stops = StopStringMatcher(params.stop)
        self.output_ids: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self.prefilled = 0  # prompt tokens already in the cache
        self.slot: int | None = None
        self.finish_reason: str | None = None

    @property
    def next_pos(self) -> int:  # where the last sampled token goes in the cache
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def accept(self, token: int) -> str:
        """Record a sampled token; returns the text it releases and sets finish_reason when done."""
        self.output_ids.append(token)
        if token in self.stop_ids:
            piece, final, self.finish_reason = self._flush(), True, "stop"
        else:
            piece = self.detok.add(token) if self.detok else ""
            final = len(self.output_ids) >= self.max_new
            if final:
                piece += self._flush()
        text, stopped = self.stops.push(piece, final=final)
        if stopped:
            self.finish_reason = "stop"
        elif final and self.finish_reason is None:
            self.finish_reason = "length"
        self.text_parts.append(text)
        return text

    def _flush(self) -> str:
        return self.detok.flush() if self.detok else ""

    def completion(self) -> Completion:
        return Completion(text="".join(self.text_parts), token_ids=list(self.output_ids),
                          finish_reason=self.finish_reason or "length", prompt_tokens=len(self.prompt_ids),
                          logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs)  # fmt: skip


def _logprob_entries(tokenizer: Any, tokens: Tensor, lp: tuple[Tensor, Tensor, Tensor],
                     counts: Sequence[int | None]) -> list[TokenLogprob | None]:  # fmt: skip
    chosen, top_v, top_i = (t.tolist() for t in lp)
    ids = tokens.tolist()

    def text(i: int) -> str:
        return tokenizer.decode([i]) if tokenizer is not None else ""

    out: list[TokenLogprob | None] = []
    for row, n in enumerate(counts):
        if n is None:
            out.append(None)
            continue
        top = [TopLogprob(t, text(t), v) for t, v in zip(top_i[row][:n], top_v[row][:n])]
        out.append(TokenLogprob(ids[row], text(ids[row]), chosen[row], top))
    return out


# Model plumbing -------------------------------------------------------------------------------------------
def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


_DECODE_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_fn(model: Transformer, compile: bool = False) -> Callable[..., Tensor]:
    """The forward used for decode steps, built once per model: the model itself, or torch.compile of it
    (``LLAMAFORGE_COMPILE_MODE`` picks the mode). On GPU the default is "reduce-overhead": a decode step is
    hundreds of small kernels, and replaying them as CUDA graphs is what makes batch-1 decoding fast (on an
    H100, SmolLM2-135M went from 32 to 486 tokens/s; benchmarks/RESULTS.md). The batch dimension is left
    to automatic dynamic shapes there, so requests joining and leaving do not recompile at every new size."""
    if not compile:  # on CPU: fused projections and a lean single-query attention (llamaforge/fast.py)
        from .fast import prepare_for_inference

        return prepare_for_inference(model) if model.tok_embeddings.weight.device.type == "cpu" else model
    fns = _DECODE_FNS.setdefault(model, {})
    if "compiled" not in fns:
        on_gpu = model.tok_embeddings.weight.device.type == "cuda"
        mode = os.environ.get("LLAMAFORGE_COMPILE_MODE") or ("reduce-overhead" if on_gpu else None)
        fns["compiled"] = torch.compile(model, mode=mode, fullgraph=False, dynamic=None if on_gpu else False)
    return fns["compiled"]


def prefill(model: Transformer, ids: Sequence[int], slot: int, start: int = 0, chunk: int = PREFILL_CHUNK,
            max_seq_len: int | None = None) -> Tensor:  # fmt: skip
    """Write `ids` into cache row `slot` at positions start.. in chunks; returns the last position's
    logits [1, V] (output logits are computed for that position only)."""
    device = model.tok_embeddings.weight.device
    limit = max_seq_len or model.cache_shape[1]
    rows = None if slot == 0 else torch.tensor([slot], device=device)
    hidden = None
    for s in range(0, len(ids), chunk):
        part = ids[s : s + chunk]
        tokens = torch.tensor([part], dtype=torch.long, device=device)
        pos = torch.arange(start + s, start + s + len(part), device=device)
        cache_len = min(round_up(start + s + len(part), CACHE_ROUND), limit)
        hidden = model(tokens, pos, rows=rows, cache_len=cache_len, return_hidden=True)
    assert hidden is not None, "prefill needs at least one token"
    return model.output(hidden[:, -1]).float()


def stop_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's end-of-turn/end-of-text ids."""
    if tokenizer is None:
        return set()
    for name in ("stop_ids", "stop_token_ids"):
        ids = getattr(tokenizer, name, None)
        if ids:
            return {int(i) for i in ids}
    eos = getattr(tokenizer, "eos_id", None)
    return {int(eos)} if eos is not None and eos >= 0 else set()


# The engine ------------------------------------------------------------------------------------------------
class Engine:
    """Continuous batching over a static KV cache; see the module docstring for the API."""

    def __init__(self, llm: LLM | Transformer, max_batch: int = 8, max_seq_len: int | None = None, *,
                 compile: bool = False, prefill_chunk: int = PREFILL_CHUNK, prefill_budget: int = PREFILL_BUDGET,
                 tokenizer: Any = None) -> None:  # fmt: skip
        model = llm if isinstance(llm, Transformer) else llm.model
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None or isinstance(llm, Transformer) else llm.tokenizer
        self.config = model.config
        context = self.config.max_seq_len
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1 or prefill_budget < 1:
            raise ValueError(f"prefill_chunk and prefill_budget must be >= 1, got {prefill_chunk}, {prefill_budget}")
        self.max_seq_len = min(round_up(max_seq_len or context, CACHE_ROUND), context)
        self.max_batch = max_batch
        self.compile = compile
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.device = model.tok_embeddings.weight.device
        model.setup_caches(max_batch, self.max_seq_len, kv_cache_dtype(model))
        self._cache = model.layers[0].attention.kv_cache
        self._decode = decode_fn(model, compile)
        # CUDA graphs are recorded per batch size: pad decode batches to powers of two so that requests
        # joining one by one make a handful of graphs, not one per size.
        self._pad_batch = compile and self.device.type == "cuda"
        self.stop_ids = stop_token_ids(self.tokenizer)
        # A model's embedding may be padded past the tokenizer's vocabulary: never sample those ids.
        tok_vocab = getattr(self.tokenizer, "vocab_size", None)
        self._vocab_limit = tok_vocab if tok_vocab and tok_vocab < self.config.vocab_size else None
        self.slots: list[_Request | None] = [None] * max_batch
        self.waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []  # hold a slot, prompt not all in the cache yet; in arrival order
        self.requests: dict[int, _Request] = {}
        self._handles = itertools.count()
        self._pending_events: list[Event] = []
        self._batch_key: tuple[int, ...] | None = None
        self._batch: SamplingBatch | None = None
        self._seen: Tensor | None = None  # [max_batch, V] bool, allocated when a request uses penalties
        self._counts: Tensor | None = None

    # Public API -----------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots) or bool(self._pending_events)

    @property
    def idle(self) -> bool:
        return not self.has_work

    def add(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its handle. Raises ValueError when the prompt cannot fit."""
        params = params or SamplingParams()
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if len(ids) >= self.max_seq_len:
            limit = self.max_seq_len if self.max_seq_len < self.config.max_seq_len else self.config.max_seq_len
            raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room to generate in the "
                             f"context of {limit} tokens")  # fmt: skip
        handle = next(self._handles)
        req = _Request(handle, ids, params, self.max_seq_len, self.tokenizer, self.stop_ids, self.device)
        self.requests[handle] = req
        self.waiting.append(req)
        return handle

    def cancel(self, handle: int) -> None:
        """Stop a request now; its slot is free for the next step, which reports it as cancelled."""
        req = self.requests.get(handle)
        if req is None or req.finish_reason is not None:
            return
        req.finish_reason = "cancelled"
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        self._pending_events.append(Event(handle, [], "", [] if req.logprobs is not None else None, "cancelled"))

    def result(self, handle: int) -> Completion:
        """The completion of a request (complete once its last event was seen); forgets the request."""
        return self.requests.pop(handle).completion()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return encode_prompt(self.tokenizer, text)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Give queued requests free slots, prefill waiting prompts together (up to ``prefill_budget``
        tokens; a prompt that completes samples its first token), then decode one token for every request
        that was already generating."""
        if self.model.layers[0].attention.kv_cache is not self._cache:
            raise RuntimeError("another engine has replaced this model's KV cache; create a new Engine")
        events, self._pending_events = self._pending_events, []
        running = [r for r in self.slots if r is not None and r.output_ids]
        self._admit()
        events += self._prefill_step()
        if running:
            events += self._decode_step(running)
        return events

    def run(self, handles: Sequence[int] | None = None) -> list[Completion]:
        """Step until the given requests (default: all) are finished; returns their completions."""
        handles = list(self.requests) if handles is None else list(handles)
        todo = set(handles)
        while todo:
            for ev in self.step():
                if ev.finished:
                    todo.discard(ev.handle)
        return [self.result(h) for h in handles]

    # Internals ----------------------------------------------------------------------------------------
    def _release(self, req: _Request) -> None:
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        req.slot = None

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            req.slot = self.slots.index(None)
            self.slots[req.slot] = req
            self._prefilling.append(req)

    def _plan_prefill(self) -> list[tuple[_Request, int]]:
        """The rows of this step's prefill forward: (request, tokens it writes now). Rows are padded to the
        widest, so B rows of width T must fit the budget: B * T <= prefill_budget. The oldest prompt always
        takes part (none starves); the others go shortest first, as a prompt that completes gets its first
        token at the end of the step. The width is the one that completes the most prompts, then writes the
        most tokens."""
        budget = self.prefill_budget
        chunk = min(self.prefill_chunk, budget)
        oldest, *others = self._prefilling
        order = [oldest, *sorted(others, key=lambda r: len(r.prompt_ids) - r.prefilled)]
        left = [len(r.prompt_ids) - r.prefilled for r in order]
        best: tuple[tuple[int, int, int], int, int] | None = None
        for width in {min(n, chunk) for n in left} | {min(budget // b, chunk) for b in range(1, len(order) + 1)}:
            B = min(len(order), budget // width)
            parts = [min(n, width) for n in left[:B]]
            key = (sum(p == n for p, n in zip(parts, left)), sum(parts), width)
            if best is None or key > best[0]:
                best = (key, B, width)
        assert best is not None
        _, B, width = best
        return [(req, min(n, width)) for req, n in zip(order[:B], left)]

    def _prefill_step(self) -> list[Event]:
        self._prefilling = [r for r in self._prefilling if r.slot is not None]  # drop cancelled ones
        if not self._prefilling:
            return []
        plan = self._plan_prefill()
        B, T = len(plan), max(n for _, n in plan)
        tokens = torch.zeros(B, T, dtype=torch.long)
        for i, (req, n) in enumerate(plan):
            tokens[i, :n] = torch.tensor(req.prompt_ids[req.prefilled : req.prefilled + n])
        # Each row at its own positions; its pads go on past its last real token (clamped to the cache, where a
        # prompt never reaches), where the row's real tokens overwrite them before anything attends to them.
        starts = torch.tensor([req.prefilled for req, _ in plan])
        pos = (starts[:, None] + torch.arange(T)).clamp(max=self.max_seq_len - 1)
        slots = [req.slot for req, _ in plan]
        rows = None if slots == list(range(B)) else torch.tensor(slots, device=self.device)
        cache_len = min(round_up(int(pos.max()) + 1, CACHE_ROUND), self.max_seq_len)
        hidden = self.model(tokens.to(self.device), pos.to(self.device), rows=rows, cache_len=cache_len,
                            return_hidden=True)  # fmt: skip
        done: list[int] = []
        for i, (req, n) in enumerate(plan):
            if req.prompt_logprobs is not None:
                self._score_prompt(req, hidden[i, :n])
            req.prefilled += n
            if req.prefilled == len(req.prompt_ids):
                done.append(i)
        if not done:
            return []
        self._prefilling = [r for r in self._prefilling if r.prefilled < len(r.prompt_ids)]
        reqs = [plan[i][0] for i in done]
        last = torch.tensor([plan[i][1] - 1 for i in done], device=self.device)
        # The output head only for the last position of each completed prompt.
        logits = self._mask_padding(self.model.output(hidden[torch.tensor(done, device=self.device), last]).float())
        batch = SamplingBatch.build([r.params for r in reqs], [r.generator for r in reqs], self.device)
        history = None
        if batch.needs_history:
            seen, counts = self._history_buffers()
            for req in reqs:
                seen[req.slot] = False
                counts[req.slot] = 0
                seen[req.slot, torch.tensor(req.prompt_ids, device=self.device)] = True
            rows_done = torch.tensor([r.slot for r in reqs], device=self.device)
            history = TokenHistory(seen[rows_done], counts[rows_done])
        token = batch.sample(_apply_processors(reqs, logits), history)
        events = self._emit(reqs, token, logits, batch)
        for req, ev in zip(reqs, events):
            ev.prompt_logprobs = req.prompt_logprobs
        return events

    def _score_prompt(self, req: _Request, hidden: Tensor) -> None:
        """Append the prompt logprobs of the tokens that this chunk's positions predict (hidden [n, D] at
        positions prefilled..prefilled+n-1; the last prompt position predicts the first new token instead)."""
        start, top_n = req.prefilled, req.params.prompt_logprobs
        m = min(len(hidden), len(req.prompt_ids) - 1 - start)
        for a in range(0, m, _SCORE_ROWS):
            b = min(a + _SCORE_ROWS, m)
            logits = self._mask_padding(self.model.output(hidden[a:b]).float())
            targets = torch.tensor(req.prompt_ids[start + a + 1 : start + b + 1], device=self.device)
            lp = token_logprobs(logits, targets, top_n)
            req.prompt_logprobs += _logprob_entries(self.tokenizer, targets, lp, [top_n] * (b - a))

    def _decode_step(self, running: list[_Request]) -> list[Event]:
        running = sorted(running, key=lambda r: r.slot)
        slots = [r.slot for r in running]
        B = len(running)
        last = [r.output_ids[-1] for r in running]
        positions = [r.next_pos for r in running]
        cache_len = min(round_up(max(positions) + 1, CACHE_ROUND), self.max_seq_len)
        padded = min(1 << (B - 1).bit_length(), self.max_batch) if self._pad_batch else B
        if padded > B:  # extra rows repeat the first one: they rewrite its cache entry with the same values
            slots, last, positions = (v + v[:1] * (padded - B) for v in (slots, last, positions))
        tokens = torch.tensor(last, dtype=torch.long, device=self.device).view(padded, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(padded, 1)
        contiguous = slots == list(range(padded))
        rows = None if contiguous else torch.tensor(slots, device=self.device)
        logits = self._decode(tokens, pos, rows=rows, cache_len=cache_len)[:B, -1].float()
        logits = self._mask_padding(logits)
        contiguous = slots[:B] == list(range(B))
        rows = None if contiguous else rows[:B]
        batch = self._sampling_batch(running)
        history = None
        if batch.needs_history:
            seen, counts = self._history_buffers()
            history = TokenHistory(seen[:B], counts[:B]) if contiguous else TokenHistory(seen[rows], counts[rows])
        token = batch.sample(_apply_processors(running, logits), history)
        return self._emit(running, token, logits, batch)

    def _emit(self, reqs: list[_Request], token: Tensor, logits: Tensor, batch: SamplingBatch) -> list[Event]:
        if self._seen is not None and batch.needs_history:
            rows = torch.tensor([r.slot for r in reqs], device=self.device)
            self._seen[rows, token] = True
            self._counts.index_put_((rows, token), torch.ones_like(token, dtype=torch.float32), accumulate=True)
        entries: list[TokenLogprob | None] = [None] * len(reqs)
        if batch.max_logprobs is not None:
            lp = token_logprobs(logits, token, batch.max_logprobs)
            entries = _logprob_entries(self.tokenizer, token, lp, [r.params.logprobs for r in reqs])
        events = []
        for req, tok, entry in zip(reqs, token.tolist(), entries):  # the step's one read-back
            text = req.accept(tok)
            if entry is not None:
                req.logprobs.append(entry)
            events.append(Event(req.handle, [tok], text, None if entry is None else [entry], req.finish_reason))
            if req.finish_reason is not None:
                self._release(req)
        return events

    def _mask_padding(self, logits: Tensor) -> Tensor:
        if self._vocab_limit is not None:
            logits[:, self._vocab_limit :] = float("-inf")
        return logits

    def _sampling_batch(self, running: list[_Request]) -> SamplingBatch:
        key = tuple(r.handle for r in running)
        if key != self._batch_key:
            self._batch = SamplingBatch.build([r.params for r in running], [r.generator for r in running],
                                              self.device)  # fmt: skip
            self._batch_key = key
        return self._batch

    def _history_buffers(self) -> tuple[Tensor, Tensor]:
        if self._seen is None:
            V = self.config.vocab_size
            self._seen = torch.zeros(self.max_batch, V, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(self.max_batch, V, dtype=torch.float32, device=self.device)
        return self._seen, self._counts


def _apply_processors(reqs: list[_Request], logits: Tensor) -> Tensor:
    """Logits [B, V] after each request's own ``params.logits_processors`` (a copy; logprobs keep the raw ones).

    A processor with an ``apply_batch`` function (grammar constraints) is applied together with the others of
    its kind: ``apply_batch([(row, processor, output_ids), ...], logits) -> logits``, one pass for the batch."""
    if not any(r.params.logits_processors for r in reqs):
        return logits
    logits = logits.clone()
    batched: dict[Any, list[tuple[int, Any, list[int]]]] = {}
    for i, req in enumerate(reqs):
        for proc in req.params.logits_processors:
            apply_batch = getattr(type(proc), "apply_batch", None)
            if apply_batch is not None:
                batched.setdefault(apply_batch, []).append((i, proc, req.output_ids))
            else:
                logits[i] = proc(req.output_ids, logits[i])
    for apply_batch, items in batched.items():
        logits = apply_batch(items, logits)
    return logits


# Prompts --------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A plain-text prompt's ids, with a BOS token when the tokenizer's model expects one."""
    add_bos = getattr(tokenizer, "add_bos_default", None)
    if add_bos is None:
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, bos=bool(add_bos) and tokenizer.bos_id is not None))


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], **render: Any) -> list[int]:
    """A conversation in the model's chat format, ending with the assistant's turn header (`render`: options
    of ``chat.render_chat`` such as ``tools``)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it has no chat format")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
    if hasattr(tokenizer, "encode_chat"):  # encodes part by part, as the format's reference does
        return list(tokenizer.encode_chat(messages, add_generation_prompt=True, **render))
    formatted = tokenizer.format_chat(messages, add_generation_prompt=True, **render)
    if isinstance(formatted, str):  # rendered text: its special tokens are real ones
        return list(tokenizer.encode(formatted, allow_special=True))
    return list(formatted)


def prompt_ids(llm: LLM, prompt: str | Sequence[int]) -> list[int]:
    """A prompt's token ids: text is encoded with the model's tokenizer, ids are checked and kept."""
    if isinstance(prompt, str):
        return encode_prompt(llm.require_tokenizer(), prompt)
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def check_fits(llm: LLM, ids: list[int]) -> list[int]:
    """Raise a clear ValueError (before any cache is allocated) when a prompt leaves no room to generate."""
    context = llm.config.max_seq_len
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room to generate in the "
                         f"context of {context} tokens")  # fmt: skip
    return ids


def _is_batch(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not all(isinstance(t, int) for t in prompt)


# The registry of engines, one per model, reused by generate() while it is large enough ------------------------
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(llm: LLM, batch: int, seq_len: int, compile: bool = False) -> Engine:
    """An idle engine for `llm` with room for `batch` requests of `seq_len` tokens (reused across calls)."""
    engine = _ENGINES.get(llm.model)
    cache = llm.model.layers[0].attention.kv_cache
    reusable = (
        engine is not None and engine.idle and engine.max_batch >= batch and engine.max_seq_len >= seq_len
        and engine.compile == compile and engine._cache is cache and engine.tokenizer is llm.tokenizer
    )  # fmt: skip
    if not reusable:
        engine = Engine(llm, max_batch=batch, max_seq_len=seq_len, compile=compile)
        _ENGINES[llm.model] = engine
    return engine


def _params(options: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**options)
    except TypeError as exc:
        raise ValueError(f"unknown generation option: {exc}") from exc


# Public functions ---------------------------------------------------------------------------------------------
Prompt = str | Sequence[int]


def generate(llm: LLM, prompt: Prompt | Sequence[Prompt], *, compile: bool = False, draft: LLM | None = None,
             num_speculative: int = 4, max_batch: int = 32,
             **options: Any) -> Completion | list[Completion]:  # fmt: skip
    """Complete one prompt (text or token ids) or a batch of them (a list of prompts -> a list of
    Completions, generated together, at most `max_batch` at a time). Options: see ``SamplingParams``, and
    the output constraints of ``llamaforge.guided`` (json_schema, json_object, regex, choice, grammar)."""
    from .guided import request_params

    make_params = request_params(llm, options)
    params = make_params()
    batched = _is_batch(prompt)
    prompts = [prompt_ids(llm, p) for p in (prompt if batched else [prompt])]
    for ids in prompts:
        check_fits(llm, ids)
    if draft is not None:
        if params.logits_processors:
            raise ValueError("speculative decoding (draft=) does not support output constraints")
        results = [speculative_generate(llm, draft, ids, params, num_speculative) for ids in prompts]
        return results if batched else results[0]
    with torch.inference_mode():
        context = llm.config.max_seq_len
        need = min(max(len(p) for p in prompts) + params.max_new_tokens, context)
        engine = engine_for(llm, max(1, min(len(prompts), max_batch)), need, compile)
        handles = [engine.add(p, make_params()) for p in prompts]
        results = engine.run(handles)
    return results if batched else results[0]


def stream(llm: LLM, prompt: str | Sequence[int], *, compile: bool = False, **options: Any) -> Iterator[str]:
    """Yield the completion of one prompt as text pieces (complete UTF-8) as they are generated."""
    from .guided import request_params

    return _stream_ids(llm, prompt_ids(llm, prompt), request_params(llm, options)(), compile)


def _stream_ids(llm: LLM, ids: list[int], params: SamplingParams, compile: bool) -> Iterator[str]:
    events = stream_events(llm, ids, params, compile=compile)
    return (ev.text for ev in events if ev.text)


def stream_events(llm: LLM, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                  compile: bool = False) -> Iterator[Event]:  # fmt: skip
    """The events of one request as they come (text, token ids, logprobs; the last one carries the
    finish_reason). Closing the iterator early cancels the request."""
    params = params or SamplingParams()
    ids = check_fits(llm, prompt_ids(llm, prompt))
    need = min(len(ids) + params.max_new_tokens, llm.config.max_seq_len)
    engine = engine_for(llm, 1, need, compile)
    handle = engine.add(ids, params)  # errors surface here, before the first next()
    return _events(engine, handle)


def _events(engine: Engine, handle: int) -> Iterator[Event]:
    try:
        done = False
        while not done:
            for ev in engine.step():
                if ev.handle == handle:
                    done = ev.finished
                    yield ev
    finally:
        engine.cancel(handle)  # a no-op when finished; frees the slot when the consumer stopped early
        engine.requests.pop(handle, None)
        engine._pending_events = [e for e in engine._pending_events if e.handle != handle]


def chat(llm: LLM, messages: list[dict[str, Any]], *, stream: bool = False,
         **options: Any) -> Completion | Iterator[Any]:  # fmt: skip
    """Answer a conversation in the model's chat format; ``stream=True`` yields text pieces instead. With
    ``tools`` (and ``tool_choice``, ``parallel_tool_calls``, ``tool_format``) see ``guided.chat_with_tools``."""
    from .guided import TOOL_OPTIONS, chat_with_tools, request_params

    if any(options.get(k) is not None for k in TOOL_OPTIONS):
        return chat_with_tools(llm, messages, stream=stream, **options)
    ids = chat_prompt_ids(llm.require_tokenizer(), messages)
    if stream:
        compile = options.pop("compile", False)
        return _stream_ids(llm, ids, request_params(llm, options)(), compile)
    return generate(llm, ids, **options)


# Speculative decoding ------------------------------------------------------------------------------------------
@torch.inference_mode()
def speculative_generate(llm: LLM, draft: LLM, prompt_ids: list[int], params: SamplingParams,
                         num_speculative: int = 4) -> Completion:  # fmt: skip
    """Generate with a draft model proposing `num_speculative` tokens that the target checks in one
    forward pass (Leviathan et al. 2023). Accepting a draft token with probability min(1, p/q) and
    otherwise sampling from max(0, p - q) leaves the target's distribution unchanged; for greedy requests
    p and q are one-hot, so the output is exactly the target's greedy output."""
    target, small = llm.model, draft.model
    if small.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({small.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}); they must share a tokenizer")  # fmt: skip
    if params.uses_penalties:
        raise ValueError("speculative decoding does not support repetition/presence/frequency penalties")
    if params.prompt_logprobs is not None:
        raise ValueError("speculative decoding does not support prompt_logprobs")
    if num_speculative < 1:
        raise ValueError(f"num_speculative must be >= 1, got {num_speculative}")
    k = num_speculative
    context = min(target.config.max_seq_len, small.config.max_seq_len)
    length = min(round_up(len(prompt_ids) + params.max_new_tokens + k + 1, CACHE_ROUND), context)
    for model in (target, small):
        model.setup_caches(1, length, kv_cache_dtype(model))
    device = target.tok_embeddings.weight.device
    if len(prompt_ids) >= length:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, which leaves no room to generate in the "
                         f"context of {context} tokens")  # fmt: skip
    req = _Request(0, list(prompt_ids), params, length, llm.tokenizer, stop_token_ids(llm.tokenizer), device)
    gens = [req.generator]
    one = SamplingBatch.build([params], gens, device)
    verify = {n: SamplingBatch.build([params] * n, [None] * n, device) for n in range(1, k + 2)}

    tok_vocab = getattr(llm.tokenizer, "vocab_size", None)
    limit = tok_vocab if tok_vocab and tok_vocab < target.config.vocab_size else None

    def masked(logits: Tensor) -> Tensor:  # never propose or sample ids the tokenizer lacks
        if limit is not None:
            logits[..., limit:] = float("-inf")
        return logits

    def take(token: int, logits: Tensor) -> bool:
        if req.logprobs is not None:
            t = torch.tensor([token], device=device)
            entry = _logprob_entries(llm.tokenizer, t, token_logprobs(logits, t, params.logprobs), [params.logprobs])
            req.logprobs.append(entry[0])
        req.accept(token)
        return req.finish_reason is not None

    logits = masked(prefill(target, prompt_ids, 0, max_seq_len=length))
    prefill(small, prompt_ids, 0, max_seq_len=length)
    draft_valid = len(prompt_ids)  # the draft's cache holds positions < draft_valid
    done = take(int(one.sample(logits)[0]), logits)
    while not done:
        seq = req.prompt_ids + req.output_ids
        S = len(seq)
        n_draft = max(0, min(k, req.max_new - len(req.output_ids) - 1, length - S))
        drafts: list[int] = []
        qs = []
        feed = seq[draft_valid:]
        for _ in range(n_draft):
            d_logits = masked(prefill(small, feed, 0, start=draft_valid, max_seq_len=length))
            draft_valid += len(feed)
            q = one.probs(d_logits)
            d = int(sample_from_probs(q, gens)[0]) if not params.greedy else int(q.argmax())
            drafts.append(d)
            qs.append(q[0])
            feed = [d]
        tokens = torch.tensor([[seq[-1], *drafts]], device=device)
        pos = torch.arange(S - 1, S + n_draft, device=device)
        t_logits = masked(target(tokens, pos, cache_len=min(round_up(S + n_draft, CACHE_ROUND), length))[0].float())
        p = verify[n_draft + 1].probs(t_logits)
        accepted = 0
        if n_draft:
            idx = torch.tensor(drafts, device=device)
            q_all = torch.stack(qs)
            p_d = p[:n_draft].gather(-1, idx[:, None])[:, 0]
            q_d = q_all.gather(-1, idx[:, None])[:, 0]
            u = torch.rand(n_draft, generator=req.generator, device=device) if req.generator else 0.0
            ok = (u * q_d < p_d).tolist()  # accept with probability min(1, p/q)
            while accepted < n_draft and ok[accepted]:
                accepted += 1
        for i in range(accepted):
            if take(drafts[i], t_logits[i : i + 1]):
                done = True
                break
        if done:
            break
        if accepted < n_draft:  # rejected: sample from the residual max(0, p - q)
            residual = (p[accepted] - qs[accepted]).clamp(min=0)
            dist = residual if float(residual.sum()) > 0 else p[accepted]
            nxt = _pick(dist, req.generator, params.greedy)
        else:  # all accepted: the target's own next token comes free
            nxt = _pick(p[n_draft], req.generator, params.greedy)
        done = take(nxt, t_logits[accepted : accepted + 1])
        draft_valid = min(draft_valid, S + accepted)
    return req.completion()


def _pick(dist: Tensor, generator: torch.Generator | None, greedy: bool) -> int:
    if greedy:
        return int(dist.argmax())
    return int(sample_from_probs((dist / dist.sum())[None], [generator])[0])
