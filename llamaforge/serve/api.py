"""The OpenAI-compatible HTTP API's routes: ``create_app()`` builds the FastAPI application.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (with ``suffix``: fill in the middle),
``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``POST /infill`` (llama-server's code completion),
``POST /tokenize``, ``POST /detokenize``, ``GET /metrics``, the browser chat page at ``GET /`` (``webui.py``), and
with ``slot_save_path`` the prompt-cache actions ``GET /slots``, ``POST /slots/{id}?action=save|restore|erase``
(llama-server's). Chat takes OpenAI's ``tools`` (written in the model's own format, calls parsed back and streamed
as ``tool_calls`` deltas; ``tool_choice`` required or named forces a call whose arguments follow the schema), and
both completion routes take ``response_format`` and the grammar extensions. Requests are translated into engine
work by ``openai.py``; every error has OpenAI's shape,
validation errors become 400 naming the field, and errors found before generation (too-long prompt, bad values,
full queue) are returned before any streaming starts. An outer ASGI guard checks the API key and the body size before
anything else runs, and counts requests by route and status for /metrics.

The engine (its KV cache allocated, its step chosen, the native kernels built, one short request run) is
made in the loading thread: ``/health`` answers 503 until the first request would run at full speed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..constrain import Constrainer, GrammarError
from ..embeddings import embed_ids
from ..errors import ImageError
from ..inference import (
    PREFILL_BUDGET,
    Engine,
    PromptCacheError,
    SamplingParams,
    TokenLogprob,
    chat_prompt_sources,
    encode_prompt,
    infill_prompt_ids,
    load_image_sources,
    load_prompt_cache,
    make_speculator,
    save_prompt_cache,
)
from ..tokenizer import clean_text
from ..tools import ToolError, ToolPlan, ToolStream, check_messages, has_tool_calls
from ..vision.inputs import ImageLimits
from . import schemas as S
from .engine import AsyncEngine, QueueFullError, ShuttingDownError, Submission
from .limits import Limits, StreamCounter, client_key
from .metrics import CONTENT_TYPE, Metrics
from .openai import (
    APIError,
    bad,
    chat_logprobs,
    chat_messages,
    check_fits,
    check_ids,
    completion_logprobs,
    echo_logprobs,
    embedding_groups,
    embedding_inputs,
    encode_vector,
    grammar_for,
    sampling_params,
    tool_delta,
    tool_plan,
    validation_error,
)
from .webui import add_webui, is_page_path

log = logging.getLogger("llamaforge.serve")
ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/infill",
          "/tokenize", "/detokenize", "/metrics", "/slots")  # fmt: skip
SLOT_ACTIONS = ("save", "restore", "erase")
_FILENAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,200}")  # a plain file name inside --slot-save-path


@dataclass
class ServerConfig:
    model_name: str = "llamaforge"
    api_key: str | None = field(default=None, repr=False)  # never in a log line or traceback
    max_batch: int = 8
    max_queue: int = 64
    max_seq_len: int | None = 2048  # KV cache length per slot (None: the model's context)
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown
    compile: bool = False
    prefill_budget: int = PREFILL_BUDGET  # prompt tokens prefilled per engine step (between decode steps)
    cache_memory: int | None = None  # KV-cache bytes (None: max_batch requests of max_seq_len tokens)
    prefix_caching: bool = True  # reuse the cache of prompt prefixes that earlier requests computed
    speculative_ngram: bool = False  # prompt-lookup speculative decoding (a draft model: create_app(draft=...))
    num_speculative: int | None = None  # draft tokens per step (default 4 with a draft model, 3 with lookup)
    slot_save_path: str | None = None  # a directory: enables /slots save/restore of prompt caches
    cache_type: str | None = None  # KV-cache storage: float32 / float16 / bfloat16 / q8_0 (None: the model's)
    webui: bool = True  # the chat page at /
    tool_format: str | None = None  # Meta formats: "json" or "pythonic" tool calls (default: the family's own)
    limits: Limits = field(default_factory=Limits)  # prompt length, n x max_tokens, streams per key, template time
    # images in image_url parts: data: URIs (http(s) URLs with allow_urls), never a path on this machine
    image_limits: ImageLimits = field(default_factory=lambda: ImageLimits(allow_files=False))


# The guard: auth, body size, request metrics ------------------------------------------------------------
class _Guard:
    """Pure ASGI middleware (so streaming responses pass straight through)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            error = self._check_auth(scope, path)
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
            if error is not None:
                await error.response()(scope, receive, send_wrapper)
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_wrapper)
        finally:
            label = path if path in ROUTES else "other"
            self.state.metrics.requests.inc(endpoint=label, status=str(status["code"]))

    def _check_auth(self, scope: dict, path: str) -> APIError | None:
        key = self.state.config.api_key
        if not key or path == "/health" or (self.state.config.webui and is_page_path(path)):
            return None
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                        code="invalid_api_key")  # fmt: skip

    async def _read_body(self, scope: dict, receive: Callable) -> tuple[bytes, APIError | None]:
        limit = self.state.config.max_body_bytes
        too_big = APIError(413, f"the request body is larger than the limit of {limit} bytes",
                           code="request_too_large")  # fmt: skip
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


