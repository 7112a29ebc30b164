"""The OpenAI API's side of the server: requests into ``SamplingParams`` and prompts, results into OpenAI's
response fields, and errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Output constraints (``response_format`` and the grammar extensions) become one llguidance grammar per request
(``grammar_for``); ``tools``/``tool_choice`` become a ``tools.ToolPlan`` (``tool_plan``), whose forced calls are
a grammar too. The routes (``api.py``) call these; nothing here touches the engine.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import torch
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..constrain import GrammarError, grammar_from
from ..embeddings import MAX_BATCH_TOKENS
from ..inference import SamplingParams, TokenLogprob, prompts
from ..tokenizer import clean_text
from ..tools import Delta, ToolError, ToolPlan, plan_tools
from . import schemas as S


# Errors -------------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        message = clean_text(message)  # it may quote the client's text: a lone surrogate cannot be sent as UTF-8
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad("the request body is not valid JSON")
    if tuple(first.get("loc", ())) == ("body",):
        return bad("the request body must be a JSON object (send it with Content-Type: application/json)")
    # Drop "body" and pydantic's union-branch labels ("str", "list[int]", ...) from the location.
    loc = [p for p in first.get("loc", ())[1:] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
    param = ".".join(str(p) for p in loc) or None
    if first.get("type") == "missing":
        return bad(f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return bad(f"invalid value for '{param}': {message}" if param else message, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "function-after"}


# Requests ------------------------------------------------------------------------------------------------
def check_ids(ids: list[int], vocab: int, param: str) -> list[int]:
    if not ids:
        raise bad(f"'{param}' is empty: give at least one token", param=param)
    outside = next((t for t in ids if not 0 <= t < vocab), None)
    if outside is not None:
        raise bad(f"token id {outside} in '{param}' is outside the vocabulary (0..{vocab - 1})", param=param)
    return ids


def check_fits(ids: list[int], limit: int, param: str) -> None:
    """``inference.check_fits`` (the one prompt-length check) as a 400 ``context_length_exceeded``."""
    try:
        prompts.check_fits(ids, limit)
    except prompts.PromptTooLongError as exc:
        raise bad(
            f"This model's maximum context length is {limit} tokens: {exc}", param=param, code="context_length_exceeded"
        ) from None


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > S.MAX_STOP:
        raise bad(f"at most {S.MAX_STOP} stop sequences are supported, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise bad("stop sequences must be non-empty strings", param="stop")
    return stops


class LogitBias:
    """OpenAI's ``logit_bias``: added to the logits of the given token ids before sampling."""

    def __init__(self, bias: dict[str, float], vocab: int) -> None:
        ids, values = [], []
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
            if not 0 <= token < vocab:
                raise bad(f"logit_bias token id {token} is outside the vocabulary", param="logit_bias")
            if not -100 <= value <= 100:
                raise bad(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
            ids.append(token)
            values.append(float(value))
        self.ids, self.values = torch.tensor(ids, dtype=torch.long), torch.tensor(values)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        ids, values = self.ids.to(logits.device), self.values.to(logits.device, logits.dtype)
        return logits.index_add(0, ids, values)


_GUIDED = (("guided_json", "json_schema"), ("json_schema", "json_schema"), ("guided_regex", "regex"),
           ("guided_choice", "choice"), ("guided_grammar", "grammar"), ("grammar", "grammar"))  # fmt: skip


def grammar_for(req: S._Sampling, tool_grammar: str | None = None) -> tuple[str, str] | None:
    """The request's output constraint as (llguidance grammar, the field it came from), or None: at most one of
    ``response_format`` (json_schema, json_object), the grammar extensions and a forced tool call."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad("response_format 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}",
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
        raise bad(f"at most one output constraint per request, got {names}", param=found[1][0])
    if not found:
        return None
    param, spec = found[0]
    try:
        return grammar_from(param=param, **spec), param
    except GrammarError as exc:
        raise bad(str(exc), param=param) from None


def sampling_params(req: S._Sampling, max_new: int, logprobs: int | None, choice: int, vocab_size: int,
                    constraint: Any = None) -> SamplingParams:  # fmt: skip
    """The ``SamplingParams`` of choice number `choice` of an OpenAI request (seeds differ per choice);
    `constraint`: this choice's own grammar processor."""
    processors: list[Any] = []
    if req.logit_bias:
        processors.append(LogitBias(req.logit_bias, vocab_size))
    if constraint is not None:
        processors.append(constraint)
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
            stop=stop_list(req.stop),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            logits_processors=processors,
        )
    except ValueError as exc:
        raise bad(str(exc)) from None


