"""The OpenAI-compatible HTTP API: ``create_app()`` builds the FastAPI application.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/embeddings``, ``POST /tokenize``, ``POST /detokenize``, ``GET /metrics``, and the browser chat page at
``GET /`` (``webui.py``). Chat takes OpenAI's ``tools`` (written in the model's own format, calls parsed back and
streamed as ``tool_calls`` deltas; ``tool_choice`` required or named forces a call whose arguments follow the
schema), and both completion routes take ``response_format`` and the grammar extensions (``constrain``). Every
error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; validation errors become 400 naming
the field, and errors found before generation (too-long prompt, bad values, full queue) are returned before any
streaming starts. An outer ASGI guard checks the API key and the body size before anything else runs,
and counts requests by route and status for /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..constrain import Constrainer, GrammarError, grammar_from
from ..embeddings import MAX_BATCH_TOKENS, embed_ids
from ..generate import PREFILL_BUDGET, Engine, TokenLogprob, chat_prompt_ids, encode_prompt
from ..sampling import SamplingParams
from ..tools import Delta, ToolError, ToolPlan, ToolStream, check_messages, has_tool_calls, plan_tools
from . import schemas as S
from .engine import AsyncEngine, QueueFullError, ShuttingDownError, Submission
from .metrics import CONTENT_TYPE, Metrics
from .webui import add_webui, is_page_path

log = logging.getLogger("llamaforge.serve")
ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
          "/detokenize", "/metrics")  # fmt: skip


@dataclass
class ServerConfig:
    model_name: str = "llamaforge"
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_seq_len: int | None = 2048  # KV cache length per slot (None: the model's context)
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown
    compile: bool = False
    prefill_budget: int = PREFILL_BUDGET  # prompt tokens prefilled per engine step (between decode steps)
    tool_format: str | None = None  # Meta formats: "json" or "pythonic" tool calls (default: the family's own)
    webui: bool = True  # the chat page at /


# Errors -------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return _bad("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _bad("the request body is not valid JSON")
    if tuple(first.get("loc", ())) == ("body",):
        return _bad("the request body must be a JSON object (send it with Content-Type: application/json)")
    # Drop "body" and pydantic's union-branch labels ("str", "list[int]", ...) from the location.
    loc = [p for p in first.get("loc", ())[1:] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
    param = ".".join(str(p) for p in loc) or None
    if first.get("type") == "missing":
        return _bad(f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return _bad(f"invalid value for '{param}': {message}" if param else message, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "function-after"}


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

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.shutting_down

    def attach(self, llm: Any) -> None:
        """Build the engine for a loaded model and start its thread (on the event loop)."""
        engine = Engine(llm, max_batch=self.config.max_batch, max_seq_len=self.config.max_seq_len,
                        compile=self.config.compile, prefill_budget=self.config.prefill_budget)  # fmt: skip
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
            raise _bad("this model has no tokenizer; send token ids as the prompt")
        return tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                           f"'{self.config.model_name}'.", param="model", code="model_not_found")  # fmt: skip

    def constrainer(self) -> Constrainer:
        """Grammars compiled for this model's vocabulary (built on first use: call it off the event loop)."""
        return Constrainer.for_tokenizer(self.tokenizer(), self.llm.config.vocab_size)

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        if self.engine is not None:
            self.engine.begin_shutdown(self.config.drain_timeout)


# Requests into engine work ---------------------------------------------------------------------------------
def _context_limit(state: ServerState) -> int:
    return state.require_engine().engine.max_seq_len


