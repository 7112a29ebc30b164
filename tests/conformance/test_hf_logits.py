"""Conformance: random-weight transformers LlamaForCausalLM models load into llamaforge with the same logits,
and llamaforge's Hugging Face writer produces directories that transformers loads to the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.checkpoint import save_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.conformance

TOL = 1e-4
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # fmt: skip

SHAPES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa-theta-1e6": dict(num_key_value_heads=1, rope_theta=1e6),
    "llama31-rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "head-dim-32": dict(num_key_value_heads=2, head_dim=32),
}


def hf_model(**overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # the default init leaves norms at 1; randomize them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens).logits.float()


def our_logits(llm, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model(tokens).float()


@pytest.mark.parametrize("shape", SHAPES)
def test_load_matches_transformers(shape: str, tmp_path: Path) -> None:
    model = hf_model(**SHAPES[shape])
    model.save_pretrained(tmp_path)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 80), generator=torch.Generator().manual_seed(1))
    llm = llamaforge.load(tmp_path, dtype=torch.float32)
    assert llm.format == "hf"
    assert llm.config.tie_embeddings == bool(SHAPES[shape].get("tie_word_embeddings", False))
    diff = (our_logits(llm, tokens) - hf_logits(model, tokens)).abs().max().item()
    assert diff < TOL, f"{shape}: max abs logit difference {diff}"


@pytest.mark.parametrize("shape", ["gqa", "llama31-rope", "tied", "head-dim-32"])
def test_written_directory_loads_in_transformers(shape: str, tmp_path: Path) -> None:
    model = hf_model(**SHAPES[shape])
    model.save_pretrained(tmp_path / "src")
    llm = llamaforge.load(tmp_path / "src", dtype=torch.float32)
    save_model(llm.model, tmp_path / "out", "hf")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"config.json", "model.safetensors",
                                                             "generation_config.json"}  # fmt: skip
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    tokens = torch.randint(0, BASE["vocab_size"], (1, 72), generator=torch.Generator().manual_seed(2))
    diff = (hf_logits(reloaded, tokens) - hf_logits(model, tokens)).abs().max().item()
    assert diff < TOL, f"{shape}: max abs logit difference {diff}"
    ours = (our_logits(llm, tokens) - hf_logits(reloaded, tokens)).abs().max().item()
    assert ours < TOL
