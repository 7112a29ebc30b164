"""Reading tool calls out of a model's answer, as it streams.

``ToolCallParser`` splits the text into content and calls of the offered functions and yields OpenAI-style
deltas: content, then for each call its id and name first, then fragments of its arguments as they are
generated (JSON arguments stream; Python-syntax calls come whole). It reads every syntax the formats use:
JSON objects after ``<|python_tag|>`` or bare, ``<tool_call>`` blocks, ``[f(a=1)]`` lists (Llama 4 wraps them
in ``<|python_start|>``), ``<function=f>{...}</function>``, ``brave_search.call(query="...")``, and code for
the code interpreter. ``ToolStream`` feeds it token ids, decoded with the special tokens that mark calls.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .spec import Tool, ToolCall


@dataclass
class Delta:
    """A piece of a streamed answer: ``content`` text, or for tool call ``index`` its ``id`` and ``name``
    (first, once) and then fragments of its ``arguments``."""

    content: str | None = None
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


_TAGS = ("<tool_call>", "<|python_tag|>", "<|python_start|>", "<function=")
_OPENERS = ("{", "[")
_BUILTIN_CALL = re.compile(r"\s*([A-Za-z_]\w*)\.call\(")
_SEPARATORS = " \t\r\n,;"


@dataclass
class _Found:
    name: str | None
    args: str  # the arguments' JSON text so far
    done: bool  # the call is complete


class ToolCallParser:
    """Reads a model's answer as it streams and splits it into content and tool calls of the offered functions.

    ``feed(text)`` and ``finish()`` return Deltas; afterwards ``content`` (None when there was none) and
    ``tool_calls`` hold the whole answer. Text that could still turn into a call is held back until it is
    decided; an answer that starts like a call but is not one (unknown function, not JSON, ...) is content.
    """

    def __init__(self, tools: Sequence[Tool], max_calls: int | None = None) -> None:
        self.names = {t.name for t in tools}
        self.max_calls = max_calls  # 1 when parallel calls are off: later calls are dropped
        self.buffer = ""
        self.mode = "start"  # start | content | calls | text (content, no more calls)
        self.kind = ""  # how the calls region is written: json | pythonic | builtin | code | function
        self.sent = 0  # characters of the buffer given out as content
        self.region = 0  # where the calls begin
        self.calls: list[ToolCall] = []
        self._args_sent: list[int] = []
        self._content: list[str] = []
        self.finished = False

    # Public -----------------------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Delta]:
        self.buffer += text
        return self._advance(final=False)

    def finish(self) -> list[Delta]:
        deltas = self._advance(final=True)
        self.finished = True
        return deltas

    @property
    def content(self) -> str | None:
        text = "".join(self._content)
        if self.calls:
            text = text.strip()
        return text or None

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self.calls)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Parse a whole answer at once."""
        self.feed(text)
        self.finish()
        return self.content, self.tool_calls

    # Internals ------------------------------------------------------------------------------------------------
    def _advance(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        if self.mode == "start":
            self._detect_start(final)
        if self.mode in ("content", "text"):
            out += self._stream_content(final)
        if self.mode == "calls":
            out += self._stream_calls(final)
            if self.mode in ("content", "text"):  # the calls turned out not to be calls
                out += self._stream_content(final)
        return out

    def _detect_start(self, final: bool) -> None:
        stripped = self.buffer.lstrip()
        if not stripped and not final:
            return
        start = len(self.buffer) - len(stripped)
        for marker in (*_TAGS, *_OPENERS):
            if stripped.startswith(marker):
                self._enter_calls(start)
                return
            if marker.startswith(stripped) and not final:
                return
        self.mode = "content"

    def _enter_calls(self, at: int) -> None:
        self._emit_content(at)
        self.mode, self.region, self.kind = "calls", at, ""

    def _emit_content(self, upto: int) -> list[Delta]:
        if upto <= self.sent:
            return []
        text = self.buffer[self.sent : upto]
        self.sent = upto
        self._content.append(text)
        return [Delta(content=text)]

    def _stream_content(self, final: bool) -> list[Delta]:
        if self.mode == "content":
            hits = [i for i in (self.buffer.find(t, self.sent) for t in _TAGS) if i >= 0]
            if hits:
                at = min(hits)
                out = self._emit_content(at)
                self._enter_calls(at)
                return out + self._stream_calls(final)
        hold = 0 if final or self.mode == "text" else _partial_suffix(self.buffer, _TAGS)
        return self._emit_content(len(self.buffer) - hold)

    def _give_up(self) -> None:
        """What looked like calls is content (only possible before any call was given out)."""
        self.mode = "text"

    def _stream_calls(self, final: bool) -> list[Delta]:
        found, failed = self._scan(final)
        out: list[Delta] = []
        for i, f in enumerate(found[: self.max_calls]):
            if i == len(self.calls):
                if f.name is None:
                    break
                if f.name not in self.names:
                    failed = True
                    break
                self.calls.append(ToolCall(f.name, ""))
                self._args_sent.append(0)
                out.append(Delta(index=i, id=self.calls[i].id, name=f.name, arguments=""))
            if len(f.args) <= self._args_sent[i]:
                continue
            if f.args.startswith('"'):  # arguments written as a string holding JSON: given out whole, unwrapped
                if not f.done:
                    continue
                try:
                    inner = json.loads(f.args)
                except ValueError:
                    inner = f.args
                piece = inner if isinstance(inner, str) else f.args
                self._args_sent[i] = len(f.args)
                self.calls[i].arguments = piece
            else:
                piece = f.args[self._args_sent[i] :]
                self._args_sent[i] = len(f.args)
                self.calls[i].arguments = f.args
            out.append(Delta(index=i, arguments=piece))
        if failed and not self.calls:
            self._give_up()
        return out

    def _scan(self, final: bool) -> tuple[list[_Found], bool]:
        """The calls in the region so far, and whether the region proved not to be calls."""
        text = self.buffer[self.region :]
        if not self.kind:
            self.kind, text = self._classify(text, final)
            if not self.kind:
                return [], final
        else:
            text = self._body(text)
        if self.kind == "json":
            return _scan_json_calls(text, final)
        if self.kind == "function":
            return _scan_function_tags(text, final)
        if self.kind == "pythonic":
            return _scan_pythonic(text, final)
        if self.kind == "builtin":
            return _scan_builtin(text, final)
        if self.kind == "code":
            if not final:
                return [], False
            if "code_interpreter" not in self.names:
                return [], True
            return [_Found("code_interpreter", json.dumps({"code": text.strip()}), True)], False
        return [], True

    def _body(self, text: str) -> str:
        """The region without its opening tag (and Llama 4's <|python_end|>)."""
        for tag in ("<|python_tag|>", "<|python_start|>"):
            if text.lstrip().startswith(tag):
                text = text.lstrip()[len(tag) :]
                return text.replace("<|python_end|>", "")
        return text

    def _classify(self, text: str, final: bool) -> tuple[str, str]:
        stripped = text.lstrip()
        if stripped.startswith("<function="):
            return "function", text
        if stripped.startswith("<tool_call>"):
            return "json", text
        body = self._body(text)
        tagged = body is not text
        inner = body.lstrip()
        if not inner:
            return ("", body) if not final else (("code", body) if tagged else ("", body))
        if inner[0] == "{":
            return "json", body
        if inner[0] == "[":
            return "pythonic", body
        match = _BUILTIN_CALL.match(body)
        if match:
            return "builtin", body
        if tagged:
            if not final and re.fullmatch(r"\s*[A-Za-z_]\w*(\.\w*)?", body):
                return "", body  # could still become name.call(
            return "code", body
        return "", body


class ToolStream:
    """A ToolCallParser fed with token ids: they are decoded with special tokens kept (``<|python_tag|>`` marks
    a Llama call) and end-of-turn tokens dropped. `context` (the prompt's last tokens) primes the decoder, so
    that the first word keeps its leading space."""

    def __init__(self, tokenizer: Any, parser: ToolCallParser, stop_ids: Iterable[int] = (),
                 context: Sequence[int] = ()) -> None:  # fmt: skip
        self.parser = parser
        self.stop_ids = set(stop_ids)
        self.decoder = tokenizer.decoder(skip_special=False)
        for t in context:
            self.decoder.add(t)

    def add(self, token_ids: Iterable[int]) -> list[Delta]:
        text = "".join(self.decoder.add(t) for t in token_ids if t not in self.stop_ids)
        return self.parser.feed(text) if text else []

    def finish(self) -> list[Delta]:
        rest = self.decoder.flush()
        return (self.parser.feed(rest) if rest else []) + self.parser.finish()


def _partial_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins one of `markers`."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


# JSON scanning on partial text -----------------------------------------------------------------------------------
def _skip_string(text: str, i: int) -> int | None:
    """Index after the JSON string starting at text[i] == '"', or None if it is not closed yet."""
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """Index after the JSON value that starts at text[i], or None when the text ends inside it."""
    c = text[i]
    if c == '"':
        return _skip_string(text, i)
    if c in "{[":
        depth = 0
        while i < len(text):
            c = text[i]
            if c == '"':
                end = _skip_string(text, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def _object_members(text: str, start: int) -> tuple[dict[str, tuple[int, int | None]], int | None, bool]:
    """The members of the JSON object at text[start] == '{' as {key: (value start, value end or None)}, the
    index after the object (None while incomplete), and whether the text is not a JSON object after all."""
    members: dict[str, tuple[int, int | None]] = {}
    i = start + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            return members, None, False
        if text[i] == "}":
            return members, i + 1, False
        if text[i] != '"':
            return members, None, True
        key_end = _skip_string(text, i)
        if key_end is None:
            return members, None, False
        try:
            key = json.loads(text[i:key_end])
        except ValueError:
            return members, None, True
        i = key_end
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            return members, None, False
        if text[i] != ":":
            return members, None, True
        i += 1
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            members[key] = (n, None)
            return members, None, False
        end = _value_end(text, i)
        members[key] = (i, end)
        if end is None:
            return members, None, False
        i = end


def _scan_json_calls(text: str, final: bool) -> tuple[list[_Found], bool]:
    """Call objects {"name": ..., "parameters"|"arguments": ...}, separated by whitespace, ',' or ';', possibly
    inside a JSON list or <tool_call></tool_call> tags."""
    found: list[_Found] = []
    i, n = 0, len(text)
    while True:
        while True:
            while i < n and text[i] in _SEPARATORS + "[]":
                i += 1
            for tag in ("<tool_call>", "</tool_call>"):
                if text.startswith(tag, i):
                    i += len(tag)
                    break
            else:
                break
        if i >= n:
            return found, False
        if text[i] != "{":
            partial = any(t.startswith(text[i:]) for t in ("<tool_call>", "</tool_call>")) and not final
            return found, not found and not partial
        members, end, bad = _object_members(text, i)
        if bad:
            return found, not found
        name = None
        if "name" in members and members["name"][1] is not None:
            a, b = members["name"]
            try:
                name = json.loads(text[a:b])
            except ValueError:
                return found, not found
            if not isinstance(name, str):
                return found, not found
        key = "parameters" if "parameters" in members else "arguments" if "arguments" in members else None
        args = ""
        if key is not None:
            a, b = members[key]
            args = text[a : b if b is not None else n]
            if b is None:
                args = args.rstrip(" \t\r\n")
        if end is None:
            found.append(_Found(name, args, False))
            return found, False
        if name is None:  # a complete object that is not a call
            return found, not found
        found.append(_Found(name, args or "{}", True))
        i = end


def _scan_function_tags(text: str, final: bool) -> tuple[list[_Found], bool]:
    """<function=name>{...}</function> calls (Llama 3.1's function-tag format)."""
    found: list[_Found] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _SEPARATORS:
            i += 1
        if text.startswith("</function>", i):
            i += len("</function>")
            continue
        rest = text[i:]
        if not rest.startswith("<function="):
            partial = not final and any(t.startswith(rest) for t in ("<function=", "</function>"))
            return found, not found and not partial
        close = text.find(">", i)
        if close < 0:
            return found, not found and final
        name = text[i + len("<function=") : close]
        j = close + 1
        while j < n and text[j] in " \t\r\n":
            j += 1
        if j >= n:
            found.append(_Found(name, "", False))
            return found, False
        if text[j] != "{":
            return found, not found
        end = _value_end(text, j)
        found.append(_Found(name, text[j : end if end is not None else n], end is not None))
        if end is None:
            return found, False
        i = end


def _scan_pythonic(text: str, final: bool) -> tuple[list[_Found], bool]:
    """A list of calls in Python syntax: [f(a=1, b="x"), g()] (JSON literals true/false/null accepted)."""
    start = text.index("[")
    end = _value_end(text, start)
    if end is None:
        return [], final
    try:
        tree = ast.parse(text[start:end].strip(), mode="eval")
    except SyntaxError:
        return [], True
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return [], True
    found = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return [], True
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError:
            return [], True
        found.append(_Found(node.func.id, json.dumps(args, ensure_ascii=False), True))
    return found, False


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    return ast.literal_eval(node)


def _scan_builtin(text: str, final: bool) -> tuple[list[_Found], bool]:
    """Llama 3.1's built-in tool calls: brave_search.call(query="...")."""
    m = _BUILTIN_CALL.match(text)
    assert m is not None
    name, open_at = m.group(1), m.end() - 1
    depth, i = 0, open_at
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _skip_string(text, i)
            if end is None:
                return [], False
            i = end
            continue
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            break
        i += 1
    else:
        return [], final
    try:
        call = ast.parse(text[m.start(1) - 0 : i + 1].strip().replace(".call(", "(", 1), mode="eval").body
        args = {kw.arg: _literal(kw.value) for kw in call.keywords if kw.arg is not None}  # type: ignore[attr-defined]
    except (SyntaxError, ValueError, AttributeError):
        return [], True
    return [_Found(name, json.dumps(args, ensure_ascii=False), True)], False
