"""Tool calling: checking requests, reading calls out of answers (whole and streamed), forced-call grammars."""

from __future__ import annotations

import json
import random

import pytest

from llamaforge.tools import (
    ToolCallParser,
    ToolError,
    check_messages,
    parse_tool_choice,
    parse_tools,
    plan_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SEARCH = {"type": "function", "function": {"name": "brave_search"}}
CODE = {"type": "function", "function": {"name": "code_interpreter"}}
TOOLS = parse_tools([WEATHER, TIME, SEARCH, CODE])


# --- checking what clients send ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tools", "param", "words"),
    [
        ("get_weather", "tools", "list"),
        ([WEATHER, WEATHER], "tools.1.function.name", "duplicate function name 'get_weather'"),
        ([{"type": "retrieval"}], "tools.0.type", "'function'"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools.0.function.name", "letters"),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "tools.0.function.parameters", "schema"),
        ([{"type": "function"}], "tools.0.function", "name"),
    ],
)
def test_bad_tools_name_the_field(tools, param: str, words: str) -> None:
    with pytest.raises(ToolError, match=words) as info:
        parse_tools(tools)
    assert info.value.param == param


def test_tool_choice() -> None:
    assert parse_tool_choice(None, TOOLS).mode == "auto"
    assert parse_tool_choice(None, []).mode == "none"
    assert parse_tool_choice("required", TOOLS).forced
    named = parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS)
    assert (named.mode, named.name, named.forced) == ("named", "get_time", True)
    with pytest.raises(ToolError, match="'nope', which is not in 'tools'") as info:
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    assert info.value.param == "tool_choice"
    for bad in ("always", {"type": "function"}, 3):
        with pytest.raises(ToolError):
            parse_tool_choice(bad, TOOLS)
    with pytest.raises(ToolError, match="at least one tool"):
        parse_tool_choice("required", [])


