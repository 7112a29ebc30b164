"""Round trip HF -> Meta -> GGUF (F32) -> HF keeps every tensor bit-exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llamaforge
from llamaforge.checkpoint import save_model

transformers = pytest.importorskip("transformers")

HAVE_GGUF_WRITER = importlib.util.find_spec("llamaforge.checkpoint.gguf") is not None


def hf_checkpoint(directory: Path, tied: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                      rope_theta=500000.0, tie_word_embeddings=tied, initializer_range=0.1)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return load_file(directory / "model.safetensors")


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), f"{name} differs"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_meta_gguf_hf(tied: bool, tmp_path: Path) -> None:
    if not HAVE_GGUF_WRITER:
        pytest.skip("llamaforge/checkpoint/gguf.py (the GGUF writer) is not in this tree yet")
    original = hf_checkpoint(tmp_path / "hf", tied, torch.float32)
    save_model(llamaforge.load(tmp_path / "hf").model, tmp_path / "meta", "meta")
    meta = llamaforge.load(tmp_path / "meta")
    assert meta.format == "meta"
    save_model(meta.model, tmp_path / "model.gguf", "gguf", dtype=torch.float32)
    gguf = llamaforge.load(tmp_path / "model.gguf")
    assert gguf.format == "gguf"
    save_model(gguf.model, tmp_path / "back", "hf")
    assert_bit_exact(original, load_file(tmp_path / "back" / "model.safetensors"))
    assert llamaforge.load(tmp_path / "back").config.tie_embeddings == tied


def test_hf_meta_hf_bfloat16(tmp_path: Path) -> None:
    original = hf_checkpoint(tmp_path / "hf", False, torch.bfloat16)
    save_model(llamaforge.load(tmp_path / "hf").model, tmp_path / "meta", "meta")
    save_model(llamaforge.load(tmp_path / "meta").model, tmp_path / "back", "hf")
    assert_bit_exact(original, load_file(tmp_path / "back" / "model.safetensors"))