# Server state ---------------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.streams = StreamCounter(config.limits.max_streams_per_key)
        self.llm: Any = None
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.shutting_down = False
        m = self.metrics
        m.add_gauge("llamaforge_requests_running", "Generations holding a batch slot.",
                    lambda: self.engine.running if self.engine else 0)  # fmt: skip
        m.add_gauge("llamaforge_queue_depth", "Generations accepted and waiting for a slot.",
                    lambda: self.engine.queue_depth if self.engine else 0)  # fmt: skip
        m.add_gauge("llamaforge_requests_active", "Generations accepted and not finished.",
                    lambda: self.engine.active if self.engine else 0)  # fmt: skip
        m.add_gauge("llamaforge_slots_total", "Batch slots (max_batch).", lambda: config.max_batch)
        m.add_gauge("llamaforge_slots_free", "Batch slots not in use.",
                    lambda: config.max_batch - (self.engine.running if self.engine else 0))  # fmt: skip
        m.add_gauge("llamaforge_queue_capacity", "Places in the waiting queue (max_queue).", lambda: config.max_queue)
        m.add_gauge("llamaforge_engine_tracked_requests", "Requests the engine holds state for.",
                    lambda: self.engine.tracked if self.engine else 0)  # fmt: skip
        m.add_gauge("llamaforge_ready", "1 once the model is loaded and serving.", lambda: float(self.ready))

        def stat(fn: Callable[[Engine], float]) -> Callable[[], float]:
            return lambda: fn(self.engine.engine) if self.engine else 0

        m.add_gauge("llamaforge_kv_cache_blocks_total", "KV-cache blocks (scratch block excluded).",
                    stat(lambda e: e.cache.num_blocks - 1))  # fmt: skip
        m.add_gauge("llamaforge_kv_cache_blocks_used", "KV-cache blocks held by running requests.",
                    stat(lambda e: e.cache.num_used))  # fmt: skip
        m.add_gauge("llamaforge_kv_cache_blocks_cached", "Unused KV-cache blocks kept for prefix reuse.",
                    stat(lambda e: e.cache.num_cached))  # fmt: skip
        m.add_gauge("llamaforge_prefix_cache_query_tokens", "Prompt tokens admitted (counter).",
                    stat(lambda e: e.stats["prompt_tokens"]))  # fmt: skip
        m.add_gauge("llamaforge_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache (counter).",
                    stat(lambda e: e.stats["cached_tokens"]))  # fmt: skip
        m.add_gauge("llamaforge_spec_draft_tokens", "Speculative tokens proposed (counter).",
                    stat(lambda e: e.stats["drafted"]))  # fmt: skip
        m.add_gauge("llamaforge_spec_accepted_tokens", "Speculative tokens accepted (counter).",
                    stat(lambda e: e.stats["accepted"]))  # fmt: skip

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.shutting_down

    def build_engine(self, llm: Any, draft: Any = None) -> Engine:
        """The engine for a loaded model, warmed up (kernels built, one short request run): slow, so it runs in
        the loading thread."""
        c = self.config
        speculator = make_speculator(llm, draft, c.speculative_ngram, c.num_speculative)
        engine = Engine(llm, max_batch=c.max_batch, max_seq_len=c.max_seq_len, compile=c.compile,
                        prefill_budget=c.prefill_budget, cache_memory=c.cache_memory, prefix_caching=c.prefix_caching,
                        speculator=speculator, cache_dtype=c.cache_type)  # fmt: skip
        engine.warm_up()
        log.info("engine ready: step %s, %s KV cache of %d tokens in blocks of %d", engine.step_fn,
                 engine.cache.cache_type, engine.cache.capacity, engine.cache.block_size)  # fmt: skip
        return engine

    def attach(self, llm: Any, engine: Engine) -> None:
        """Serve `llm` on its built engine: start the engine's thread (on the event loop)."""
        self.llm = llm
        self.engine = AsyncEngine(engine, max_queue=self.config.max_queue, metrics=self.metrics)
        self.engine.start()

    def require_engine(self) -> AsyncEngine:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", type="service_unavailable", code="shutting_down")
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", type="service_unavailable",
                               code="load_failed")  # fmt: skip
            raise APIError(503, "the model is still loading; retry shortly", type="service_unavailable",
                           code="model_loading")  # fmt: skip
        return self.engine

    def tokenizer(self) -> Any:
        self.require_engine()
        tokenizer = self.llm.tokenizer
        if tokenizer is None:
            raise bad("this model has no tokenizer; send token ids as the prompt")
        return tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                           f"'{self.config.model_name}'.", param="model", code="model_not_found")  # fmt: skip

    def constrainer(self) -> Constrainer:
        """Grammars compiled for this model's vocabulary (built on first use: call it off the event loop)."""
        return Constrainer.for_tokenizer(self.tokenizer(), self.llm.config.vocab_size)

    def open_stream(self, request: Request) -> str:
        """Count a streaming response against its client's key (429 over --max-streams-per-key)."""
        key = client_key(request.headers, request.client)
        self.streams.acquire(key)
        return key

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        if self.engine is not None:
            self.engine.begin_shutdown(self.config.drain_timeout)


