"""Limits that protect the server's machine from any one client: prompt length, tokens per request (``n`` x
``max_tokens``), concurrent streams per API key and chat-template render time (the request body size is checked
by the ASGI guard in ``api.py`` before anything is parsed). Each has a default and a ``serve`` flag; a request over
a limit gets a 4xx in OpenAI's error shape naming the limit, before any generation starts.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..chat import template_limits
from .openai import APIError, bad

MAX_PROMPT_TOKENS = None  # default: any prompt that fits the context (--max-seq-len)
MAX_REQUEST_TOKENS = 65536  # n x max_tokens of one request
MAX_STREAMS_PER_KEY = 16  # streaming responses open at once per API key (per client address without keys)
TEMPLATE_TIMEOUT = 2.0  # seconds a chat template may take to render


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int | None = MAX_PROMPT_TOKENS
    max_request_tokens: int = MAX_REQUEST_TOKENS
    max_streams_per_key: int = MAX_STREAMS_PER_KEY
    template_timeout: float = TEMPLATE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_request_tokens", "max_streams_per_key", "template_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def check_prompt(self, ids: list[int], param: str) -> None:
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise bad(f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens} "
                      "(--max-prompt-tokens)", param=param, code="prompt_too_long")  # fmt: skip

    def new_tokens(self, n: int, requested: int | None, room: int) -> int:
        """Tokens to generate per choice: the client's ``max_tokens`` capped to the context's `room` (a 400 when
        ``n`` x that is over the limit), or, when it gave none, as many as the context and the limit leave."""
        per_choice = room if requested is None else min(requested, room)
        if requested is not None and n * per_choice > self.max_request_tokens:
            raise bad(f"n x max_tokens = {n} x {per_choice} = {n * per_choice} tokens is more than this server "
                      f"generates for one request ({self.max_request_tokens}, --max-request-tokens)",
                      param="max_tokens", code="request_too_large")  # fmt: skip
        return min(per_choice, self.max_request_tokens // n)

    @contextmanager
    def templates(self) -> Iterator[None]:
        with template_limits(seconds=self.template_timeout):
            yield


class StreamCounter:
    """Streaming responses open per client key; thread-safe (a stream may end on the engine's callback path)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> None:
        with self._lock:
            if self._open.get(key, 0) >= self.limit:
                raise APIError(429, f"too many streams open at once for this API key (limit {self.limit}, "
                               "--max-streams-per-key); wait for one to finish", type="rate_limit_error",
                               code="too_many_streams")  # fmt: skip
            self._open[key] = self._open.get(key, 0) + 1

    def release(self, key: str) -> None:
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)

    def open(self, key: str | None = None) -> int:
        """Streams open under `key`, or under every key."""
        with self._lock:
            return sum(self._open.values()) if key is None else self._open.get(key, 0)

    def track(self, key: str, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """`stream`, counted as open under `key` (already acquired) until it ends, fails, is closed or is dropped
        unstarted (a client that leaves before the first chunk)."""
        return _Tracked(self, key, stream)


class _Tracked:
    def __init__(self, counter: StreamCounter, key: str, stream: AsyncIterator[str]) -> None:
        self.counter, self.key, self.stream, self.released = counter, key, stream, False

    def __aiter__(self) -> _Tracked:
        return self

    async def __anext__(self) -> str:
        try:
            return await self.stream.__anext__()
        except BaseException:  # StopAsyncIteration at the end, CancelledError when the client leaves
            self.release()
            raise

    async def aclose(self) -> None:
        self.release()
        aclose = getattr(self.stream, "aclose", None)
        if aclose is not None:
            await aclose()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.counter.release(self.key)

    def __del__(self) -> None:
        self.release()


def client_key(headers: Any, client: Any) -> str:
    """Whom a request counts against: its bearer token (hashed: no key is kept in memory as sent), or the client's
    address when it sent none."""
    given = headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"addr:{client.host if client is not None else 'unknown'}"
