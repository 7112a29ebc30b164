"""Chat formats: byte-identical to transformers' apply_chat_template and to Meta's ChatFormat; a safe sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaforge.chat import ChatTemplateError, format_chat, render_chat
from llamaforge.tokenizer import load_tokenizer

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json on the hub).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-2-7b-chat-hf's chat template.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Exercises what transformers adds to jinja: tojson, namespace, loop controls, raise_exception, generation.
FEATURES_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- for message in messages -%}
  {%- if message.role not in ['system', 'user', 'assistant', 'tool'] -%}
    {{ raise_exception('bad role ' + message.role) }}
  {%- endif -%}
  {%- if message.role == 'tool' -%}{%- continue -%}{%- endif -%}
  {%- set ns.n = ns.n + 1 -%}
  <{{ message.role }} n={{ ns.n }}>
  {%- if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}
  {%- else %}{{ message.content }}{% endif %}
{% if message.tool_calls %}{{ message.tool_calls | tojson }}{% endif %}
{% endfor -%}
{%- if tools %}tools: {{ tools | tojson(indent=2) }}{% endif -%}
{%- if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "  Hello\nthere  "},
        {"role": "assistant", "content": "Hi. How can I help?"},
        {"role": "user", "content": "Write <|eot_id|> and </s> and 日本語 😀"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf: Path):  # transformers' view of SmolLM2's vocabulary, as the template's host
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tok = load_tokenizer(smollm2_gguf)
    backend = Tokenizer.from_str(tok.backend.to_str())  # a copy: transformers may add tokens to what it is given
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token
    )
    return tok, hf


def _reference(hf, messages, template: str, add_generation_prompt: bool = True, **kw) -> str:
    return hf.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_templates_match_transformers(hf_tokenizer, messages, add_generation_prompt: bool) -> None:
    tok, hf = hf_tokenizer
    for template in (tok.chat_template, LLAMA3_TEMPLATE, LLAMA2_TEMPLATE, FEATURES_TEMPLATE):
        if template == LLAMA2_TEMPLATE and messages[-1]["role"] == "assistant" and add_generation_prompt:
            continue
        ours = tok.format_chat(messages, add_generation_prompt=add_generation_prompt, template=template)
        assert ours == _reference(hf, messages, template, add_generation_prompt), template[:40]


def test_smollm2_chat_tokens_match_transformers(hf_tokenizer) -> None:
    tok, hf = hf_tokenizer
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(
            messages, chat_template=tok.chat_template, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert tok.encode_chat(messages) == list(expected)
    assert tok.format_chat(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


def test_template_extras_match_transformers(hf_tokenizer) -> None:
    _tok, hf = hf_tokenizer
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get", "arguments": {"city": "Zürich"}}]},
        {"role": "tool", "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    ours = format_chat(messages, FEATURES_TEMPLATE, tools=tools)
    assert ours == _reference(hf, messages, FEATURES_TEMPLATE, tools=tools)
    assert '"Zürich"' in ours  # tojson keeps non-ASCII, like transformers
    one = [{"role": "user", "content": "x"}]
    date = format_chat(one, "{{ strftime_now('%Y') }}")
    assert date == _reference(hf, one, "{{ strftime_now('%Y') }}") and date.isdigit()
    with pytest.raises(ChatTemplateError, match="bad role robot"):
        format_chat([{"role": "robot", "content": "x"}], FEATURES_TEMPLATE)


# --- Meta's reference chat formats ------------------------------------------------------------------
META_CONVERSATIONS = [
    *CONVERSATIONS[:3],
    [
        {"role": "user", "content": "\n\nleading newlines"},
        {"role": "assistant", "content": "  spaced  "},
        {"role": "user", "content": "<|begin_of_text|>typed"},
    ],
    [
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": "call(x)", "stop_reason": "end_of_message"},
        {"role": "tool", "content": "42"},
    ],
]


@pytest.mark.parametrize("messages", META_CONVERSATIONS)
def test_llama3_matches_meta_chat_format(messages) -> None:
    pytest.importorskip("llama_models")
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    meta_tok = Tokenizer.get_instance()
    raw = [
        RawMessage(
            role=m["role"],
            content=m["content"],
            stop_reason=StopReason.end_of_message if m.get("stop_reason") else StopReason.end_of_turn,
        )
        for m in messages
    ]
    expected = ChatFormat(meta_tok).encode_dialog_prompt(raw).tokens
    ours = load_tokenizer(_llama3_path())
    assert ours.encode_chat(messages) == expected  # token for token
    assert ours.format_chat(messages) == meta_tok.decode(expected)  # byte for byte
    assert format_chat(messages, "llama3") == meta_tok.decode(expected)


def _llama3_path() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def test_llama2_format(hf_tokenizer) -> None:
    _, hf = hf_tokenizer
    for messages in CONVERSATIONS[:3]:
        expected = _reference(hf, messages, LLAMA2_TEMPLATE, bos_token="<s>", eos_token="</s>")
        assert format_chat(messages, "llama2") == expected
        assert format_chat(messages, "codellama") == format_chat(messages, "llama2")
    parts = render_chat(CONVERSATIONS[2], "llama2")
    # Meta's chat_completion encodes each turn as its own string with BOS and EOS; content is never special.
    assert [p for p in parts if p[1]] == [("<s>", True), ("</s>", True), ("<s>", True)]
    with pytest.raises(ValueError, match="alternate"):
        format_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "llama2")


def test_llama2_tokens_follow_meta(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    from test_tokenizer import train_sentencepiece

    tok = load_tokenizer(train_sentencepiece(tmp_path))
    messages = CONVERSATIONS[2]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    sys_user = "<<SYS>>\n" + messages[0]["content"] + "\n<</SYS>>\n\n" + messages[1]["content"]
    # Meta's llama/generation.py: each (user, answer) pair is encode(f"[INST] {u} [/INST] {a} ", bos, eos).
    expected = [1, *sp.encode(f"[INST] {sys_user.strip()} [/INST] {messages[2]['content'].strip()} "), 2]
    expected += [1, *sp.encode(f"[INST] {messages[3]['content'].strip()} [/INST]")]
    assert tok.encode_chat(messages, template="llama2") == expected


def test_llama4_format() -> None:
    text = format_chat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "llama4")
    assert text == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|>"
        "<|header_start|>ipython<|header_end|>\n\nx<|eom|><|header_start|>assistant<|header_end|>\n\n"
    )


# --- the sandbox ------------------------------------------------------------------------------------
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {marker}') }}",
    "{% import 'os' as os %}{{ os.system('touch {marker}') }}",
    "{% include '/etc/passwd' %}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ messages | attr('__class__') }}",
    "{{ raise_exception.__globals__ }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ namespace(_x=1) }}",
    "{{ 'x' * 1000000000 }}",
    "{{ 9 ** 99999999 }}",
    "{{ range(10000000000) | list }}",
    "{% for",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_escapes_fail_clearly(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ChatTemplateError) as info:
        format_chat([{"role": "user", "content": "hi"}], template.replace("{marker}", str(marker)))
    assert "chat template" in str(info.value)
    assert not marker.exists()


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown chat format"):
        format_chat([{"role": "user", "content": "x"}], "mistral")
    with pytest.raises(ValueError, match="messages"):
        format_chat({"role": "user"}, "llama3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        format_chat([{"content": "x"}], "llama3")
    messages = [{"role": "user", "content": "x", "image": object()}]
    assert format_chat(messages, "{{ messages[0].image }}") == "<object>"  # rich objects reach templates inert