# Requests into engine work ---------------------------------------------------------------------------------
def _context_limit(state: ServerState) -> int:
    return state.require_engine().engine.max_seq_len


async def _prepare(state: ServerState, grammar: tuple[str, str] | None) -> None:
    """Compile the request's grammar (cached per grammar) off the event loop: the first one also reads the
    vocabulary, and a large schema takes a while."""
    if grammar is None:
        return
    try:
        await asyncio.to_thread(lambda: state.constrainer().compile(*grammar))
    except GrammarError as exc:
        raise bad(str(exc), param=exc.param) from None


def _params(state: ServerState, req: S._Sampling, max_new: int, logprobs: int | None, choice: int,
            grammar: tuple[str, str] | None = None) -> SamplingParams:  # fmt: skip
    constraint = state.constrainer().processor(*grammar) if grammar is not None else None  # one per choice
    return sampling_params(req, max_new, logprobs, choice, state.llm.config.vocab_size, constraint)


def _chat_ids(state: ServerState, messages: list[S.ChatMessage],
              plan: ToolPlan | None = None) -> tuple[list[int], list[Any]]:  # fmt: skip
    """The conversation's prompt ids and its images' sources (``_load_images`` loads them)."""
    chat = chat_messages(messages)
    options = plan.render_options if plan is not None else {}
    try:
        if plan is not None or has_tool_calls(chat):
            chat = check_messages(chat)
        with state.config.limits.templates():
            return chat_prompt_sources(state.tokenizer(), chat, state.llm.vision, state.config.image_limits, **options)
    except APIError:
        raise
    except ToolError as exc:
        raise bad(str(exc), param=exc.param) from None
    except ImageError as exc:
        raise bad(str(exc), param="messages", code="invalid_image") from None
    except ValueError as exc:
        raise bad(f"cannot format the conversation with the model's chat template: {exc}",
                   param="messages") from None  # fmt: skip


async def _load_images(state: ServerState, sources: list[Any]) -> list[Any] | None:
    """The request's images decoded off the event loop (a download or a large image takes a while); each bad one
    a 400 naming its message part and the problem."""
    if not sources:
        return None
    try:
        return await asyncio.to_thread(load_image_sources, sources, state.config.image_limits)
    except ImageError as exc:
        raise bad(str(exc), param="messages", code="invalid_image") from None


def _infill_ids(state: ServerState, prefix: str, suffix: str, param: str = "suffix") -> list[int]:
    try:
        return infill_prompt_ids(state.tokenizer(), prefix, suffix)
    except ValueError as exc:
        raise bad(str(exc), param=param) from None


# Results ---------------------------------------------------------------------------------------------------
class _Choice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None


async def _until_disconnected(request: Request) -> None:
    """Return when the client has gone away: after the body, the only message a request receives is
    ``http.disconnect`` (sent at once when the connection closes, so no polling is needed)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(engine: AsyncEngine, subs: list[Submission], sink: asyncio.Queue,
                   request: Request) -> list[_Choice]:  # fmt: skip
    """The choices' whole results; a client that leaves first cancels them in the engine (ConnectionError)."""
    choices = [_Choice() for _ in subs]
    left = len(subs)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        while left:
            get = asyncio.ensure_future(sink.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise ConnectionError("client disconnected")
            tag, ev = get.result()
            if isinstance(ev, BaseException):
                raise _engine_error(ev)
            c = choices[tag]
            c.text.append(ev.text)
            c.token_ids += ev.token_ids
            c.tokens += len(ev.token_ids)
            c.logprobs += ev.logprobs or []
            if ev.finished:
                c.finish_reason = ev.finish_reason
                left -= 1
        return choices
    finally:
        gone.cancel()
        engine.cancel(subs)


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, ValueError):
        return bad(str(exc))
    return APIError(500, str(exc), type="server_error")


