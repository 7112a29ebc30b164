"""Tools in the chat formats: the tool prompt, past calls and their results, written the way each model was
trained to read them (``llamaforge.chat.render_chat`` calls these).

- Llama 3.1 / 3.3 (``llama3``, style ``json``): ``Environment: ipython`` and the date lines in the system
  message, custom tools as JSON in the first user message (or in the system message), built-in tools
  (``brave_search``, ``wolfram_alpha``, ``code_interpreter``) on the ``Tools:`` line: the text of Meta's chat
  template. Past calls are written as Meta's ``llama-models`` formatter writes them (``<|python_tag|>``
  before code, ``<|eom_id|>`` after a built-in call), results in the ``ipython`` role.
- Llama 3.2 (``llama3``, style ``pythonic``) and Llama 4 (``llama4``, ``pythonic`` by default, or ``json`` as
  in the Llama 4 chat template on the hub): the functions as a JSON list in the system message (Meta's
  prompt for each), calls in Python syntax ``[get_weather(city="Paris"), ...]``.
- A jinja template: messages as transformers passes them (arguments as objects) and ``tools`` as a template
  variable. A template that ignores ``tools`` gets them Hermes-style: the functions in ``<tools>`` in the
  system message, calls as ``<tool_call>{...}</tool_call>``, results as ``<tool_response>``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .spec import BUILTIN_TOOLS, STYLES, Tool, ToolError, check_messages

# --- Meta's formats (llama3, llama4) ------------------------------------------------------------------------------
_RESPOND_JSON = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
_TOOLS_IN_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n" + _RESPOND_JSON
)
_TOOLS_IN_SYSTEM = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    + _RESPOND_JSON
)
_PYTHONIC_32 = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the function can be used, point it out. If the given question lacks the parameters required by the function,
also point it out. You should only return the function call in tools call sections.

If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in the response.

Here is a list of functions in JSON format that you can invoke.

{functions}"""  # noqa: E501 - the model's own prompt, line by line
_PYTHONIC_4 = """You are a helpful assistant and an expert in function composition. You can answer general questions using your internal knowledge OR invoke functions when necessary. Follow these strict guidelines:

1. FUNCTION CALLS:
- ONLY use functions that are EXPLICITLY listed in the function list below
- If NO functions are listed (empty function list []), respond ONLY with internal knowledge or "I don't have access to [Unavailable service] information"
- If a function is not in the list, respond ONLY with internal knowledge or "I don't have access to [Unavailable service] information"
- If ALL required parameters are present AND the query EXACTLY matches a listed function's purpose: output ONLY the function call(s)
- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]
Examples:
CORRECT: [get_weather(location="Vancouver"), calculate_route(start="Boston", end="New York")] <- Only if get_weather and calculate_route are in function list
INCORRECT: get_weather(location="New York")
INCORRECT: Let me check the weather: [get_weather(location="New York")]
INCORRECT: [get_events(location="Singapore")] <- If function not in list

2. RESPONSE RULES:
- For pure function requests matching a listed function: ONLY output the function call(s)
- For knowledge questions: ONLY output text
- For missing parameters: ONLY request the specific missing parameters
- For unavailable services (not in function list): output ONLY with internal knowledge or "I don't have access to [Unavailable service] information". Do NOT execute a function call.
- If the query asks for information beyond what a listed function provides: output ONLY with internal knowledge about your limitations
- NEVER combine text and function calls in the same response
- NEVER suggest alternative functions when the requested service is unavailable
- NEVER create or invent new functions not listed below

3. STRICT BOUNDARIES:
- ONLY use functions from the list below - no exceptions
- NEVER use a function as an alternative to unavailable information
- NEVER call functions not present in the function list
- NEVER add explanatory text to function calls
- NEVER respond with empty brackets
- Use proper Python/JSON syntax for function calls
- Check the function list carefully before responding

4. TOOL RESPONSE HANDLING:
- When receiving tool responses: provide concise, natural language responses
- Don't repeat tool response verbatim
- Don't add supplementary information


Here is a list of functions in JSON format that you can invoke.

{functions}

You can answer general questions or invoke tools when necessary.
In addition to tool calls, you should also augment your responses by using the tool outputs."""  # noqa: E501


