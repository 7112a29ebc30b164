"""GGUF quantizers (gguf_quants.quantize / quantize_weights) and llama.cpp's mixes (gguf_mixes), without llama.cpp.

The byte-for-byte comparison with llama.cpp's own quantizer is in tests/conformance/test_gguf_kquant_llamacpp.py;
here: the public function's contract, accuracy, and that chunking, threads and input dtypes change nothing.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from llamaforge import gguf_quants
from llamaforge.config import get_preset
from llamaforge.gguf_mixes import MIXES, mix, tensor_type
from llamaforge.gguf_quants import QUANTIZABLE, dequantize, quantize, quantize_weights

# Relative RMS error of quantize -> dequantize on Gaussian weights (measured 0.0053, 0.086, 0.078, 0.043,
# 0.038, 0.30, 0.15, 0.072, 0.036, 0.018), with some room.
ERROR_BOUNDS = {Q.Q8_0: 0.007, Q.Q4_0: 0.1, Q.Q4_1: 0.09, Q.Q5_0: 0.05, Q.Q5_1: 0.045, Q.Q2_K: 0.33,
                Q.Q3_K: 0.17, Q.Q4_K: 0.08, Q.Q5_K: 0.042, Q.Q6_K: 0.021}  # fmt: skip


def test_every_block_type_has_a_quantizer() -> None:
    assert set(ERROR_BOUNDS) == QUANTIZABLE


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE), ids=lambda q: q.name)
def test_quantize_weights_is_the_gguf_matrix_layout(qtype: Q) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 1024)
    blocks = quantize_weights(w, qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == torch.uint8 and blocks.shape == (48, 1024 // block * type_size)
    assert torch.equal(quantize_weights(w, qtype.name.lower()), blocks)
    back = dequantize(blocks, qtype)
    assert back.shape == w.shape
    error = (back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
    assert error < ERROR_BOUNDS[qtype]
    # Lower-bit types do worse: the error is really the quantization's, not noise.
    assert error > ERROR_BOUNDS[qtype] / 3


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE), ids=lambda q: q.name)
def test_half_inputs_quantize_as_their_float32_values(qtype: Q) -> None:
    torch.manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(8, 512) * 0.02).to(dtype)
        assert torch.equal(quantize_weights(w, qtype), quantize_weights(w.float(), qtype)), dtype


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q3_K, Q.Q6_K, Q.Q5_0], ids=lambda q: q.name)
def test_chunks_and_threads_change_nothing(monkeypatch: pytest.MonkeyPatch, qtype: Q) -> None:
    torch.manual_seed(2)
    w = torch.randn(40, 768) * torch.logspace(-3, 1, 40).unsqueeze(1)
    whole = quantize_weights(w, qtype)
    rows = torch.cat([quantize_weights(w[i : i + 1], qtype) for i in range(w.shape[0])])
    assert torch.equal(whole, rows)
    monkeypatch.setattr(gguf_quants, "_QUANT_CHUNK_WEIGHTS", 1000)  # 4 blocks a chunk, many chunks
    torch.set_num_threads(2)  # conftest resets it
    assert torch.equal(quantize_weights(w, qtype), whole)


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE), ids=lambda q: q.name)
def test_zero_and_constant_rows(qtype: Q) -> None:
    w = torch.zeros(3, 256)
    w[1] = 0.25
    w[2] = -3.0
    back = dequantize(quantize_weights(w, qtype), qtype)
    assert torch.equal(back[0], torch.zeros(256))
    assert torch.allclose(back[1:], w[1:], rtol=0.02, atol=0)


def test_quantize_takes_any_leading_shape() -> None:
    w = torch.randn(2, 3, 256)
    assert torch.equal(quantize(w, Q.Q4_K).reshape(6, -1), quantize_weights(w.reshape(6, 256), Q.Q4_K))


def test_quantize_weights_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"expected a weight matrix \[rows, n\], got shape \(256,\)"):
        quantize_weights(torch.zeros(256), Q.Q4_K)
    with pytest.raises(ValueError, match="unknown GGUF type 'q4_z'"):
        quantize_weights(torch.zeros(2, 256), "q4_z")
    with pytest.raises(ValueError, match="Q4_K: row length 288 is not a multiple of 256"):
        quantize_weights(torch.zeros(2, 288), "Q4_K")
    with pytest.raises(NotImplementedError, match="no quantizer for GGUF type IQ2_XS"):
        quantize_weights(torch.zeros(2, 256), Q.IQ2_XS)


# Mixes (their agreement with llama.cpp's choices is tested in the conformance test) ----------------------
def test_mix_names_and_errors() -> None:
    assert mix("Q4_K_M") is MIXES["q4_k_m"] and MIXES["q4_k_m"].default == Q.Q4_K
    with pytest.raises(ValueError, match=r"unknown quantization mix 'q4_k_x'; choose one of q2_k, .*q8_0"):
        mix("q4_k_x")


def llama_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    d, kv, ffn = config.dim, config.kv_heads * config.dim_per_head, config.ffn_hidden_dim
    shapes = {
        "tok_embeddings.weight": (config.vocab_size, d),
        "norm.weight": (d,),
        "output.weight": (config.vocab_size, d),
    }
    for i in range(config.n_layers):
        for part, shape in [("attention.wq", (d, d)), ("attention.wk", (kv, d)), ("attention.wv", (kv, d)),
                            ("attention.wo", (d, d)), ("feed_forward.w1", (ffn, d)), ("feed_forward.w3", (ffn, d)),
                            ("feed_forward.w2", (d, ffn)), ("attention_norm", (d,)), ("ffn_norm", (d,))]:  # fmt: skip
            shapes[f"layers.{i}.{part}.weight"] = shape
    return shapes


def test_llama_3_8b_q4_k_m_layout() -> None:
    """Llama-3-8B in q4_k_m has what llama.cpp reports for the Q4_K_M files people download:
    65 f32, 193 q4_K and 33 q6_K tensors (the head, and attn_v + ffn_down in 16 of the 32 layers)."""
    config = get_preset("llama-3.1-8b")
    types = {name: tensor_type(config, name, shape, "q4_k_m") for name, shape in llama_tensor_shapes(config).items()}
    counts = {t: list(types.values()).count(t) for t in set(types.values())}
    assert counts == {Q.F32: 65, Q.Q4_K: 193, Q.Q6_K: 33}
    six = [i for i in range(32) if types[f"layers.{i}.attention.wv.weight"] == Q.Q6_K]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert all(
        types[f"layers.{i}.feed_forward.w2.weight"] == types[f"layers.{i}.attention.wv.weight"] for i in range(32)
    )
    assert types["output.weight"] == Q.Q6_K and types["tok_embeddings.weight"] == Q.Q4_K
