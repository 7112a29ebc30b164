"""What a client sends about tools, checked: function definitions, ``tool_choice``, and conversations whose
assistant messages carry ``tool_calls`` and whose ``tool`` messages answer them by ``tool_call_id``.

Every problem raises ``ToolError`` whose ``param`` names the field, as the OpenAI API reports it
(``tools.1.function.name``, ``messages.3.tool_call_id``, ...).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BUILTIN_TOOLS = {"brave_search": "query", "wolfram_alpha": "query", "code_interpreter": "code"}
STYLES = ("json", "pythonic")  # how Meta's formats write calls: JSON objects or Python-syntax lists
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(ValueError):
    """Bad tools, tool_choice or tool messages; ``param`` names the field (e.g. ``messages.3.tool_call_id``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    """A function the model may call. ``spec`` is the definition as given (rendered as it is into prompts)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_TOOLS


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI ``tools`` ([{"type": "function", "function": {"name", "description", "parameters"}}]) as Tools."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ToolError(f"tools must be a list of function definitions, got {type(tools).__name__}", "tools")
    out: list[Tool] = []
    for i, spec in enumerate(tools):
        where = f"tools.{i}"
        if isinstance(spec, Tool):
            out.append(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ToolError(f"{where} must be an object, got {type(spec).__name__}", where)
        if spec.get("type", "function") != "function":
            raise ToolError(f"{where}.type must be 'function', got {spec.get('type')!r}", f"{where}.type")
        fn = spec.get("function", spec if "name" in spec else None)
        if not isinstance(fn, Mapping):
            raise ToolError(f"{where}.function must be an object with a 'name'", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                            f"{where}.function.name")  # fmt: skip
        if any(t.name == name for t in out):
            raise ToolError(f"{where}: duplicate function name {name!r} (tool names must be unique)",
                            f"{where}.function.name")  # fmt: skip
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        full = spec if "function" in spec else {"type": "function", "function": dict(spec)}
        out.append(Tool(name, description, params, full))
    return out


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto" | "none" | "required" | "named"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def parse_tool_choice(choice: Any, tools: Sequence[Tool]) -> ToolChoice:
    """OpenAI ``tool_choice``: "auto" (default with tools), "none", "required" or {"type": "function",
    "function": {"name": ...}} naming one of `tools`."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolError(f"tool_choice must be 'auto', 'none', 'required' or a function, got {choice!r}",
                            "tool_choice")  # fmt: skip
        if choice == "required" and not tools:
            raise ToolError("tool_choice 'required' needs at least one tool in 'tools'", "tool_choice")
        return ToolChoice(choice)
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        if choice.get("type", "function") == "function" and isinstance(name, str):
            if all(t.name != name for t in tools):
                known = ", ".join(repr(t.name) for t in tools) or "none"
                raise ToolError(f"tool_choice names the function {name!r}, which is not in 'tools' ({known})",
                                "tool_choice")  # fmt: skip
            return ToolChoice("named", name)
    raise ToolError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                    f"{{'name': ...}}}}, got {choice!r}", "tool_choice")  # fmt: skip


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    """One call the model made: ``arguments`` is the JSON text of the arguments, as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    @property
    def args(self) -> Any:
        """The arguments parsed (raises ValueError when the model wrote invalid JSON)."""
        return json.loads(self.arguments)

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with tool calls in one shape: assistant ``tool_calls`` as {"id", "type", "function": {"name",
    "arguments": <object>}} (OpenAI sends the arguments as JSON text; templates expect an object), and every
    ``tool`` message's ``tool_call_id`` matching a call of an earlier assistant message."""
    ids: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for n, m in enumerate(messages):
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            if m.get("role") != "assistant":
                raise ToolError(f"messages.{n}: only assistant messages carry tool_calls", f"messages.{n}.tool_calls")
            m["tool_calls"] = [_check_call(c, f"messages.{n}.tool_calls.{j}", ids) for j, c in enumerate(calls)]
        elif "tool_calls" in m:
            m.pop("tool_calls")  # None or []: no calls
        if m.get("role") == "tool":
            ref = m.get("tool_call_id")
            if ref is not None:
                if ref not in ids:
                    raise ToolError(f"messages.{n}.tool_call_id {ref!r} does not match a tool call of an earlier "
                                    "assistant message", f"messages.{n}.tool_call_id")  # fmt: skip
                m.setdefault("name", ids[ref])
        out.append(m)
    return out


def _check_call(call: Any, where: str, ids: dict[str, str]) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ToolError(f"{where} must be an object", where)
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ToolError(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolError(f"{where}.function.arguments is not valid JSON: {exc}",
                            f"{where}.function.arguments") from None  # fmt: skip
    call_id = call.get("id") or new_call_id()
    ids[call_id] = name
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def has_tool_calls(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