def default_style(generation: int) -> str:
    """Llama 3.1/3.3 call tools in JSON; Llama 4 (and 3.2, when asked for) in Python syntax."""
    return "pythonic" if generation == 4 else "json"


def meta_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool], generation: int,
                  style: str | None = None, date_string: str | None = None,
                  tools_in_user_message: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """`messages` (checked by ``check_messages``) with the tool prompt added and tool calls written out, as
    messages whose ``parts`` [(text, special)] ``chat`` renders between the headers."""
    style = style or default_style(generation)
    if style not in STYLES:
        raise ToolError(f"unknown tool format {style!r}; choose one of {', '.join(STYLES)}", "tool_format")
    eot = "<|eot_id|>" if generation == 3 else "<|eot|>"
    messages = [dict(m) for m in messages]
    custom = [t for t in tools if not t.builtin]
    builtin = [t.name for t in tools if t.builtin]
    out: list[dict[str, Any]] = []
    if tools:
        system = _text(messages.pop(0)) if messages and messages[0]["role"] == "system" else None
        if style == "pythonic":
            out += _pythonic_system(custom, builtin, system, generation)
        else:
            out += _json_prompt(messages, custom, builtin, system, generation, date_string, tools_in_user_message, eot)
    for m in messages:
        out.append(_meta_message(m, generation, style))
    return out


def _json_prompt(messages: list[dict[str, Any]], custom: list[Tool], builtin: list[str], system: str | None,
                 generation: int, date: str | None, in_user: bool, eot: str) -> list[dict[str, Any]]:  # fmt: skip
    listing = "".join(json.dumps(dict(t.spec), ensure_ascii=False, indent=4) + "\n\n" for t in custom)
    out = []
    if generation == 3 or system is not None:  # Llama 3 always writes a system message; Llama 4 only the user's
        text = "Environment: ipython\n"
        if builtin:
            text += "Tools: " + ", ".join(n for n in builtin if n != "code_interpreter") + "\n\n"
        if generation == 3:
            date = date or datetime.now().strftime("%d %b %Y")
            text += f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
        if custom and not in_user:
            text += _TOOLS_IN_SYSTEM + listing
        out.append(_raw("system", text + (system or "").strip(), eot))
    if custom and in_user:
        if not messages:
            raise ToolError("tools are written into the first user message, and there is none", "messages")
        first = messages.pop(0)
        out.append(_raw("user", _TOOLS_IN_USER + listing + _text(first).strip(), eot))
    return out


def _pythonic_system(custom: list[Tool], builtin: list[str], system: str | None, generation: int) -> list[dict]:
    functions = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": dict(t.parameters)} for t in custom],
        ensure_ascii=False,
        indent=4,
    )
    pieces = []
    if builtin:
        pieces.append("Environment: ipython\nTools: " + ", ".join(n for n in builtin if n != "code_interpreter"))
    if custom:
        pieces.append((_PYTHONIC_4 if generation == 4 else _PYTHONIC_32).format(functions=functions))
    if system:
        pieces.append(system)
    return [{"role": "system", "content": "\n\n".join(pieces).strip("\n")}]


def _raw(role: str, text: str, end: str) -> dict[str, Any]:
    return {"role": role, "parts": [(text, False), (end, True)]}


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(c.get("text", "") if isinstance(c, Mapping) else str(c) for c in content)
    return str(content)