def _submit(engine: AsyncEngine, items: list[tuple[list[int], SamplingParams]], sink: asyncio.Queue,
            state: ServerState | None = None, stream_key: str | None = None,
            images: list[Any] | None = None) -> list[Submission]:  # fmt: skip
    """Submit the choices; a refused submission gives back the stream place that `stream_key` holds."""
    submitted = False
    try:
        subs = engine.submit(items, sink, images)
        submitted = True
        return subs
    except QueueFullError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), type="service_unavailable", code="shutting_down") from None
    finally:
        if not submitted and stream_key is not None and state is not None:
            state.streams.release(stream_key)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


async def _stream(engine: AsyncEngine, subs: list[Submission], sink: asyncio.Queue,
                  render: Callable[[int, Any], Sequence[Any]], first: Sequence[Any], last: Callable[[], Any | None],
                  ) -> AsyncIterator[str]:  # fmt: skip
    """SSE lines: `first` chunks, one chunk per event (``render(tag, event)``), `last()`, then [DONE]."""
    try:
        for chunk in first:
            yield _sse(chunk)
        left = len(subs)
        while left:
            tag, ev = await sink.get()
            if isinstance(ev, BaseException):
                yield _sse(_engine_error(ev).body())
                break
            for chunk in render(tag, ev):
                yield _sse(chunk)
            if ev.finished:
                left -= 1
        final = last()
        if final is not None:
            yield _sse(final)
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: the generator is cancelled or closed
        engine.cancel(subs)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _EngineStream(StreamingResponse):
    """The SSE response of `subs`: however it ends (done, failed, or the client gone before the first chunk or
    mid-stream) its generations are cancelled in the engine and its stream place is given back at once. Starlette
    does not close a body iterator it stops reading, and never starts one when the response's first ``send`` fails
    (an ASGI 2.4 server's report of a client that left), so the generator's own ``finally`` cannot be relied on."""

    def __init__(self, engine: AsyncEngine, subs: list[Submission], content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=_SSE_HEADERS)
        self.engine, self.subs = engine, subs

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine.cancel(self.subs)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


