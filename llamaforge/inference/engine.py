"""The one generation loop: an engine that the Python API, the CLI and the server all drive.

    engine = Engine(llm, max_batch=8, max_seq_len=2048, prefill_budget=512)
    handle = engine.add(prompt_ids, SamplingParams(...))   # queued; admitted when a slot and cache blocks are free
    events = engine.step()      # admitted prompts are prefilled together, up to prefill_budget tokens per step (a
                                # prompt that completes samples its first token); every request already running
                                # decodes one token (or several, verified drafts, with a speculator)
    engine.cancel(handle)       # frees its slot and cache blocks at once; the next step reports "cancelled"
    engine.has_work             # anything queued or running

Each ``Event`` carries the request's new token ids, the new text (complete UTF-8, with text that might begin a
stop string held back until resolved), their logprobs when asked for, and ``finish_reason`` ("stop", "length"
or "cancelled") on the request's last event. With ``prompt_logprobs=N`` the request's first event also carries
``prompt_logprobs``: for each prompt token, its logprob given the ones before it and the top N alternatives
(None for the first token), from the prefill's own hidden states.

The engine owns its KV cache (``inference.cache.PagedKVCache``: blocks of ``block_size`` tokens, a block table per
request, automatic prefix reuse) and its step (``inference.step.select_step``: native kernels, compiled or eager,
chosen once and logged); the model keeps no state. A request is admitted when a slot is free and the cache can
promise every block it may need (prompt + max_new_tokens); its longest cached prefix of full blocks is reused
and only the rest is prefilled. Until then it waits in the queue: a full cache delays requests, it never fails
one. Finished requests leave their full blocks registered for later prompts that start the same way; they are
evicted least recently used first. ``cache_memory`` bounds the cache in bytes (default: ``max_batch`` requests
of ``max_seq_len`` tokens).

Each step prefills the waiting prompts in one forward: rows right-padded to a common length T, each at its own
positions (padding writes to the scratch block or past the row's last token, where its real tokens overwrite
it before anything attends to it), with B x T <= ``prefill_budget`` and at most ``prefill_chunk`` tokens of one
prompt per step, so a long prompt is prefilled over several steps between which running requests keep
decoding. Output logits are computed for each completed prompt's last position only (and for every position
of a request that asked for prompt logprobs). Decode steps batch every running request at its own position.
With a ``speculator`` (``inference.speculative``), the decode step verifies each request's draft tokens in the
same forward. Sampling stays on the device; each step reads the sampled tokens back once, for the stop checks.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..model import Transformer
from ..quantize import kv_cache_dtype
from ..tokenizer import Tokenizer
from ..vision import Image, ImageState, VisionAdapter, cache_keys
from .cache import BLOCK_SIZE, PagedKVCache, Sequence
from .prompts import check_fits, check_ids, encode_prompt, stop_token_ids
from .sampling import SamplingBatch, SamplingParams, TokenHistory, sample_from_probs, token_logprobs
from .speculative import Draft, Speculator
from .step import Step, select_step

log = logging.getLogger("llamaforge.inference")

# Prompt tokens per forward: the activations of a forward are its largest transient memory (at 512 tokens a 1B
# model's peak RSS is ~70 MB higher than at 256), and above ~128 rows the matmuls run at full speed anyway.
PREFILL_CHUNK = 256  # at most this many tokens of one prompt per forward
PREFILL_BUDGET = 256  # at most this many (padded) prompt tokens per engine step
_SCORE_ROWS = 128  # prompt logprobs: positions per output-head call (bounds the [rows, vocab] logits)
_DETOK_CONTEXT = 6  # prompt tokens that prime the incremental detokenizer
GROW_FROM = 1024  # tokens a growing (not preallocated) cache starts with; it doubles as requests need


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
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
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


class StopStringMatcher:
    """Finds stop strings in streamed text, even across pieces; holds back any tail that could still
    become one, and never emits the stop string or anything after it."""

    def __init__(self, stops: Seq[str]) -> None:
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
                 tokenizer: Tokenizer | None, stop_ids: set[int], device: torch.device,
                 images: ImageState | None = None) -> None:  # fmt: skip
        self.handle = handle
        self.prompt_ids = prompt_ids
        self.images = images  # what the model's vision adapter prepared for this request's images
        self.params = params
        self.generator = params.make_generator(device)
        self.max_new = min(params.max_new_tokens, max_len - len(prompt_ids))
        self.stop_ids = set() if params.ignore_eos else set(stop_ids)
        self.stop_ids.update(params.stop_token_ids)
        self.detok = tokenizer.decoder(skip_special=True, context=prompt_ids[-_DETOK_CONTEXT:]) if tokenizer else None
        self.stops = StopStringMatcher(params.stop)
        self.output_ids: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self.seq: Any = None  # its cache.Sequence once admitted
        self.prefilled = 0  # prompt tokens in the cache (reused or computed)
        self.cached_tokens = 0  # of which came from the prefix cache
        self.slot: int | None = None
        self.speculate = False  # drafts are proposed for it
        self.finish_reason: str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def cache_ids(self, ids: list[int]) -> list[Any]:
        """The prefix-cache keys of `ids` (this request's tokens): image requests key their images too."""
        return ids if self.images is None else cache_keys(ids, self.images)

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
                          logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
                          cached_tokens=self.cached_tokens)  # fmt: skip


