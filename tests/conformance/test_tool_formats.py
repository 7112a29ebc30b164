"""Tools in the chat formats, against independent implementations: jinja templates that take ``tools`` render
byte for byte as transformers renders them; Meta's formats match Meta's published templates (for the tool
prompt) and the ``llama-models`` formatter token for token (for past calls and their results)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from llamaforge.chat import format_chat
from llamaforge.tokenizer import load_tokenizer

pytestmark = pytest.mark.conformance

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "UTC time", "parameters": {}}}


def _call(call_id: str, name: str, args: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather in Zürich?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("call_1", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ],
    [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "assistant", "content": "It is sunny in Oslo."},
        {"role": "user", "content": "Thanks!"},
    ],
]


@pytest.fixture(scope="module")
def hf(smollm2_gguf: Path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tok = load_tokenizer(smollm2_gguf)
    backend = Tokenizer.from_str(tok.backend.to_str())
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _templates() -> dict[str, str]:
    trl = pytest.importorskip("trl")
    from transformers.models.llama4 import processing_llama4

    directory = Path(trl.__file__).parent / "chat_templates"
    found = {n: (directory / f"{n}.jinja").read_text() for n in ("llama3_1", "llama3_2", "qwen2_5", "qwen3")}
    found["llama4"] = processing_llama4.chat_template
    return found


def _reference(hf, messages: list[dict], template: str, **kw) -> str:
    """transformers' rendering: tool-call arguments as objects, as its documentation asks."""
    messages = copy.deepcopy(messages)
    for m in messages:
        if m.get("content") is None:
            m.pop("content")
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


@pytest.mark.parametrize("name", ["llama3_1", "llama3_2", "qwen2_5", "qwen3", "llama4"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_with_tools_match_transformers(hf, name: str, messages: list[dict], add_generation_prompt) -> None:
    template = _templates()[name]
    tools = [WEATHER, TIME]
    kw = {"add_generation_prompt": add_generation_prompt, "date_string": "07 Dec 2025"}
    expected = _reference(hf, messages, template, tools=tools, bos_token="<s>", eos_token="</s>", **kw)
    assert format_chat(messages, template, tools=tools, bos_token="<s>", eos_token="</s>", **kw) == expected


def _llama3_tokenizer():
    import llama_models

    return load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


@pytest.mark.parametrize("messages", CONVERSATIONS[:2])
@pytest.mark.parametrize("in_user", [True, False])
def test_llama3_tool_prompt_is_metas_template(hf, messages: list[dict], in_user: bool) -> None:
    """The named llama3 format writes the tool prompt as Meta's Llama 3.1 chat template does, with built-in
    tools on the ``Tools:`` line."""
    template = _templates()["llama3_1"]
    tok = _llama3_tokenizer()
    search = {"type": "function", "function": {"name": "brave_search", "description": "web search"}}
    for tools, builtin in (([WEATHER, TIME], None), ([WEATHER, search], ["brave_search", "code_interpreter"])):
        extra = {"builtin_tools": builtin} if builtin else {}
        ours_tools = tools + ([{"type": "function", "function": {"name": "code_interpreter"}}] if builtin else [])
        custom = [t for t in tools if t["function"]["name"] != "brave_search"]
        expected = _reference(hf, messages, template, tools=custom, bos_token="<|begin_of_text|>",
                              date_string="07 Dec 2025", tools_in_user_message=in_user, add_generation_prompt=True,
                              **extra)  # fmt: skip
        kw = {"tools": ours_tools, "date_string": "07 Dec 2025", "tools_in_user_message": in_user}
        assert format_chat(messages, "llama3", **kw) == expected
        assert tok.encode_chat(messages, **kw) == tok.encode(expected, allow_special=True)


@pytest.mark.parametrize("messages", CONVERSATIONS[:2])
def test_llama4_json_tool_prompt_is_metas_template(hf, messages: list[dict]) -> None:
    template = _templates()["llama4"]
    expected = _reference(hf, messages, template, tools=[WEATHER], bos_token="<|begin_of_text|>",
                          add_generation_prompt=True)  # fmt: skip
    assert format_chat(messages, "llama4", tools=[WEATHER], tool_format="json") == expected


# --- past calls as Meta's llama-models formatter writes them ------------------------------------------------------
HISTORY = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("c1", "get_weather", {"city": "Zürich"})]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
    {"role": "user", "content": "Search the price of gold."},
    {"role": "assistant", "content": "", "tool_calls": [_call("c2", "brave_search", {"query": "gold price"})]},
    {"role": "tool", "tool_call_id": "c2", "content": "2000 USD/oz"},
    {"role": "user", "content": "Compute 2**10."},
    {"role": "assistant", "content": "", "tool_calls": [_call("c3", "code_interpreter", {"code": "print(2**10)"})]},
    {"role": "tool", "tool_call_id": "c3", "content": "1024"},
]


def _raw_messages(messages: list[dict]):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall

    raw = []
    for m in messages:
        calls = [
            ToolCall(call_id=c["id"], tool_name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"]))
            for c in m.get("tool_calls", [])
        ]
        builtin = any(c["function"]["name"] in ("brave_search", "code_interpreter") for c in m.get("tool_calls", []))
        stop = StopReason.end_of_message if builtin else StopReason.end_of_turn
        raw.append(RawMessage(role=m["role"], content=m.get("content") or "", tool_calls=calls, stop_reason=stop))
    return raw


@pytest.mark.parametrize("style", ["json", "pythonic"])
def test_llama3_history_matches_llama_models(style: str) -> None:
    pytest.importorskip("llama_models")
    from llama_models.datatypes import ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ToolPromptFormat.json if style == "json" else ToolPromptFormat.python_list
    expected = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt(_raw_messages(HISTORY), fmt).tokens
    assert _llama3_tokenizer().encode_chat(HISTORY, tool_format=style) == expected


def test_llama4_history_matches_llama_models(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_models")
    import importlib.util
    import types

    import llama_models

    if importlib.util.find_spec("torchvision") is None:  # imported by Meta's image preprocessing only
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = types.ModuleType("torchvision.transforms.functional")  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
        monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)
        monkeypatch.setitem(sys.modules, "torchvision.transforms.functional", transforms.functional)
    from llama_models.datatypes import ToolPromptFormat
    from llama_models.llama4.chat_format import ChatFormat
    from llama_models.llama4.tokenizer import Tokenizer

    history = [m for m in HISTORY[:5]]  # custom calls (Llama 4 has no built-in tool syntax of its own)
    expected = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt(
        _raw_messages(history), ToolPromptFormat.python_list
    )
    tok = load_tokenizer(Path(llama_models.__file__).parent / "llama4" / "tokenizer.model")
    assert tok.encode_chat(history) == expected.tokens


def test_llama_decoders_stop_at_end_of_message_and_end_of_turn() -> None:
    """A Llama 3.1 built-in call ends with <|eom_id|> (Llama 4: <|eom|>): generation must stop there too."""
    pytest.importorskip("llama_models")
    import llama_models

    root = Path(llama_models.__file__).parent
    for generation, names in (("llama3", ("<|eom_id|>", "<|eot_id|>")), ("llama4", ("<|eom|>", "<|eot|>"))):
        tok = load_tokenizer(root / generation / "tokenizer.model")
        assert {tok.token_id(n) for n in names} <= tok.stop_ids