# The application ---------------------------------------------------------------------------------------------
def create_app(config: ServerConfig | None = None, llm: Any = None, loader: Callable[[], Any] | None = None,
               draft: Any = None, draft_loader: Callable[[], Any] | None = None) -> FastAPI:  # fmt: skip
    """The API for `llm` (already loaded), or for the model `loader()` returns: it runs in a thread at startup,
    and /health answers 503 until it and the engine are ready. `draft` / `draft_loader()`: a smaller model with
    the same tokenizer for speculative decoding."""
    if (llm is None) == (loader is None):
        raise ValueError("give exactly one of llm= and loader=")
    config = config or ServerConfig()
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if llm is not None:
            state.attach(llm, state.build_engine(llm, draft))
        else:

            def load() -> None:
                try:
                    loaded = loader()
                    engine = state.build_engine(loaded, draft_loader() if draft_loader is not None else draft)
                except Exception as exc:  # reported by /health and every request
                    log.exception("loading the model failed")
                    state.load_error = f"{type(exc).__name__}: {exc}"
                    return
                loop.call_soon_threadsafe(_attach_or_fail, loaded, engine)

            def _attach_or_fail(loaded: Any, engine: Engine) -> None:
                try:
                    state.attach(loaded, engine)
                except Exception as exc:
                    log.exception("starting the engine failed")
                    state.load_error = f"{type(exc).__name__}: {exc}"

            threading.Thread(target=load, name="llamaforge-load", daemon=True).start()
        yield
        state.begin_shutdown()
        if state.engine is not None:
            await state.engine.stop(timeout=config.drain_timeout + 5)

    app = FastAPI(title="llamaforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ConnectionError):  # the client left while we waited; nobody reads this
            return APIError(499, "client closed the request", code="client_closed").response()
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "internal server error", type="server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        state.require_engine()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> S.ModelList:
        limit = state.engine.engine.max_seq_len if state.engine else None
        return S.ModelList(data=[S.ModelCard(id=config.model_name, created=S.now(), max_model_len=limit)])

    @app.get("/slots")
    async def slots() -> JSONResponse:
        engine = _slots_engine(state)

        def describe(e: Engine) -> list[dict[str, Any]]:
            return [{"id": i, "is_processing": e.slots[i] is not None, "n_ctx": e.max_seq_len,
                     "n_tokens": len(e.slots[i].all_ids if e.slots[i] is not None else e.slot_tokens[i])}
                    for i in range(e.max_batch)]  # fmt: skip

        return JSONResponse(await engine.call(describe))

    @app.post("/slots/{slot_id}")
    async def slot_action(slot_id: int, action: str | None = None, body: S.SlotRequest | None = None) -> JSONResponse:
        engine = _slots_engine(state)
        if action not in SLOT_ACTIONS:
            raise bad(f"action must be one of {', '.join(SLOT_ACTIONS)} (?action=...), got {action!r}", param="action")
        if not 0 <= slot_id < config.max_batch:
            raise bad(f"slot {slot_id} does not exist: slots are 0..{config.max_batch - 1}", param="id_slot")
        if action == "erase":

            def erase(e: Engine) -> int:
                tokens, e.slot_tokens[slot_id] = e.slot_tokens[slot_id], []
                e.cache.forget_prefix(tokens)
                return len(tokens)

            return JSONResponse({"id_slot": slot_id, "n_erased": await engine.call(erase)})
        name = body.filename if body is not None else None
        if not name or not _FILENAME.fullmatch(name):
            raise bad(f"filename must be a plain file name (letters, digits, '.', '_', '-'), got {name!r}",
                      param="filename")  # fmt: skip
        path = Path(config.slot_save_path or ".") / name
        start = time.perf_counter()
        if action == "save":

            def save(e: Engine) -> int:
                running = e.slots[slot_id]
                tokens = running.all_ids if running is not None else e.slot_tokens[slot_id]
                return save_prompt_cache(e, path, tokens) if tokens else 0

            saved = await engine.call(save)
            if not saved:
                raise bad(f"slot {slot_id} holds no cached prompt to save (none yet, shorter than a cache block, "
                          "or evicted)", param="id_slot")  # fmt: skip
            return JSONResponse({"id_slot": slot_id, "filename": name, "n_saved": saved,
                                 "n_written": path.stat().st_size,
                                 "timings": {"save_ms": (time.perf_counter() - start) * 1e3}})  # fmt: skip
        if not path.is_file():
            raise APIError(404, f"no prompt-cache file {name!r} in the slot save path", param="filename",
                           code="file_not_found")  # fmt: skip

        def restore(e: Engine) -> int:
            tokens = load_prompt_cache(e, path)
            e.slot_tokens[slot_id] = tokens
            return len(tokens)

        try:
            restored = await engine.call(restore)
        except PromptCacheError as exc:
            raise bad(str(exc), param="filename") from None
        return JSONResponse({"id_slot": slot_id, "filename": name, "n_restored": restored,
                             "n_read": path.stat().st_size,
                             "timings": {"restore_ms": (time.perf_counter() - start) * 1e3}})  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(body: S.TokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        tokenizer = state.tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise bad("give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids, _ = _chat_ids(state, body.messages)  # the placeholders of any images, as the prompt has them
        elif body.add_special_tokens:
            ids = encode_prompt(tokenizer, body.prompt)
        else:
            ids = tokenizer.encode(body.prompt)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": _context_limit(state)})

    @app.post("/detokenize")
    async def detokenize(body: S.DetokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        tokenizer = state.tokenizer()
        ids = check_ids(body.tokens, state.llm.config.vocab_size, "tokens") if body.tokens else []
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, request: Request) -> Any:
        state.check_model(body.model)
        engine = state.require_engine()
        if body.best_of is not None and body.best_of != body.n:
            raise bad("best_of is not supported (only best_of = n)", param="best_of")
        if body.suffix and body.echo:
            raise bad("echo cannot be used with suffix", param="echo")
        vocab = state.llm.config.vocab_size
        prompts: list[Any] = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(
            body.prompt[0], int) else [body.prompt]  # fmt: skip
        limit = _context_limit(state)
        encoded: list[tuple[list[int], str | None]] = []
        for p in prompts:
            if body.suffix:  # fill in the middle: the text between the prompt and the suffix
                if not isinstance(p, str):
                    raise bad("suffix needs a text prompt (the text before the middle), not token ids", param="suffix")
                encoded.append((check_ids(_infill_ids(state, p, body.suffix), vocab, "prompt"), p))
            elif isinstance(p, str):
                encoded.append((check_ids(encode_prompt(state.tokenizer(), p), vocab, "prompt"), p))
            else:
                encoded.append((check_ids(list(p), vocab, "prompt"), None))
            check_fits(encoded[-1][0], limit, "prompt")
            config.limits.check_prompt(encoded[-1][0], "prompt")
        grammar = grammar_for(body)
        await _prepare(state, grammar)
        requested = 16 if body.max_tokens is None else body.max_tokens
        if requested == 0 and not body.echo:
            raise bad("max_tokens must be at least 1 (0 is allowed only with echo=true)", param="max_tokens")
        if len(encoded) * body.n > engine.capacity:
            raise bad(f"{len(encoded)} prompts x n={body.n} is more than this server can hold at once "
                       f"({engine.capacity})", param="n")  # fmt: skip
        items: list[tuple[list[int], SamplingParams]] = []
        if requested:
            for ids, _ in encoded:
                max_new = config.limits.new_tokens(len(encoded) * body.n, requested, limit - len(ids))
                items += [(ids, _params(state, body, max_new, body.logprobs, j, grammar)) for j in range(body.n)]
        scored: list[list[TokenLogprob | None]] = []
        if body.echo and body.logprobs is not None:  # scored by the engine's prefill, all prompts together
            scored = await engine.score([ids for ids, _ in encoded], body.logprobs)
        # The prompt echoed as the tokenizer read it (a lone surrogate, which JSON cannot carry, as U+FFFD).
        echoes = (
            [clean_text(text) if text is not None else _decode(state, ids) for ids, text in encoded]
            if body.echo
            else []
        )
        rid, created = S.new_id("cmpl"), S.now()
        prompt_tokens = sum(len(ids) for ids, _ in encoded)
        n_choices = len(encoded) * body.n
        state.metrics.prompt_tokens.inc(prompt_tokens)

        def prompt_index(choice: int) -> int:
            return choice // body.n

        def echo_part(choice: int) -> tuple[str, S.CompletionLogprobs | None]:
            if not body.echo:
                return "", None
            p = prompt_index(choice)
            lp = None
            if body.logprobs is not None:
                lp = echo_logprobs(encoded[p][0], scored[p], state.llm.tokenizer)
            return echoes[p], lp

        if not requested:  # echo only: score the prompts, generate nothing
            choices = []
            for c in range(n_choices):
                text, lp = echo_part(c)
                choices.append(S.CompletionChoice(index=c, text=text, logprobs=lp, finish_reason="length"))
            return S.CompletionResponse(id=rid, created=created, model=config.model_name, choices=choices,
                                        usage=S.Usage.of(prompt_tokens, 0))  # fmt: skip

        sink: asyncio.Queue = asyncio.Queue()
        stream_key = state.open_stream(request) if body.stream else None
        subs = _submit(engine, items, sink, state, stream_key)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            counts = [0] * n_choices
            offsets = [0] * n_choices

            def chunk(c: int, text: str, lp: S.CompletionLogprobs | None, finish: str | None) -> S.CompletionResponse:
                choice = S.CompletionChoice(index=c, text=text, logprobs=lp, finish_reason=finish)
                return S.CompletionResponse(id=rid, created=created, model=config.model_name, choices=[choice])

            def render(tag: int, ev: Any) -> list[Any]:
                counts[tag] += len(ev.token_ids)
                if not ev.text and not ev.finished and not ev.logprobs:
                    return []
                lp = completion_logprobs(ev.logprobs or [], offsets[tag]) if body.logprobs is not None else None
                offsets[tag] += len(ev.text)
                return [chunk(tag, ev.text, lp, ev.finish_reason)]

            first = []
            if body.echo:
                for c in range(n_choices):
                    text, lp = echo_part(c)
                    offsets[c] = len(text)
                    first.append(chunk(c, text, lp, None))

            def last() -> Any:
                if not include_usage:
                    return None
                usage = S.Usage.of(prompt_tokens, sum(counts))
                return S.CompletionResponse(id=rid, created=created, model=config.model_name, choices=[], usage=usage)

            gen = state.streams.track(stream_key, _stream(engine, subs, sink, render, first, last))
            return _EngineStream(engine, subs, gen)

        results = await _collect(engine, subs, sink, request)
        choices = []
        for c, r in enumerate(results):
            prefix, lp = echo_part(c)
            text = "".join(r.text)
            if body.logprobs is not None:
                gen_lp = completion_logprobs(r.logprobs, len(prefix))
                if lp is None:
                    lp = gen_lp
                else:
                    lp.tokens += gen_lp.tokens
                    lp.token_logprobs += gen_lp.token_logprobs
                    lp.top_logprobs += gen_lp.top_logprobs
                    lp.text_offset += gen_lp.text_offset
            choices.append(S.CompletionChoice(index=c, text=prefix + text, logprobs=lp,
                                              finish_reason=r.finish_reason))  # fmt: skip
        usage = S.Usage.of(prompt_tokens, sum(r.tokens for r in results))
        return S.CompletionResponse(id=rid, created=created, model=config.model_name, choices=choices, usage=usage)

    @app.post("/infill")
    async def infill(body: S.InfillRequest, request: Request) -> JSONResponse:
        """llama-server's code-completion route: the text between ``input_prefix`` and ``input_suffix``."""
        state.check_model(body.model)
        engine = state.require_engine()
        if body.input_extra:
            raise bad("input_extra (other files as context) is not supported", param="input_extra")
        if body.stream:
            raise bad("/infill answers in one response; stream with /v1/completions and suffix", param="stream")
        if body.n != 1:
            raise bad("/infill gives one completion (n = 1)", param="n")
        vocab, limit = state.llm.config.vocab_size, _context_limit(state)
        ids = _infill_ids(state, body.input_prefix, body.input_suffix, "input_prefix")
        if body.prompt:  # llama-server: the start of the middle, already written
            ids += state.tokenizer().encode(body.prompt)
        ids = check_ids(ids, vocab, "input_prefix")
        check_fits(ids, limit, "input_prefix")
        requested = body.n_predict if body.n_predict is not None else body.max_tokens
        max_new = limit - len(ids) if requested is None or requested < 0 else min(requested, limit - len(ids))
        if max_new == 0:
            raise bad("n_predict must be at least 1", param="n_predict")
        if body.repeat_penalty is not None and body.repetition_penalty is None:
            body.repetition_penalty = body.repeat_penalty
        grammar = grammar_for(body)
        await _prepare(state, grammar)
        state.metrics.prompt_tokens.inc(len(ids))
        start = time.perf_counter()
        sink: asyncio.Queue = asyncio.Queue()
        subs = _submit(engine, [(ids, _params(state, body, max_new, None, 0, grammar))], sink)
        (result,) = await _collect(engine, subs, sink, request)
        stops = state.tokenizer().stop_ids
        if result.finish_reason == "length":
            stop_type = "limit"
        else:
            stop_type = "eos" if result.token_ids and result.token_ids[-1] in stops else "word"
        return JSONResponse({"index": 0, "content": "".join(result.text), "tokens": result.token_ids, "stop": True,
                             "stop_type": stop_type, "model": config.model_name, "tokens_predicted": result.tokens,
                             "tokens_evaluated": len(ids),
                             "timings": {"total_ms": (time.perf_counter() - start) * 1e3}})  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Any:
        state.check_model(body.model)
        engine = state.require_engine()
        if body.top_logprobs is not None and not body.logprobs:
            raise bad("top_logprobs requires logprobs=true", param="top_logprobs")
        plan = tool_plan(state.tokenizer(), body, config.tool_format)
        ids, sources = _chat_ids(state, body.messages, plan)
        limit = _context_limit(state)
        check_fits(ids, limit, "messages")
        config.limits.check_prompt(ids, "messages")
        max_new = config.limits.new_tokens(body.n, body.max_completion_tokens or body.max_tokens, limit - len(ids))
        if body.n > engine.capacity:
            raise bad(f"n={body.n} is more than this server can hold at once ({engine.capacity})", param="n")
        grammar = grammar_for(body, plan.grammar if plan is not None else None)
        await _prepare(state, grammar)
        images = await _load_images(state, sources)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        items = [(ids, _params(state, body, max_new, logprobs, j, grammar)) for j in range(body.n)]
        rid, created = S.new_id("chatcmpl"), S.now()
        state.metrics.prompt_tokens.inc(len(ids))
        tokenizer = state.llm.tokenizer

        def reader() -> ToolStream | None:  # reads one choice's tool calls, or None without tools
            parser = plan.parser() if plan is not None else None
            return ToolStream(tokenizer, parser, engine.engine.stop_ids, ids[-6:]) if parser is not None else None

        sink: asyncio.Queue = asyncio.Queue()
        stream_key = state.open_stream(request) if body.stream else None
        subs = _submit(engine, items, sink, state, stream_key, images)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            counts = [0] * body.n
            readers = [reader() for _ in range(body.n)]

            def chunk(choice: S.ChatChunkChoice, usage: S.Usage | None = None) -> S.ChatCompletionChunk:
                return S.ChatCompletionChunk(id=rid, created=created, model=config.model_name,
                                             choices=[choice] if choice else [], usage=usage)  # fmt: skip

            def render(tag: int, ev: Any) -> list[Any]:
                counts[tag] += len(ev.token_ids)
                lp = chat_logprobs(ev.logprobs or []) if body.logprobs and ev.logprobs else None
                tools = readers[tag]
                if tools is None:
                    if not ev.text and not ev.finished and not lp:
                        return []
                    delta = S.Delta(content=ev.text) if ev.text or not ev.finished else S.Delta()
                    return [chunk(S.ChatChunkChoice(index=tag, delta=delta, logprobs=lp,
                                                    finish_reason=ev.finish_reason))]  # fmt: skip
                deltas = tools.add(ev.token_ids) + (tools.finish() if ev.finished else [])
                out = [S.ChatChunkChoice(index=tag, delta=tool_delta(d)) for d in deltas]
                if lp is not None:
                    if not out:
                        out.append(S.ChatChunkChoice(index=tag, delta=S.Delta()))
                    out[0].logprobs = lp
                if ev.finished:
                    finish = "tool_calls" if tools.parser.calls and ev.finish_reason == "stop" else ev.finish_reason
                    out.append(S.ChatChunkChoice(index=tag, delta=S.Delta(), finish_reason=finish))
                return [chunk(c) for c in out]

            first = [chunk(S.ChatChunkChoice(index=j, delta=S.Delta(role="assistant", content="")))
                     for j in range(body.n)]  # fmt: skip

            def last() -> Any:
                return chunk(None, S.Usage.of(len(ids), sum(counts))) if include_usage else None

            gen = state.streams.track(stream_key, _stream(engine, subs, sink, render, first, last))
            return _EngineStream(engine, subs, gen)

        results = await _collect(engine, subs, sink, request)
        choices = []
        for j, r in enumerate(results):
            message, finish = S.AssistantMessage(content="".join(r.text)), r.finish_reason
            tools = reader()
            if tools is not None:
                tools.add(r.token_ids)
                tools.finish()
                calls = tools.parser.tool_calls
                if calls:  # content is what came before the calls (OpenAI sends null when there is none)
                    message = S.AssistantMessage(content=tools.parser.content, tool_calls=[
                        S.ToolCall(id=c.id, function=S.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
                    ])  # fmt: skip
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append(S.ChatChoice(index=j, message=message, finish_reason=finish,
                                        logprobs=chat_logprobs(r.logprobs) if body.logprobs else None))  # fmt: skip
        usage = S.Usage.of(len(ids), sum(r.tokens for r in results))
        return S.ChatCompletionResponse(id=rid, created=created, model=config.model_name, choices=choices, usage=usage)

    @app.post("/v1/embeddings")
    async def embeddings(body: S.EmbeddingRequest) -> S.EmbeddingResponse:
        state.check_model(body.model)
        engine = state.require_engine()
        dim = state.llm.config.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise bad(f"dimensions={body.dimensions} is not supported: this model's embeddings have {dim} "
                      "dimensions (leave 'dimensions' out)", param="dimensions")  # fmt: skip
        inputs = embedding_inputs(body.input, state.llm.tokenizer, state.llm.config.vocab_size)
        limit = state.llm.config.max_seq_len
        for n, seq in enumerate(inputs):
            if len(seq) > limit:
                raise bad(f"input {n} has {len(seq)} tokens, more than this model's context of {limit}",
                          param="input", code="context_length_exceeded")  # fmt: skip
        vectors = []
        for group in embedding_groups(inputs):  # one engine-thread call per forward: generation goes on between
            part = await engine.call(lambda e, g=group: embed_ids(e.model, g, pooling=body.pooling))
            vectors += list(part)
        data = [S.Embedding(index=i, embedding=encode_vector(v, body.encoding_format)) for i, v in enumerate(vectors)]
        tokens = sum(len(seq) for seq in inputs)
        return S.EmbeddingResponse(data=data, model=config.model_name,
                                   usage=S.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))  # fmt: skip

    if config.webui:
        add_webui(app)
    return _Guard(app, state)  # type: ignore[return-value]


def _slots_engine(state: ServerState) -> AsyncEngine:
    if not state.config.slot_save_path:
        raise APIError(501, "slot actions are disabled on this server; start it with --slot-save-path DIR",
                       type="not_supported_error", code="slots_disabled")  # fmt: skip
    return state.require_engine()


def _decode(state: ServerState, ids: list[int]) -> str:
    tokenizer = state.llm.tokenizer
    return tokenizer.decode(ids) if tokenizer is not None else ""


def server_state(app: Any) -> ServerState:
    """The ServerState behind an app made by ``create_app`` (for the CLI's shutdown hook and tests)."""
    return app.state if isinstance(app, _Guard) else app.state.server
