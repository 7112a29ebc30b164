"""Conformance: greedy generation of the built-in SmolLM2 model in float32 is token-for-token the same as
Hugging Face transformers' greedy output and llama.cpp's (an F32 GGUF) on the same dequantized weights.

The default run checks 16 tokens on two prompts; ``-m slow`` checks 64 tokens on four.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.checkpoint import save_model

pytestmark = pytest.mark.conformance

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "Photosynthesis is the process by which",
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> llamaforge.LLM:
    return llamaforge.load(smollm2_gguf, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(smol, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = save_model(smol.model, tmp_path_factory.mktemp("smol-hf"), "hf", dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def ours(smol: llamaforge.LLM, prompt: str, n: int) -> tuple[list[int], list[int]]:
    ids = smol.tokenizer.encode(prompt)
    return ids, smol.generate(ids, max_new_tokens=n, temperature=0).token_ids


def hf_greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos), pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def check_against_hf(smol, hf_model, prompts: list[str], n: int) -> None:
    for prompt in prompts:
        ids, tokens = ours(smol, prompt, n)
        assert tokens == hf_greedy(hf_model, ids, n, smol.tokenizer.stop_ids), prompt


def test_greedy_matches_transformers_16_tokens(smol, hf_model):
    check_against_hf(smol, hf_model, PROMPTS[:2], 16)


@pytest.mark.slow
def test_greedy_matches_transformers_64_tokens(smol, hf_model):
    check_against_hf(smol, hf_model, PROMPTS, 64)


@pytest.fixture(scope="module")
def cpp_model(smol, tmp_path_factory):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path_factory.mktemp("smol-gguf") / "smollm2-f32.gguf"
    save_model(smol.model, path, "gguf", tokenizer=smol.tokenizer, dtype=torch.float32)
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False, logits_all=False)


def cpp_greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    model.reset()
    out: list[int] = []
    for token in model.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token in eos or len(out) == n:
            break
    return out


def check_against_llama_cpp(smol, cpp_model, prompts: list[str], n: int) -> None:
    for prompt in prompts:
        ids, tokens = ours(smol, prompt, n)
        assert tokens == cpp_greedy(cpp_model, ids, n, smol.tokenizer.stop_ids), prompt


def test_greedy_matches_llama_cpp_f32_16_tokens(smol, cpp_model):
    check_against_llama_cpp(smol, cpp_model, PROMPTS[:2], 16)


@pytest.mark.slow
def test_greedy_matches_llama_cpp_f32_64_tokens(smol, cpp_model):
    check_against_llama_cpp(smol, cpp_model, PROMPTS, 64)
