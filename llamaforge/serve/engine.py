"""The server's bridge between asyncio and the shared generation engine (``llamaforge.generate.Engine``).

One background thread owns the engine: it takes commands (add, cancel, run a job) from a queue, then calls
``engine.step()`` - one decode step for every running request, with new requests prefilled and joining and
finished or cancelled ones leaving - and hands each step's events to the event loop in one callback. HTTP
handlers never touch the engine; they submit requests and read ``(tag, Event)`` pairs from an asyncio queue
(one per HTTP request, shared by its choices), so the model runs exactly one step at a time.

Admission is bounded: at most ``max_batch`` requests run and ``max_queue`` more wait; beyond that
``submit`` raises ``QueueFullError`` (the API answers 429) instead of letting memory grow. ``begin_shutdown``
stops admissions and gives running requests until a deadline to finish; what is left then is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..inference import Engine, Event, SamplingParams, TokenLogprob
from .metrics import Metrics

log = logging.getLogger("llamaforge.serve")


class QueueFullError(Exception):
    """More requests than running slots plus queue places."""


class ShuttingDownError(Exception):
    """The server is draining and takes no new requests."""


@dataclass(eq=False)
class Submission:
    """One generation (one choice of one HTTP request) as the event loop sees it."""

    tag: int
    sink: asyncio.Queue
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    handle: int | None = None  # set on the engine thread
    cancelled: bool = False
    finished: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    scoring: bool = False  # a prompt-scoring request (AsyncEngine.score): kept out of the generation metrics
    images: Sequence[Any] | None = None  # the request's images (vision.Image), one per placeholder in prompt_ids


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 64, metrics: Metrics | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.capacity = engine.max_batch + max_queue
        self.metrics = metrics or Metrics()
        self.accepting = True
        self.active = 0  # submitted and not yet finished (event loop only)
        self.running = 0  # snapshots written by the engine thread after each step
        self.waiting = 0
        self.tracked = 0  # requests the engine still holds state for (leak check)
        self._commands: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Condition()
        self._by_handle: dict[int, Submission] = {}  # engine thread only
        self._stop = False
        self._deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # Event-loop side ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="llamaforge-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not yet holding a slot."""
        return max(0, self.active - self.running)

    def submit(self, items: Sequence[tuple[list[int], SamplingParams]], sink: asyncio.Queue,
               images: Sequence[Any] | None = None) -> list[Submission]:  # fmt: skip
        """Queue generations (all or none); their events arrive on `sink` as (index in items, Event). `images`:
        the prompt's images (every item has the same prompt), prepared by the model's vision adapter on ``add``."""
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        if self.active + len(items) > self.capacity:
            self.metrics.rejected.inc()
            raise QueueFullError(
                f"the server is at capacity ({self.engine.max_batch} running, {self.max_queue} queued); retry later"
            )
        subs = [Submission(tag, sink, ids, params, images=images) for tag, (ids, params) in enumerate(items)]
        self.active += len(subs)
        self._send(*[("add", s) for s in subs])
        return subs

    def cancel(self, subs: Sequence[Submission]) -> None:
        """Stop these generations now (no-op for finished ones); their slots are freed at the next step."""
        live = [s for s in subs if not s.finished and not s.cancelled]
        for s in live:
            s.cancelled = True
        if live:
            self._send(*[("cancel", s) for s in live])

    async def score(self, prompts: Sequence[list[int]], top_n: int) -> list[list[TokenLogprob | None]]:
        """Each prompt's token logprobs given the tokens before it (None for the first) with the top `top_n`
        alternatives: what OpenAI's ``echo=True, logprobs=N`` returns for the prompt. They come from the engine's
        own prefill (one greedy token each, discarded), so the prompts are scored together with other arrivals,
        in budget-sized chunks between decode steps. Like a job, this is not held to the queue's capacity."""
        sink: asyncio.Queue = asyncio.Queue()
        params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=top_n)
        subs = [Submission(tag, sink, list(ids), params, scoring=True) for tag, ids in enumerate(prompts)]
        self.active += len(subs)
        self._send(*[("add", s) for s in subs])
        scored: list[list[TokenLogprob | None] | None] = [None] * len(subs)
        try:
            while any(s is None for s in scored):
                tag, ev = await sink.get()
                if isinstance(ev, BaseException):
                    raise ev
                if ev.prompt_logprobs is not None:
                    scored[tag] = ev.prompt_logprobs
                elif ev.finished:
                    raise RuntimeError(f"scoring the prompt ended early ({ev.finish_reason})")
            return scored  # type: ignore[return-value]
        finally:
            self.cancel(subs)

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between two steps (the engine is not thread-safe) and return
        its result (or raise its exception)."""
        assert self._loop is not None
        future: asyncio.Future = self._loop.create_future()
        self._send(("call", fn, future))
        return await future

    def begin_shutdown(self, drain_timeout: float) -> None:
        """Take no new requests; cancel whatever is still running after `drain_timeout` seconds."""
        self.accepting = False
        with self._wake:
            self._deadline = time.monotonic() + max(0.0, drain_timeout)
            self._wake.notify()

    async def stop(self, timeout: float = 10.0) -> None:
        self.accepting = False
        with self._wake:
            self._stop = True
            if self._deadline is None:
                self._deadline = time.monotonic()
            self._wake.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    def _send(self, *commands: tuple[Any, ...]) -> None:
        with self._wake:
            self._commands.extend(commands)
            self._wake.notify()

    def _dispatch(self, items: list[tuple[Submission, Event | BaseException]]) -> None:
        now = time.monotonic()
        m = self.metrics
        for sub, ev in items:
            if isinstance(ev, BaseException):
                sub.finished = True
                self.active -= 1
                if not sub.cancelled:
                    sub.sink.put_nowait((sub.tag, ev))
                continue
            if ev.token_ids and not sub.scoring:
                n = len(ev.token_ids)
                sub.tokens += n
                m.generation_tokens.inc(n)
                if sub.first_token_at is None:
                    sub.first_token_at = now
                    m.ttft.observe(now - sub.arrival)
                elif sub.last_token_at is not None:
                    m.itl.observe((now - sub.last_token_at) / n)
                sub.last_token_at = now
            if ev.finished:
                sub.finished = True
                self.active -= 1
                if not sub.scoring:
                    m.finished.inc(reason=ev.finish_reason or "")
                    m.e2e.observe(now - sub.arrival)
            if not sub.cancelled:
                sub.sink.put_nowait((sub.tag, ev))

    # Engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self.engine.has_work and not self._stop:
                    self._wake.wait(timeout=0.5)
                commands = list(self._commands)
                self._commands.clear()
                stop, deadline = self._stop, self._deadline
            out: list[tuple[Submission, Event | BaseException]] = []
            for command in commands:
                self._execute(command, out)
            if deadline is not None and time.monotonic() >= deadline:
                for sub in list(self._by_handle.values()):
                    self.engine.cancel(sub.handle)
            if self.engine.has_work:
                try:
                    events = self.engine.step()
                except Exception as exc:  # a failed step must not leave clients waiting forever
                    log.exception("engine step failed")
                    events = []
                    for handle, sub in list(self._by_handle.items()):
                        self.engine.cancel(handle)
                        out.append((sub, RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")))
                    with contextlib.suppress(Exception):
                        self.engine.step()  # flushes the cancellations
                    for handle in list(self._by_handle):
                        self._forget(handle)
                for ev in events:
                    sub = self._by_handle.get(ev.handle)
                    if sub is None:
                        continue
                    out.append((sub, ev))
                    if ev.finished:
                        self._forget(ev.handle)
            self.running = sum(s is not None for s in self.engine.slots)
            self.waiting = len(self.engine.waiting)
            self.tracked = len(self.engine.requests)
            if out:
                self._call_soon(self._dispatch, out)
            if stop and not self.engine.has_work and not self._commands:
                return

    def _execute(self, command: tuple[Any, ...], out: list) -> None:
        kind = command[0]
        if kind == "add":
            sub: Submission = command[1]
            if sub.cancelled:
                out.append((sub, Event(-1, [], "", None, "cancelled")))
                return
            try:
                sub.handle = self.engine.add(sub.prompt_ids, sub.params, images=sub.images)
            except Exception as exc:
                out.append((sub, exc))
                return
            self._by_handle[sub.handle] = sub
        elif kind == "cancel":
            sub = command[1]
            if sub.handle is not None and sub.handle in self._by_handle:
                self.engine.cancel(sub.handle)
        elif kind == "call":
            _, fn, future = command
            try:
                result, error = fn(self.engine), None
            except Exception as exc:  # handed to the awaiting request
                result, error = None, exc
            self._call_soon(_settle, future, result, error)

    def _forget(self, handle: int) -> None:
        self._by_handle.pop(handle, None)
        with contextlib.suppress(KeyError):
            self.engine.result(handle)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
