"""The hand-off to serving engines: ``llamaforge convert --to hf`` writes a directory that transformers (which
vLLM and llama.cpp's converter build on) loads unchanged — weights, config, tokenizer, chat template and a
generation config whose stop ids are llamaforge's — and that greedy-decodes to the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.chat import NAMED_FORMATS, format_chat, named_template
from llamaforge.checkpoint import save_model
from llamaforge.config import ModelConfig
from llamaforge.model import build_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.conformance

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]},
     {"role": "assistant", "content": "call", "stop_reason": "end_of_message"}, {"role": "tool", "content": "42"}],
]  # fmt: skip


def convert(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "llamaforge", "convert", *args], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("name", NAMED_FORMATS)
def test_named_formats_as_templates(name: str) -> None:
    """The jinja form of each named format renders, in transformers, the text llamaforge's format gives."""
    template = named_template(name)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer())
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            try:
                expected = format_chat(messages, name, add_generation_prompt=generation_prompt)
            except ValueError:  # e.g. a tool message in Llama 2's format: the template refuses it too
                with pytest.raises(Exception, match="llama2 chat format"):
                    tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)  # fmt: skip
                continue
            got = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=generation_prompt)  # fmt: skip
            assert got == expected
            assert format_chat(messages, template, add_generation_prompt=generation_prompt) == expected


def _byte_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))


def _llama3_tokenizer():
    spec = pytest.importorskip("llama_models")
    return llamaforge.load_tokenizer(Path(spec.__file__).parent / "llama3" / "tokenizer.model")


def _same_greedy_tokens(directory: Path, prompt: str, n: int) -> None:
    llm = llamaforge.load(directory, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": prompt}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == llm.tokenizer.format_chat(messages)
    ids = llm.tokenizer.encode_chat(messages)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    # both stop at (and keep) the first of the generation config's stop ids (transformers), the tokenizer's (ours)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                pad_token_id=hf_tokenizer.eos_token_id)[0, len(ids) :].tolist()  # fmt: skip
    assert out == llm.generate(ids, max_new_tokens=n, temperature=0).token_ids


def test_convert_to_hf_loads_unchanged_in_transformers(tmp_path: Path) -> None:
    """A Llama 3 shaped model with Meta's tokenizer (a named chat format, end-of-turn stop ids), through the CLI."""
    tokenizer = _llama3_tokenizer()
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=tokenizer.vocab_size,
                         max_seq_len=128, rope_theta=500000.0)  # fmt: skip
    torch.manual_seed(0)
    save_model(build_model(config), tmp_path / "meta", "meta", tokenizer=tokenizer)
    convert(str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf")
    out = tmp_path / "hf"
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert hf_config.architectures == ["LlamaForCausalLM"] and hf_config.num_key_value_heads == 2
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert sorted(generation.eos_token_id) == sorted(tokenizer.stop_ids)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == named_template("llama3")
    _same_greedy_tokens(out, "Name three colors.", 12)


def test_quantized_gguf_converts_to_hf(tmp_path: Path) -> None:
    """A GGUF of Q8_0 blocks (which load() runs as blocks) is dequantized for a Hugging Face directory."""
    torch.manual_seed(0)
    save_model(build_model(llamaforge.get_preset("tiny")), tmp_path / "src", "hf")
    convert(str(tmp_path / "src"), str(tmp_path / "q.gguf"), "--to", "gguf", "--quantize", "q8_0")
    convert(str(tmp_path / "q.gguf"), str(tmp_path / "hf"), "--to", "hf")
    back = llamaforge.load(tmp_path / "hf")
    blocks = llamaforge.load(tmp_path / "q.gguf", dtype=torch.float32)
    assert back.model.layers[0].attention.wq.weight.dtype == torch.float32
    tokens = torch.randint(0, 512, (1, 16))
    with torch.inference_mode():
        torch.testing.assert_close(back.model(tokens), blocks.model(tokens), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_builtin_model_converted_generates_the_same_in_transformers(tmp_path: Path) -> None:
    """The built-in SmolLM2-135M-Instruct (GGUF) converted to HF: its real weights, template and tokenizer give
    transformers the same greedy answer as llamaforge."""
    convert("smollm2-135m-instruct", str(tmp_path / "hf"), "--to", "hf")
    _same_greedy_tokens(tmp_path / "hf", "What is the capital of France?", 16)