def _meta_message(m: dict[str, Any], generation: int, style: str) -> dict[str, Any]:
    """An assistant message with tool calls written as Meta's llama-models formatter writes them; a tool
    result as the text of its content (JSON for structured content)."""
    calls = m.get("tool_calls")
    if m["role"] == "tool":
        content = m.get("content")
        if isinstance(content, (Mapping, list)) and not _is_text_parts(content):
            m["content"] = json.dumps(content)
        return m
    if not calls:
        return m
    suffix = "_id|>" if generation == 3 else "|>"
    parts: list[tuple[str, bool]] = []
    names = [c["function"]["name"] for c in calls]
    if names[0] == "code_interpreter":
        parts.append(("<|python_tag|>", True))
    parts.append((_text(m), False))
    if style == "pythonic" and not any(n in BUILTIN_TOOLS for n in names):
        body = ", ".join(_pythonic_call(c["function"]["name"], c["function"]["arguments"]) for c in calls)
        parts.append((f"[{body}]", False))
    else:
        for c in calls:
            parts.append((_meta_call_text(c["function"]["name"], c["function"]["arguments"], style), False))
    # Meta: a built-in call (and on Llama 4 any call) waits for its result with end-of-message.
    eom = generation == 4 or any(n in BUILTIN_TOOLS for n in names)
    parts.append((("<|eom" if eom else "<|eot") + suffix, True))
    return {"role": "assistant", "parts": parts}


def _is_text_parts(content: Any) -> bool:
    return isinstance(content, list) and all(isinstance(c, Mapping) and "text" in c for c in content)


def _meta_call_text(name: str, args: Any, style: str) -> str:
    args = args if isinstance(args, Mapping) else {}
    if name in ("brave_search", "wolfram_alpha"):
        return f'{name}.call(query="{args.get("query", "")}")'
    if name == "code_interpreter":
        return str(args.get("code", ""))
    if style == "pythonic":
        return f"[{_pythonic_call(name, args)}]"
    return json.dumps({"type": "function", "name": name, "parameters": args})


def _pythonic_value(value: Any) -> str:
    # As llama-models writes values: strings in double quotes, Python literals, dicts as {k=v}.
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_pythonic_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}={_pythonic_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _pythonic_call(name: str, args: Any) -> str:
    args = args if isinstance(args, Mapping) else {}
    return f"{name}(" + ", ".join(f"{k}={_pythonic_value(v)}" for k, v in args.items()) + ")"


# --- jinja templates ---------------------------------------------------------------------------------------------
_HERMES_PROMPT = (
    "You can call functions to help with the user's request. The functions are described in JSON Schema "
    "inside the <tools></tools> tags:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, reply with a JSON object naming the function and its arguments inside "
    "<tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>'
)


def template_uses_tools(template: str) -> bool:
    """Whether a jinja chat template reads the ``tools`` variable."""
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


def template_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool],
                      template: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:  # fmt: skip
    """Messages and ``tools`` for a jinja template: as transformers passes them when the template handles
    tools; otherwise with the Hermes-style prompt, calls and results written into the messages."""
    specs = [dict(t.spec) for t in tools] or None
    if template_uses_tools(template):
        return [_object_arguments(m) for m in messages], specs
    out = []
    for m in check_messages(messages):
        m = dict(m)
        if m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                              ensure_ascii=False) + "\n</tool_call>"
                for c in m.pop("tool_calls")
            )  # fmt: skip
            m["content"] = (_text(m) + "\n" if _text(m) else "") + calls
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{_text(m)}\n</tool_response>"}
        out.append(m)
    if tools:
        listing = "\n".join(json.dumps(dict(t.spec), ensure_ascii=False) for t in tools)
        prompt = _HERMES_PROMPT.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0]["content"] = _text(out[0]) + "\n\n" + prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _object_arguments(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message as templates expect it: the JSON-text arguments of its tool calls parsed, and no content
    at all rather than None (OpenAI's calls come with ``"content": null``; a template sees it undefined)."""
    message = {k: v for k, v in message.items() if not (k == "content" and v is None)}
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
            with contextlib.suppress(ValueError):
                call = {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
        out.append(call)
    return {**message, "tool_calls": out}


def template_syntax(template: str) -> str:
    """How calls look in a jinja template's format: "json" for Meta's Llama templates, else "hermes"."""
    if template_uses_tools(template) and "<tool_call>" not in template and '"parameters": ' in template:
        return "json"
    return "hermes"