def _check_ids(ids: list[int], vocab: int, param: str) -> list[int]:
    if not ids:
        raise _bad(f"'{param}' is empty: give at least one token", param=param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise _bad(f"token id {bad} in '{param}' is outside the vocabulary (0..{vocab - 1})", param=param)
    return ids


def _check_fits(n: int, limit: int, param: str) -> None:
    if n >= limit:
        raise _bad(f"This model's maximum context length is {limit} tokens, but the prompt has {n} tokens, "
                   "which leaves no room to generate. Shorten the prompt.", param=param,
                   code="context_length_exceeded")  # fmt: skip


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > S.MAX_STOP:
        raise _bad(f"at most {S.MAX_STOP} stop sequences are supported, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise _bad("stop sequences must be non-empty strings", param="stop")
    return stops


class LogitBias:
    """OpenAI's ``logit_bias``: added to the logits of the given token ids before sampling."""

    def __init__(self, bias: dict[str, float], vocab: int) -> None:
        ids, values = [], []
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise _bad(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
            if not 0 <= token < vocab:
                raise _bad(f"logit_bias token id {token} is outside the vocabulary", param="logit_bias")
            if not -100 <= value <= 100:
                raise _bad(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
            ids.append(token)
            values.append(float(value))
        self.ids, self.values = torch.tensor(ids, dtype=torch.long), torch.tensor(values)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        ids, values = self.ids.to(logits.device), self.values.to(logits.device, logits.dtype)
        return logits.index_add(0, ids, values)


_GUIDED = (("guided_json", "json_schema"), ("json_schema", "json_schema"), ("guided_regex", "regex"),
           ("guided_choice", "choice"), ("guided_grammar", "grammar"), ("grammar", "grammar"))  # fmt: skip


def _grammar(req: S._Sampling, tool_grammar: str | None = None) -> tuple[str, str] | None:
    """The request's output constraint as (llguidance grammar, the field it came from), or None."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise _bad("response_format 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}",
                       param="response_format")  # fmt: skip
        found.append(("response_format", {"json_schema": fmt.json_schema.schema_}))
    for field, kind in _GUIDED:
        value = getattr(req, field)
        if value is not None:
            found.append((field, {kind: value}))
    if tool_grammar is not None:
        found.append(("tool_choice", {"grammar": tool_grammar}))
    if len(found) > 1:
        names = " and ".join(f"'{f}'" for f, _ in found)
        raise _bad(f"at most one output constraint per request, got {names}", param=found[1][0])
    if not found:
        return None
    param, spec = found[0]
    try:
        return grammar_from(param=param, **spec), param
    except GrammarError as exc:
        raise _bad(str(exc), param=param) from None


async def _prepare(state: ServerState, grammar: tuple[str, str] | None) -> None:
    """Compile the request's grammar (cached per grammar) off the event loop: the first one also reads the
    vocabulary, and a large schema takes a while."""
    if grammar is None:
        return
    try:
        await asyncio.to_thread(lambda: state.constrainer().compile(*grammar))
    except GrammarError as exc:
        raise _bad(str(exc), param=exc.param) from None


def _params(state: ServerState, req: S._Sampling, max_new: int, logprobs: int | None, choice: int,
            grammar: tuple[str, str] | None = None) -> SamplingParams:  # fmt: skip
    processors: list[Any] = []
    if req.logit_bias:
        processors.append(LogitBias(req.logit_bias, state.llm.config.vocab_size))
    if grammar is not None:  # each choice follows its own copy of the compiled grammar
        processors.append(state.constrainer().processor(*grammar))
    seed = None if req.seed is None else (req.seed + choice) % 2**63
    try:
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=seed,
            stop=_stop_list(req.stop),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            logits_processors=processors,
        )
    except ValueError as exc:
        raise _bad(str(exc)) from None


def _chat_messages(messages: list[S.ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad("only text content parts ({'type': 'text', 'text': ...}) are supported",
                               param=f"messages.{i}.content")  # fmt: skip
                texts.append(part["text"])
            content = "".join(texts)
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
            message["content"] = content  # None: a message of calls only
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name:
            message["name"] = m.name
        out.append(message)
    return out


def _tool_plan(state: ServerState, body: S.ChatCompletionRequest) -> ToolPlan | None:
    if body.tools is None and body.tool_choice is None:
        return None
    tokenizer = state.tokenizer()
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    try:
        return plan_tools(tokenizer.chat_template or tokenizer.chat_format, body.tools, body.tool_choice, parallel,
                          state.config.tool_format)  # fmt: skip
    except ToolError as exc:
        raise _bad(str(exc), param=exc.param) from None


def _chat_ids(state: ServerState, messages: list[S.ChatMessage], plan: ToolPlan | None = None) -> list[int]:
    chat = _chat_messages(messages)
    try:
        if plan is not None or has_tool_calls(chat):
            chat = check_messages(chat)
        render = plan.render_options if plan is not None else {}
        return chat_prompt_ids(state.tokenizer(), chat, **render)
    except APIError:
        raise
    except ToolError as exc:
        raise _bad(str(exc), param=exc.param) from None
    except ValueError as exc:
        raise _bad(f"cannot format the conversation with the model's chat template: {exc}",
                   param="messages") from None  # fmt: skip


def _tool_delta(d: Delta) -> S.Delta:
    if d.index is None:
        return S.Delta(content=d.content)
    call = S.ToolCallDelta(index=d.index, id=d.id, type="function" if d.id else None,
                           function=S.FunctionDelta(name=d.name, arguments=d.arguments))  # fmt: skip
    return S.Delta(tool_calls=[call])


# Results ---------------------------------------------------------------------------------------------------
class _Choice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None


async def _wait(get: asyncio.Future, request: Request) -> None:
    """Wait for `get`, giving up (ConnectionError) when the client has gone away."""
    while True:
        done, _ = await asyncio.wait({get}, timeout=0.5)
        if done:
            return
        if await request.is_disconnected():
            get.cancel()
            raise ConnectionError("client disconnected")


async def _collect(engine: AsyncEngine, subs: list[Submission], sink: asyncio.Queue,
                   request: Request) -> list[_Choice]:  # fmt: skip
    choices = [_Choice() for _ in subs]
    left = len(subs)
    try:
        while left:
            get = asyncio.ensure_future(sink.get())
            await _wait(get, request)
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
        engine.cancel(subs)


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, ValueError):
        return _bad(str(exc))
    return APIError(500, str(exc), type="server_error")


def _submit(engine: AsyncEngine, items: list[tuple[list[int], SamplingParams]],
            sink: asyncio.Queue) -> list[Submission]:  # fmt: skip
    try:
        return engine.submit(items, sink)
    except QueueFullError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), type="service_unavailable", code="shutting_down") from None


def _completion_logprobs(entries: Sequence[TokenLogprob | None], offset: int = 0) -> S.CompletionLogprobs:
    out = S.CompletionLogprobs()
    for e in entries:
        if e is None:  # the first prompt token has no logprob
            continue
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in e.top})
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def _echo_logprobs(prompt_ids: list[int], scored: list[TokenLogprob | None], tokenizer: Any) -> S.CompletionLogprobs:
    out = _completion_logprobs(scored)
    first = tokenizer.decode([prompt_ids[0]]) if tokenizer is not None else str(prompt_ids[0])
    out.tokens.insert(0, first)
    out.token_logprobs.insert(0, None)
    out.top_logprobs.insert(0, None)
    out.text_offset = [0] + [o + len(first) for o in out.text_offset]
    return out


def _chat_logprobs(entries: Sequence[TokenLogprob]) -> S.ChoiceLogprobs:
    def top(e: Any) -> S.TopLogprob:
        return S.TopLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")))

    return S.ChoiceLogprobs(content=[
        S.TokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
                       top_logprobs=[top(t) for t in e.top])
        for e in entries
    ])  # fmt: skip


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


# The application ---------------------------------------------------------------------------------------------
def create_app(config: ServerConfig | None = None, llm: Any = None, loader: Callable[[], Any] | None = None) -> FastAPI:
    """The API for `llm` (already loaded), or for the model `loader()` returns: it runs in a thread at startup,
    and /health answers 503 until it is done."""
    if (llm is None) == (loader is None):
        raise ValueError("give exactly one of llm= and loader=")
    config = config or ServerConfig()
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if llm is not None:
            state.attach(llm)
        else:

            def load() -> None:
                try:
                    loaded = loader()
                except Exception as exc:  # reported by /health and every request
                    log.exception("loading the model failed")
                    state.load_error = f"{type(exc).__name__}: {exc}"
                    return
                loop.call_soon_threadsafe(_attach_or_fail, loaded)

            def _attach_or_fail(loaded: Any) -> None:
                try:
                    state.attach(loaded)
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
        return _validation_error(exc).response()

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

    @app.post("/tokenize")
    async def tokenize(body: S.TokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        tokenizer = state.tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise _bad("give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids = _chat_ids(state, body.messages)
        elif body.add_special_tokens:
            ids = encode_prompt(tokenizer, body.prompt)
        else:
            ids = tokenizer.encode(body.prompt)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": _context_limit(state)})

    @app.post("/detokenize")
    async def detokenize(body: S.DetokenizeRequest) -> JSONResponse:
        state.check_model(body.model)
        tokenizer = state.tokenizer()
        ids = _check_ids(body.tokens, state.llm.config.vocab_size, "tokens") if body.tokens else []
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, request: Request) -> Any:
        state.check_model(body.model)
        engine = state.require_engine()
        if body.best_of is not None and body.best_of != body.n:
            raise _bad("best_of is not supported (only best_of = n)", param="best_of")
        if body.suffix:
            raise _bad("suffix is not supported", param="suffix")
        vocab = state.llm.config.vocab_size
        prompts: list[Any] = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(
            body.prompt[0], int) else [body.prompt]  # fmt: skip
        limit = _context_limit(state)
        encoded: list[tuple[list[int], str | None]] = []
        for p in prompts:
            if isinstance(p, str):
                encoded.append((_check_ids(encode_prompt(state.tokenizer(), p), vocab, "prompt"), p))
            else:
                encoded.append((_check_ids(list(p), vocab, "prompt"), None))
            _check_fits(len(encoded[-1][0]), limit, "prompt")
        grammar = _grammar(body)
        await _prepare(state, grammar)
        requested = 16 if body.max_tokens is None else body.max_tokens
        if requested == 0 and not body.echo:
            raise _bad("max_tokens must be at least 1 (0 is allowed only with echo=true)", param="max_tokens")
        if len(encoded) * body.n > engine.capacity:
            raise _bad(f"{len(encoded)} prompts x n={body.n} is more than this server can hold at once "
                       f"({engine.capacity})", param="n")  # fmt: skip
        items: list[tuple[list[int], SamplingParams]] = []
        if requested:
            for ids, _ in encoded:
                max_new = min(requested, limit - len(ids))
                items += [(ids, _params(state, body, max_new, body.logprobs, j, grammar)) for j in range(body.n)]
        scored: list[list[TokenLogprob | None]] = []
        if body.echo and body.logprobs is not None:  # scored by the engine's prefill, all prompts together
            scored = await engine.score([ids for ids, _ in encoded], body.logprobs)
        echoes = [text if text is not None else _decode(state, ids) for ids, text in encoded] if body.echo else []
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
                lp = _echo_logprobs(encoded[p][0], scored[p], state.llm.tokenizer)
            return echoes[p], lp

        if not requested:  # echo only: score the prompts, generate nothing
            choices = []
            for c in range(n_choices):
                text, lp = echo_part(c)
                choices.append(S.CompletionChoice(index=c, text=text, logprobs=lp, finish_reason="length"))
            return S.CompletionResponse(id=rid, created=created, model=config.model_name, choices=choices,
                                        usage=S.Usage.of(prompt_tokens, 0))  # fmt: skip

        sink: asyncio.Queue = asyncio.Queue()
        subs = _submit(engine, items, sink)
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
                lp = _completion_logprobs(ev.logprobs or [], offsets[tag]) if body.logprobs is not None else None
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

            gen = _stream(engine, subs, sink, render, first, last)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)

        results = await _collect(engine, subs, sink, request)
        choices = []
        for c, r in enumerate(results):
            prefix, lp = echo_part(c)
            text = "".join(r.text)
            if body.logprobs is not None:
                gen_lp = _completion_logprobs(r.logprobs, len(prefix))
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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Any:
        state.check_model(body.model)
        engine = state.require_engine()
        if body.top_logprobs is not None and not body.logprobs:
            raise _bad("top_logprobs requires logprobs=true", param="top_logprobs")
        plan = _tool_plan(state, body)
        ids = _chat_ids(state, body.messages, plan)
        limit = _context_limit(state)
        _check_fits(len(ids), limit, "messages")
        requested = body.max_completion_tokens or body.max_tokens or limit
        max_new = min(requested, limit - len(ids))
        if body.n > engine.capacity:
            raise _bad(f"n={body.n} is more than this server can hold at once ({engine.capacity})", param="n")
        grammar = _grammar(body, plan.grammar if plan is not None else None)
        await _prepare(state, grammar)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        items = [(ids, _params(state, body, max_new, logprobs, j, grammar)) for j in range(body.n)]
        rid, created = S.new_id("chatcmpl"), S.now()
        state.metrics.prompt_tokens.inc(len(ids))
        tokenizer = state.llm.tokenizer

        def reader() -> ToolStream | None:  # reads one choice's tool calls, or None without tools
            parser = plan.parser() if plan is not None else None
            return ToolStream(tokenizer, parser, engine.engine.stop_ids, ids[-6:]) if parser is not None else None

        sink: asyncio.Queue = asyncio.Queue()
        subs = _submit(engine, items, sink)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            counts = [0] * body.n
            readers = [reader() for _ in range(body.n)]

            def chunk(choice: S.ChatChunkChoice, usage: S.Usage | None = None) -> S.ChatCompletionChunk:
                return S.ChatCompletionChunk(id=rid, created=created, model=config.model_name,
                                             choices=[choice] if choice else [], usage=usage)  # fmt: skip

            def render(tag: int, ev: Any) -> list[Any]:
                counts[tag] += len(ev.token_ids)
                lp = _chat_logprobs(ev.logprobs or []) if body.logprobs and ev.logprobs else None
                tools = readers[tag]
                if tools is None:
                    if not ev.text and not ev.finished and not lp:
                        return []
                    delta = S.Delta(content=ev.text) if ev.text or not ev.finished else S.Delta()
                    return [chunk(S.ChatChunkChoice(index=tag, delta=delta, logprobs=lp,
                                                    finish_reason=ev.finish_reason))]  # fmt: skip
                deltas = tools.add(ev.token_ids) + (tools.finish() if ev.finished else [])
                out = [S.ChatChunkChoice(index=tag, delta=_tool_delta(d)) for d in deltas]
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

            gen = _stream(engine, subs, sink, render, first, last)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)

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
                                        logprobs=_chat_logprobs(r.logprobs) if body.logprobs else None))  # fmt: skip
        usage = S.Usage.of(len(ids), sum(r.tokens for r in results))
        return S.ChatCompletionResponse(id=rid, created=created, model=config.model_name, choices=choices, usage=usage)

    @app.post("/v1/embeddings")
    async def embeddings(body: S.EmbeddingRequest) -> S.EmbeddingResponse:
        state.check_model(body.model)
        engine = state.require_engine()
        dim = state.llm.config.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise _bad(f"dimensions={body.dimensions} is not supported: this model's embeddings have {dim} "
                       "dimensions (leave 'dimensions' out)", param="dimensions")  # fmt: skip
        inputs = _embedding_inputs(state, body.input)
        limit = state.llm.config.max_seq_len
        for n, seq in enumerate(inputs):
            if len(seq) > limit:
                raise _bad(f"input {n} has {len(seq)} tokens, more than this model's context of {limit}",
                           param="input", code="context_length_exceeded")  # fmt: skip
        vectors = []
        for group in _embedding_groups(inputs):  # one engine-thread job per forward: generation goes on between
            part = await engine.run_job(lambda g=group: embed_ids(state.llm.model, g, pooling=body.pooling))
            vectors += list(part)
        data = [S.Embedding(index=i, embedding=_encode_vector(v, body.encoding_format)) for i, v in enumerate(vectors)]
        tokens = sum(len(seq) for seq in inputs)
        return S.EmbeddingResponse(data=data, model=config.model_name,
                                   usage=S.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))  # fmt: skip

    if config.webui:
        add_webui(app)
    return _Guard(app, state)  # type: ignore[return-value]


MAX_EMBEDDING_INPUTS = 2048


def _embedding_inputs(state: ServerState, given: Any) -> list[list[int]]:
    if isinstance(given, str) or (isinstance(given, list) and given and all(isinstance(t, int) for t in given)):
        given = [given]
    if not given:
        raise _bad("'input' is empty: give a string, a list of strings, or token ids", param="input")
    if len(given) > MAX_EMBEDDING_INPUTS:
        raise _bad(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(given)}", param="input")
    vocab = state.llm.config.vocab_size
    out = []
    for n, item in enumerate(given):
        if isinstance(item, str):
            if not item:
                raise _bad(f"input {n} is an empty string", param="input")
            out.append(encode_prompt(state.tokenizer(), item))
        else:
            out.append(_check_ids(list(item), vocab, "input"))
    return out


def _embedding_groups(inputs: list[list[int]]) -> list[list[list[int]]]:
    groups: list[list[list[int]]] = [[]]
    size = 0
    for seq in inputs:
        if groups[-1] and size + len(seq) > MAX_BATCH_TOKENS:
            groups.append([])
            size = 0
        groups[-1].append(seq)
        size += len(seq)
    return groups


def _encode_vector(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _decode(state: ServerState, ids: list[int]) -> str:
    tokenizer = state.llm.tokenizer
    return tokenizer.decode(ids) if tokenizer is not None else ""


def server_state(app: Any) -> ServerState:
    """The ServerState behind an app made by ``create_app`` (for the CLI's shutdown hook and tests)."""
    return app.state if isinstance(app, _Guard) else app.state.server