def _logprob_entries(tokenizer: Tokenizer | None, tokens: Tensor, lp: tuple[Tensor, Tensor, Tensor],
                     counts: Seq[int | None]) -> list[TokenLogprob | None]:  # fmt: skip
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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# The engine ------------------------------------------------------------------------------------------------
class Engine:
    """Continuous batching over a paged KV cache with prefix reuse; see the module docstring for the API."""

    def __init__(self, llm: Any, max_batch: int = 8, max_seq_len: int | None = None, *, compile: bool = False,
                 prefill_chunk: int = PREFILL_CHUNK, prefill_budget: int = PREFILL_BUDGET,
                 tokenizer: Tokenizer | None = None, cache_memory: int | None = None, prefix_caching: bool = True,
                 block_size: int = BLOCK_SIZE, cache_dtype: torch.dtype | str | None = None, preallocate: bool = True,
                 speculator: Speculator | None = None, step: Step | None = None) -> None:  # fmt: skip
        """`llm`: an ``LLM`` (its model and tokenizer) or a bare ``Transformer`` (then pass `tokenizer` or use ids).

        `cache_memory`: bytes for the KV cache (default: room for `max_batch` requests of `max_seq_len` tokens);
        `preallocate`: allocate it now (a server) or grow it as requests need (the Python API's engine).
        `cache_dtype`: a torch dtype or "q8_0" (``cache.CACHE_TYPES``); default float16 for float32 models with
        quantized weights, else the model's dtype."""
        model = llm if isinstance(llm, Transformer) else llm.model
        self.model = model
        self.vision: VisionAdapter | None = getattr(llm, "vision", None)  # an image model's image side
        self.tokenizer = tokenizer if tokenizer is not None or isinstance(llm, Transformer) else llm.tokenizer
        self.config = model.config
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1 or prefill_budget < 1:
            raise ValueError(f"prefill_chunk and prefill_budget must be >= 1, got {prefill_chunk}, {prefill_budget}")
        context = self.config.max_seq_len
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_batch = max_batch
        self.compile = compile
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.device = model.tok_embeddings.weight.device
        dtype = cache_dtype or kv_cache_dtype(model)
        ref = model.tok_embeddings.weight.dtype
        dtype = dtype or (ref if ref.is_floating_point else torch.float32)
        per_token = PagedKVCache.bytes_per_token(model, dtype)
        if cache_memory is not None:
            limit = int(cache_memory) // per_token
            if limit < block_size:
                raise ValueError(f"cache_memory of {cache_memory} bytes holds {limit} tokens of this model's KV cache "
                                 f"({per_token} bytes per token); give at least {block_size * per_token}")  # fmt: skip
        else:
            limit = max_batch * self.max_seq_len
        self.cache_limit = _round_up(limit, block_size)  # tokens the cache may hold
        self.max_seq_len = min(self.max_seq_len, self.cache_limit)
        # A growing cache starts at one modest request's worth: a model's whole context (128K tokens for Llama 3.1)
        # would be gigabytes that a short generation never touches.
        first = self.cache_limit if preallocate else min(self.cache_limit, GROW_FROM)
        self.cache = PagedKVCache.for_model(model, first, block_size=block_size, dtype=dtype,
                                            prefix_caching=prefix_caching)  # fmt: skip
        self.step_fn = step or select_step(model, compile, block_size)
        # CUDA graphs are recorded per batch size: pad decode batches to powers of two so that requests joining
        # one by one make a handful of graphs, not one per size. Padding rows read and write the scratch block.
        self._pad_batch = self.step_fn.name == "compiled" and self.device.type == "cuda"
        self._static_pools()
        self.speculator = speculator
        if speculator is not None:
            log.info("llamaforge: speculative decoding = %s", speculator.describe())
        self.stop_ids = stop_token_ids(self.tokenizer)
        # A model's embedding may be padded past the tokenizer's vocabulary: never sample those ids.
        tok_vocab = self.tokenizer.vocab_size if self.tokenizer is not None else None
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
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "drafted": 0, "accepted": 0}
        self.fingerprints: dict[str, str] = {}  # model and tokenizer identity, for prompt-cache files
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # each slot's last request, prompt+output

    # Public API -----------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots) or bool(self._pending_events)

    @property
    def idle(self) -> bool:
        return not self.has_work

    @property
    def step_name(self) -> str:
        return self.step_fn.name

    def add(self, prompt: str | Seq[int], params: SamplingParams | None = None,
            images: Seq[Image] | None = None) -> int:  # fmt: skip
        """Queue a request; returns its handle. Raises ValueError when the prompt cannot fit, or when `images`
        (one per image placeholder of the prompt, in order; ``llamaforge.vision``) do not suit this model."""
        params = params or SamplingParams()
        # The token table may have rows past the vocabulary for prompt-only tokens (Mllama's <|image|>).
        ids = check_ids(self.encode(prompt) if isinstance(prompt, str) else prompt, self.config.token_rows)
        state = None
        if images:
            if self.vision is None:
                raise ValueError("this model takes no images (it has no vision encoder)")
            state = self.vision.prepare(ids, images)  # encodes the images once, expands their placeholders
            ids = state.prompt_ids
        check_fits(ids, self.max_seq_len)
        handle = next(self._handles)
        req = _Request(handle, ids, params, self.max_seq_len, self.tokenizer, self.stop_ids, self.device, state)
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

    def forget(self, handle: int) -> None:
        """Cancel a request if it still runs and drop everything the engine holds for it (events included)."""
        self.cancel(handle)
        self.requests.pop(handle, None)
        self._pending_events = [e for e in self._pending_events if e.handle != handle]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return encode_prompt(self.tokenizer, text)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit queued requests, prefill waiting prompts together (up to ``prefill_budget`` tokens; a prompt
        that completes samples its first token), then decode one token (or verified drafts) for every request
        that was already generating."""
        events, self._pending_events = self._pending_events, []
        running = [r for r in self.slots if r is not None and r.output_ids]
        self._admit()
        events += self._prefill_step()
        if running:
            events += self._decode_step(running)
        return events

    def run(self, handles: Seq[int] | None = None) -> list[Completion]:
        """Step until the given requests (default: all) are finished; returns their completions."""
        handles = list(self.requests) if handles is None else list(handles)
        todo = set(handles)
        while todo:
            for ev in self.step():
                if ev.finished:
                    todo.discard(ev.handle)
        return [self.result(h) for h in handles]

    def warm_up(self) -> None:
        """Run a short request through prefill and decode (builds the native kernels, compiles a compiled step)
        and forget its cache blocks."""
        handle = self.add([0, 1], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
        self.run([handle])
        self.cache.clear()

    # Internals ----------------------------------------------------------------------------------------
    def _release(self, req: _Request) -> None:
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            self.slot_tokens[req.slot] = req.all_ids
        req.slot = None
        if req.seq is not None:
            self.cache.release(req.seq)
            req.seq = None
        if req.speculate and self.speculator is not None:
            self.speculator.finish(req)
            req.speculate = False

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            req = self.waiting[0]
            need = len(req.prompt_ids) + req.max_new
            reuse = req.params.prompt_logprobs is None  # prompt logprobs need every position's hidden state
            keys = req.cache_ids(req.prompt_ids)
            seq = self.cache.admit(keys, need, reuse=reuse) if need <= self.cache.capacity else None
            if seq is None and self.cache.capacity < self.cache_limit:  # a growing cache: double it (at least)
                grown = max(2 * self.cache.capacity, self.cache.capacity + need)
                self.cache.grow(self.cache.blocks_for(min(grown, self.cache_limit)) + 1)
                self._static_pools()
                seq = self.cache.admit(keys, need, reuse=reuse)
            if seq is None:
                break  # the cache is busy: wait for running requests to leave
            self.waiting.popleft()
            req.seq, req.prefilled, req.cached_tokens = seq, seq.num_tokens, seq.reused
            self.stats["prompt_tokens"] += len(req.prompt_ids)
            self.stats["cached_tokens"] += seq.reused
            req.slot = self.slots.index(None)
            self.slots[req.slot] = req
            self._prefilling.append(req)
            if self.speculator is not None and self._can_speculate(req):
                req.speculate = self.speculator.start(req)

    def _static_pools(self) -> None:
        """A compiled step on a GPU replays CUDA graphs, which write the cache in place: its pools must keep fixed
        addresses, as a model's buffers do (otherwise the graphs are skipped for mutating their inputs)."""
        if self._pad_batch:
            torch._dynamo.mark_static_address(self.cache.k)
            torch._dynamo.mark_static_address(self.cache.v)

    @staticmethod
    def _can_speculate(req: _Request) -> bool:
        p = req.params
        return not p.uses_penalties and not p.logits_processors and req.images is None  # drafts cannot see images

    def _hidden(self, reqs: Seq[_Request], tokens: Tensor, pos: Tensor, view: Any) -> Tensor:
        """The step's hidden states for a batch, with the vision adapter's inputs when a request has images."""
        tokens, pos = tokens.to(self.device), pos.to(self.device)
        inputs: dict[str, Any] = {}
        if self.vision is not None and any(r.images is not None for r in reqs):
            states = [r.images for r in reqs] + [None] * (len(tokens) - len(reqs))  # padding rows have none
            inputs = self.vision.forward_inputs(states, tokens, pos)
        return self.step_fn.hidden(tokens, pos, view, **inputs)

    def _width(self, positions: Tensor) -> int:
        """Block-table width for a forward reaching `positions` (a multiple of the step's granularity)."""
        return _round_up(self.cache.blocks_for(int(positions.max()) + 1), self.step_fn.table_multiple)

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
            self.cache.ensure(req.seq, req.prefilled + n)
        # Each row at its own positions; its padding goes on past its last real token.
        pos = torch.tensor([req.prefilled for req, _ in plan])[:, None] + torch.arange(T)
        view = self.cache.view([req.seq for req, _ in plan], pos, self._width(pos))
        hidden = self._hidden([req for req, _ in plan], tokens, pos, view)
        done: list[int] = []
        for i, (req, n) in enumerate(plan):
            if req.prompt_logprobs is not None:
                self._score_prompt(req, hidden[i, :n])
            req.prefilled += n
            self.cache.commit(req.seq, req.cache_ids(req.prompt_ids), req.prefilled)
            if req.prefilled == len(req.prompt_ids):
                done.append(i)
        if not done:
            return []
        self._prefilling = [r for r in self._prefilling if r.prefilled < len(r.prompt_ids)]
        reqs = [plan[i][0] for i in done]
        last = torch.tensor([plan[i][1] - 1 for i in done], device=self.device)
        # The output head only for the last position of each completed prompt.
        logits = self._logits(hidden[torch.tensor(done, device=self.device), last])
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

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = self.step_fn.head(hidden).float()
        if self._vocab_limit is not None:
            logits[:, self._vocab_limit :] = float("-inf")
        return logits

    def _score_prompt(self, req: _Request, hidden: Tensor) -> None:
        """Append the prompt logprobs of the tokens that this chunk's positions predict (hidden [n, D] at
        positions prefilled..prefilled+n-1; the last prompt position predicts the first new token instead)."""
        start, top_n = req.prefilled, req.params.prompt_logprobs
        m = min(len(hidden), len(req.prompt_ids) - 1 - start)
        for a in range(0, m, _SCORE_ROWS):
            b = min(a + _SCORE_ROWS, m)
            logits = self._logits(hidden[a:b])
            targets = torch.tensor(req.prompt_ids[start + a + 1 : start + b + 1], device=self.device)
            lp = token_logprobs(logits, targets, top_n)
            req.prompt_logprobs += _logprob_entries(self.tokenizer, targets, lp, [top_n] * (b - a))

    def _decode_step(self, running: list[_Request]) -> list[Event]:
        running = sorted(running, key=lambda r: r.slot)
        drafts = self._propose(running)
        B, T = len(running), 1 + max(len(d.tokens) for d in drafts)
        tokens = torch.zeros(B, T, dtype=torch.long)
        for i, (req, d) in enumerate(zip(running, drafts)):
            row = [req.output_ids[-1], *d.tokens]
            tokens[i, : len(row)] = torch.tensor(row)
            self.cache.ensure(req.seq, req.next_pos + len(row))
        pos = torch.tensor([r.next_pos for r in running])[:, None] + torch.arange(T)
        seqs = [r.seq for r in running]
        padded = min(1 << (B - 1).bit_length(), self.max_batch) if self._pad_batch else B
        if padded > B:
            tokens = torch.cat([tokens, torch.zeros(padded - B, T, dtype=torch.long)])
            pos = torch.cat([pos, torch.arange(T).expand(padded - B, T)])
            seqs += [Sequence()] * (padded - B)
        view = self.cache.view(seqs, pos, self._width(pos))
        hidden = self._hidden(running, tokens, pos, view)[:B]
        plain = [i for i, d in enumerate(drafts) if not d.tokens]
        events = []
        if plain:
            reqs = [running[i] for i in plain]
            rows = torch.tensor(plain, device=self.device)
            logits = self._logits(hidden[rows, 0] if len(plain) < B else hidden[:, 0])
            batch = self._sampling_batch(reqs)
            history = None
            if batch.needs_history:
                seen, counts = self._history_buffers()
                slots = torch.tensor([r.slot for r in reqs], device=self.device)
                history = TokenHistory(seen[slots], counts[slots])
            token = batch.sample(_apply_processors(reqs, logits), history)
            events += self._emit(reqs, token, logits, batch)
        for i, d in enumerate(drafts):
            if d.tokens:
                events.append(self._verify(running[i], d, hidden[i, : 1 + len(d.tokens)]))
        return events

    def _propose(self, running: list[_Request]) -> list[Draft]:
        none = Draft([])
        if self.speculator is None:
            return [none] * len(running)
        spec = [r for r in running if r.speculate]
        if not spec:
            return [none] * len(running)
        limits = [min(self.speculator.num_tokens, r.max_new - len(r.output_ids) - 1) for r in spec]
        proposed = dict(zip((r.handle for r in spec), self.speculator.propose(spec, limits)))
        return [proposed.get(r.handle, none) for r in running]

    def _verify(self, req: _Request, draft: Draft, hidden: Tensor) -> Event:
        """Accept a prefix of the request's draft tokens from the target's logits at [last, d1 .. dn]."""
        n = len(draft.tokens)
        logits = self._logits(hidden)  # [n + 1, V]
        drafted = torch.tensor(draft.tokens, device=self.device)
        if req.params.greedy:
            target = logits.argmax(-1)
            matches = (target[:n] == drafted).tolist()
            accepted = next((j for j, ok in enumerate(matches) if not ok), n)
            nxt = int(target[accepted])
        else:
            p = SamplingBatch.build([req.params] * (n + 1), [None] * (n + 1), self.device).probs(logits)
            p_d = p[:n].gather(-1, drafted[:, None])[:, 0]
            q_d = torch.ones(n, device=self.device) if draft.probs is None else draft.probs.gather(
                -1, drafted[:, None])[:, 0]  # fmt: skip
            u = torch.rand(n, generator=req.generator, device=self.device)
            ok = (u * q_d < p_d).tolist()  # accept with probability min(1, p/q)
            accepted = next((j for j, good in enumerate(ok) if not good), n)
            if accepted < n:  # rejected: sample from the residual max(0, p - q)
                q = draft.probs[accepted] if draft.probs is not None else torch.nn.functional.one_hot(
                    drafted[accepted], p.shape[-1]).float()  # fmt: skip
                residual = (p[accepted] - q).clamp(min=0)
                dist = residual if float(residual.sum()) > 0 else p[accepted]
            else:
                dist = p[n]
            nxt = int(sample_from_probs((dist / dist.sum())[None], [req.generator])[0])
        self.stats["drafted"] += n
        self.stats["accepted"] += accepted
        new = [*draft.tokens[:accepted], nxt]
        entries: list[TokenLogprob | None] = []
        if req.logprobs is not None:
            toks = torch.tensor(new, device=self.device)
            lp = token_logprobs(logits[: len(new)], toks, req.params.logprobs)
            entries = _logprob_entries(self.tokenizer, toks, lp, [req.params.logprobs] * len(new))
        emitted, texts, lps = [], [], []
        for j, tok in enumerate(new):
            texts.append(req.accept(tok))
            emitted.append(tok)
            if entries:
                req.logprobs.append(entries[j])
                lps.append(entries[j])
            if req.finish_reason is not None:
                break
        self._commit_decoded(req)
        if req.speculate and self.speculator is not None:
            self.speculator.verified(req, n, accepted)
        event = Event(req.handle, emitted, "".join(texts), lps if req.logprobs is not None else None,
                      req.finish_reason)  # fmt: skip
        if req.finish_reason is not None:
            self._release(req)
        return event

    def _commit_decoded(self, req: _Request) -> None:
        """Positions before the newest token hold this request's keys and values now."""
        valid = req.next_pos
        if req.seq is None:
            return
        if valid // self.cache.block_size > len(req.seq.hashes):
            self.cache.commit(req.seq, req.cache_ids(req.all_ids), valid)
        else:
            req.seq.num_tokens = valid

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
            if len(req.output_ids) > 1:
                self._commit_decoded(req)
            events.append(Event(req.handle, [tok], text, None if entry is None else [entry], req.finish_reason))
            if req.finish_reason is not None:
                self._release(req)
        return events

    def _sampling_batch(self, reqs: list[_Request]) -> SamplingBatch:
        key = tuple(r.handle for r in reqs)
        if key != self._batch_key:
            self._batch = SamplingBatch.build([r.params for r in reqs], [r.generator for r in reqs], self.device)
            self._batch_key = key
        assert self._batch is not None
        return self._batch

    def _history_buffers(self) -> tuple[Tensor, Tensor]:
        if self._seen is None:
            V = self.config.vocab_size
            self._seen = torch.zeros(self.max_batch, V, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(self.max_batch, V, dtype=torch.float32, device=self.device)
        assert self._counts is not None
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