def chat_messages(messages: list[S.ChatMessage]) -> list[dict[str, Any]]:
    """The request's messages as chat-template messages: text parts joined, ``image_url`` parts kept in place
    (``inference.chat_prompt_sources`` reads them)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind == "image_url":
                    given = part.get("image_url")
                    url = given.get("url") if isinstance(given, dict) else None
                    if not isinstance(url, str):
                        raise bad("an image_url part is {'type': 'image_url', 'image_url': {'url': ...}}",
                                  param=f"messages.{i}.content.{j}.image_url")  # fmt: skip
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                elif kind == "text" and isinstance(part.get("text"), str):
                    if parts and parts[-1]["type"] == "text":
                        parts[-1] = {"type": "text", "text": parts[-1]["text"] + part["text"]}
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                else:
                    raise bad("content parts are {'type': 'text', 'text': ...} or {'type': 'image_url', "
                              "'image_url': {'url': ...}}", param=f"messages.{i}.content.{j}")  # fmt: skip
            has_images = any(p["type"] == "image_url" for p in parts)
            content = parts if has_images else "".join(p["text"] for p in parts)
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


def tool_plan(tokenizer: Any, body: S.ChatCompletionRequest, tool_format: str | None) -> ToolPlan | None:
    """How the request's tools are shown, forced and read (None without tools)."""
    if body.tools is None and body.tool_choice is None:
        return None
    parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
    try:
        return plan_tools(tokenizer.chat_template or tokenizer.chat_format, body.tools, body.tool_choice, parallel,
                          tool_format)  # fmt: skip
    except ToolError as exc:
        raise bad(str(exc), param=exc.param) from None


def tool_delta(d: Delta) -> S.Delta:
    """A parser's Delta as the chunk delta OpenAI streams: content, or one piece of a tool call."""
    if d.index is None:
        return S.Delta(content=d.content)
    call = S.ToolCallDelta(index=d.index, id=d.id, type="function" if d.id else None,
                           function=S.FunctionDelta(name=d.name, arguments=d.arguments))  # fmt: skip
    return S.Delta(tool_calls=[call])


MAX_EMBEDDING_INPUTS = 2048


def embedding_inputs(given: Any, tokenizer: Any, vocab: int) -> list[list[int]]:
    """The token ids of each input of /v1/embeddings (a string, strings, token ids or lists of them)."""
    if isinstance(given, str) or (isinstance(given, list) and given and all(isinstance(t, int) for t in given)):
        given = [given]
    if not given:
        raise bad("'input' is empty: give a string, a list of strings, or token ids", param="input")
    if len(given) > MAX_EMBEDDING_INPUTS:
        raise bad(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(given)}", param="input")
    out = []
    for n, item in enumerate(given):
        if isinstance(item, str):
            if not item:
                raise bad(f"input {n} is an empty string", param="input")
            if tokenizer is None:
                raise bad("this model has no tokenizer; send token ids as the input", param="input")
            out.append(prompts.encode_prompt(tokenizer, item))
        else:
            out.append(check_ids(list(item), vocab, "input"))
    return out


def embedding_groups(inputs: list[list[int]]) -> list[list[list[int]]]:
    """Inputs in groups of about one forward each (the engine runs one group between two decode steps)."""
    groups: list[list[list[int]]] = [[]]
    size = 0
    for seq in inputs:
        if groups[-1] and size + len(seq) > MAX_BATCH_TOKENS:
            groups.append([])
            size = 0
        groups[-1].append(seq)
        size += len(seq)
    return groups


def encode_vector(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


# Results ---------------------------------------------------------------------------------------------------
def completion_logprobs(entries: Sequence[TokenLogprob | None], offset: int = 0) -> S.CompletionLogprobs:
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


def echo_logprobs(prompt_ids: list[int], scored: list[TokenLogprob | None], tokenizer: Any) -> S.CompletionLogprobs:
    out = completion_logprobs(scored)
    first = tokenizer.decode([prompt_ids[0]]) if tokenizer is not None else str(prompt_ids[0])
    out.tokens.insert(0, first)
    out.token_logprobs.insert(0, None)
    out.top_logprobs.insert(0, None)
    out.text_offset = [0] + [o + len(first) for o in out.text_offset]
    return out


def chat_logprobs(entries: Sequence[TokenLogprob]) -> S.ChoiceLogprobs:
    def top(e: Any) -> S.TopLogprob:
        return S.TopLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")))

    return S.ChoiceLogprobs(content=[
        S.TokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode("utf-8")),
                       top_logprobs=[top(t) for t in e.top])
        for e in entries
    ])  # fmt: skip