def test_tool_messages_must_answer_known_calls() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    checked = check_messages(messages)
    assert checked[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # parsed for templates
    assert checked[2]["name"] == "get_weather"
    with pytest.raises(ToolError, match="'call_2' does not match") as info:
        check_messages([*messages, {"role": "tool", "tool_call_id": "call_2", "content": "x"}])
    assert info.value.param == "messages.3.tool_call_id"
    broken = {**call, "function": {"name": "get_weather", "arguments": "{city"}}
    with pytest.raises(ToolError, match="not valid JSON") as info:
        check_messages([{"role": "assistant", "tool_calls": [broken]}])
    assert info.value.param == "messages.0.tool_calls.0.function.arguments"
    with pytest.raises(ToolError, match="only assistant"):
        check_messages([{"role": "user", "content": "x", "tool_calls": [call]}])


def test_plan_refuses_formats_without_tools() -> None:
    with pytest.raises(ToolError, match="no tool calling"):
        plan_tools("llama2", [WEATHER])
    assert plan_tools("llama2", [WEATHER], "none").parser() is None
    with pytest.raises(ToolError, match="unknown tool format"):
        plan_tools("llama3", [WEATHER], tool_format="xml")
    plan = plan_tools("llama3", [WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    assert plan.syntax == "json" and plan.grammar is not None and plan.render_options["tools"] == [WEATHER]
    assert plan_tools("llama4", [WEATHER]).syntax == "pythonic" and plan_tools("llama4", [WEATHER]).grammar is None
    assert plan_tools("llama3", [WEATHER], "none").render_options["tools"] is None
    assert plan_tools("{{ tools }}<tool_call>", [WEATHER]).syntax == "hermes"


# --- reading answers ----------------------------------------------------------------------------------------------
PARSED = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    (
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        None,
        [("get_weather", {"city": "Paris", "unit": "c"})],
    ),
    (
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time"}]</tool_call>',
        None,
        [("get_weather", {"city": "A"}), ("get_time", {})],
    ),
    (
        "[get_weather(city='San Francisco', unit=\"f\"), get_time()]",
        None,
        [("get_weather", {"city": "San Francisco", "unit": "f"}), ("get_time", {})],
    ),
    ('<|python_start|>[get_weather(city="Bern")]<|python_end|>', None, [("get_weather", {"city": "Bern"})]),
    ("[get_weather(city=null, unit=true)]", None, [("get_weather", {"city": None, "unit": True})]),
    ('<|python_tag|>brave_search.call(query="gold price")', None, [("brave_search", {"query": "gold price"})]),
    ("<|python_tag|>print(sum(range(10)))", None, [("code_interpreter", {"code": "print(sum(range(10)))"})]),
    ('<function=get_weather>{"city": "Oslo"}</function>', None, [("get_weather", {"city": "Oslo"})]),
    ('{"name": "get_weather", "parameters": "{\\"city\\": \\"X\\"}"}', None, [("get_weather", {"city": "X"})]),
    ("  The weather is nice.", "  The weather is nice.", []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "launch_rockets", "parameters": {}}', '{"name": "launch_rockets", "parameters": {}}', []),
    ("[1] First point", "[1] First point", []),
    ("[get_weather(city=os.environ)]", "[get_weather(city=os.environ)]", []),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
]


def _run(text: str, sizes: list[int], max_calls: int | None = None):
    parser = ToolCallParser(TOOLS, max_calls=max_calls)
    deltas, i = [], 0
    while i < len(text):
        n = sizes[len(deltas) % len(sizes)]
        deltas += parser.feed(text[i : i + n])
        i += n
    deltas += parser.finish()
    return parser, deltas


@pytest.mark.parametrize(("text", "content", "calls"), PARSED)
def test_parser_reads_every_syntax(text: str, content: str | None, calls: list) -> None:
    parser, _ = _run(text, [len(text) or 1])
    assert parser.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parser.tool_calls] == calls
    assert all(c.id.startswith("call_") for c in parser.tool_calls)


@pytest.mark.parametrize(("text", "content", "calls"), PARSED)
def test_streamed_deltas_add_up_to_the_whole_answer(text: str, content: str | None, calls: list) -> None:
    rng = random.Random(len(text))
    for sizes in ([1], [3], [rng.randint(1, 9) for _ in range(20)]):
        parser, deltas = _run(text, sizes)
        assert (parser.content, [c.name for c in parser.tool_calls]) == (content, [c[0] for c in calls])
        streamed = "".join(d.content for d in deltas if d.content)
        assert streamed.strip() == (content or "").strip()
        args: dict[int, str] = {}
        for d in deltas:
            if d.index is None:
                continue
            if d.name is not None:  # the first delta of a call carries its id and name, and comes first
                assert d.index not in args and d.id == parser.tool_calls[d.index].id
                args[d.index] = ""
            args[d.index] += d.arguments or ""
        assert [args[i] for i in sorted(args)] == [c.arguments for c in parser.tool_calls]


def test_json_arguments_stream_in_fragments() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
    _, deltas = _run(text, [2])
    fragments = [d.arguments for d in deltas if d.index == 0 and d.name is None]
    assert len(fragments) > 5 and "".join(fragments) == '{"city": "Paris", "unit": "c"}'
    assert deltas[0].name == "get_weather" and deltas[0].arguments == ""


def test_content_is_held_back_only_while_it_may_become_a_call() -> None:
    parser = ToolCallParser(TOOLS)
    assert [d.content for d in parser.feed("Hello <tool")] == ["Hello "]
    assert [d.content for d in parser.feed("ing is fun")] == ["<tooling is fun"]
    assert parser.finish() == []
    assert parser.content == "Hello <tooling is fun" and not parser.tool_calls


def test_parallel_calls_off_keeps_the_first() -> None:
    parser, _ = _run("[get_weather(city='A'), get_time()]", [4], max_calls=1)
    assert [c.name for c in parser.tool_calls] == ["get_weather"]


def test_code_needs_the_code_interpreter() -> None:
    parser = ToolCallParser(parse_tools([WEATHER]))
    assert parser.parse("<|python_tag|>print(1)") == ("<|python_tag|>print(1)", [])


# --- against Meta's own reader ---------------------------------------------------------------------------------------
@pytest.mark.conformance
@pytest.mark.parametrize(
    "text",
    [
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        "[get_weather(city='San Francisco', unit='celsius')]",
        '<function=get_weather>{"city": "Oslo"}</function>',
    ],
)
def test_custom_calls_read_as_llama_models_reads_them(text: str) -> None:
    pytest.importorskip("llama_models")
    from llama_models.llama3.tool_utils import ToolUtils

    name, args = ToolUtils.maybe_extract_custom_tool_call(text)
    parser = ToolCallParser(parse_tools([WEATHER]))
    _, calls = parser.parse(text)
    assert [(c.name, c.args) for c in calls] == [(name, args)]


@pytest.mark.conformance
def test_builtin_and_code_calls_read_as_llama_models_reads_them() -> None:
    pytest.importorskip("llama_models")
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer.get_instance())
    for text in ['<|python_tag|>brave_search.call(query="price of gold")<|eom_id|>', "<|python_tag|>x = 1<|eom_id|>"]:
        message = fmt.decode_assistant_message_from_content(text, StopReason.end_of_turn)
        expected = [(c.tool_name.value, c.arguments) for c in message.tool_calls]
        _, calls = ToolCallParser(TOOLS).parse(text.removesuffix("<|eom_id|>"))
        assert [(c.name, c.args) for c in calls] == expected
