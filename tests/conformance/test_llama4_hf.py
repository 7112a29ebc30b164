"""Conformance: tiny random-weight transformers ``Llama4ForCausalLM`` models in the Scout layout (every layer a
mixture of experts, QK norm, Llama 3.1-style RoPE scaling with Scout's low = high frequency factor) and the Maverick
layout (dense and MoE layers interleaved, no QK norm, 128 experts) load into llamaforge with the same float32 logits
(1e-4), generate the same greedy tokens, and convert to GGUF and back bit-exactly.

Every Llama 4 feature is exercised at a short context: chunked attention in chunks of 8 tokens, NoPE on every
4th layer, attention temperature tuning with a floor of 4 positions (the real 8192 would leave it at 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llamaforge
from llamaforge.checkpoint import save_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.conformance

TOL = 1e-4
TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=320, intermediate_size=32, intermediate_size_mlp=96, max_position_embeddings=512,
            attention_chunk_size=8, floor_scale=4, attn_scale=0.5, rms_norm_eps=1e-5,
            initializer_range=0.1)  # fmt: skip
LAYOUTS = {
    "scout": dict(num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                   "original_max_position_embeddings": 64}),
    "maverick": dict(num_local_experts=128, num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "top2": dict(num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=2, use_qk_norm=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}  # fmt: skip


def hf_llama4(layout: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Llama4TextConfig(**TEXT, **LAYOUTS[layout])
    model = transformers.Llama4ForCausalLM(config).float().eval()
    with torch.no_grad():  # the default init leaves norms at 1: randomize them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=list(LAYOUTS))
def checkpoint(request, tmp_path_factory) -> tuple[str, object, Path]:
    model = hf_llama4(request.param)
    path = tmp_path_factory.mktemp(f"llama4-{request.param}")
    model.save_pretrained(path)
    return request.param, model, path


def tokens(n: int = 40, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TEXT["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def test_config_reads_the_layout(checkpoint) -> None:
    layout, _, path = checkpoint
    config = llamaforge.load(path).config
    spec = LAYOUTS[layout]
    assert config.n_experts == spec["num_local_experts"] and config.moe_every == spec["interleave_moe_layer_step"]
    assert config.use_qk_norm == spec["use_qk_norm"] and config.nope_layer_interval == 4
    assert config.attention_chunk_size == 8 and config.attn_floor_scale == 4 and config.attn_scale == 0.5
    assert config.expert_hidden_dim == 32 and config.ffn_hidden_dim == 96 and config.dim_per_head == 16


def test_logits_match_transformers(checkpoint) -> None:
    layout, model, path = checkpoint
    llm = llamaforge.load(path, dtype=torch.float32)
    x = tokens()
    with torch.inference_mode():
        diff = (llm.model(x) - model(x).logits).abs().max().item()
    assert diff < TOL, f"{layout}: max abs logit difference {diff}"


def test_greedy_generation_matches_transformers(checkpoint) -> None:
    """Through the engine (paged KV cache, chunked prefill, decode steps) against transformers' own cache."""
    layout, model, path = checkpoint
    llm = llamaforge.load(path, dtype=torch.float32)
    ids = tokens(21, 1, seed=3)[0].tolist()
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)  # fmt: skip
    got = llm.generate(ids, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids
    assert got == want[0, len(ids) :].tolist(), layout


def test_written_directory_loads_in_transformers(checkpoint, tmp_path: Path) -> None:
    layout, model, path = checkpoint
    llm = llamaforge.load(path, dtype=torch.float32)
    save_model(llm.model, tmp_path / "out", "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(reloaded).__name__ == "Llama4ForCausalLM"
    x = tokens(33, 1, seed=4)
    with torch.inference_mode():
        diff = (reloaded(x).logits - model(x).logits).abs().max().item()
    assert diff == 0.0, f"{layout}: the rewritten checkpoint changes the logits by {diff}"


def test_convert_round_trips_are_bit_exact(checkpoint, tmp_path: Path) -> None:
    """HF -> GGUF (F32) -> HF and HF -> HF keep every tensor's bytes; the GGUF model computes the same logits."""
    layout, _, path = checkpoint
    original = load_file(path / "model.safetensors")
    llm = llamaforge.load(path)
    save_model(llm.model, tmp_path / "m.gguf", "gguf")
    gguf = llamaforge.load(tmp_path / "m.gguf")
    assert gguf.format == "gguf" and gguf.config.replace(name="", extra={}) == llm.config.replace(name="", extra={})
    save_model(gguf.model, tmp_path / "back", "hf")
    save_model(llm.model, tmp_path / "direct", "hf")
    for out in ("back", "direct"):
        written = load_file(tmp_path / out / "model.safetensors")
        assert sorted(written) == sorted(original), out
        for name, t in original.items():
            same = written[name].dtype == t.dtype and torch.equal(written[name].view(torch.uint8), t.view(torch.uint8))
            assert same, f"{layout}: {name} differs after {out}"
    x = tokens(24, 1, seed=5)
    with torch.inference_mode():  # the same weights, stored transposed: equal up to the matmuls' rounding
        torch.testing.assert_close(gguf.model(x), llm.model(x), atol=1e-5, rtol=0)


def test_conditional_generation_checkpoint_runs_its_language_model(tmp_path: Path) -> None:
    """A ``Llama4ForConditionalGeneration`` directory (Scout and Maverick as released: a vision tower beside the
    language model) loads its language model, with text-only logits equal to transformers', and its image side into
    ``llm.vision`` (images: ``test_llama4_vision_hf.py``)."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=56,
                  patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                  pixel_shuffle_ratio=0.5)  # fmt: skip
    config = transformers.Llama4Config(text_config={**TEXT, **LAYOUTS["scout"]}, vision_config=vision)
    model = transformers.Llama4ForConditionalGeneration(config).float().eval()
    model.save_pretrained(tmp_path)
    llm = llamaforge.load(tmp_path, dtype=torch.float32)
    assert llm.vision is not None and llm.vision.kind == "fusion"
    x = tokens(30, 1, seed=6)
    with torch.inference_mode():
        diff = (llm.model(x) - model(input_ids=x).logits).abs().max().item()
    assert diff < TOL, diff
