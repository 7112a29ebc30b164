"""GGUF files that llamaforge writes run in llama.cpp with the same logits; the SmolLM2 file agrees with it.

llama.cpp (via llama-cpp-python) is an independent implementation of the format and of the model: a
file written wrongly (names, shapes, metadata, RoPE layout or scaling) would load badly or give other
logits there.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from llamaforge.checkpoint import gguf as G
from llamaforge.checkpoint import load_model, model_tensors
from llamaforge.config import RopeScaling, get_preset
from llamaforge.model import build_model

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.conformance

GGML_TYPE_F32 = 0
TOKENS = [1, 300, 42, 511, 7, 99, 260, 5, 400, 3, 17, 255, 256, 128, 64, 32]


class SpmVocab:
    """A minimal valid llama.cpp "llama" (SentencePiece) vocabulary: specials, 256 byte tokens, word pieces."""

    def __init__(self, size: int) -> None:
        self.size = size

    def gguf_metadata(self) -> dict:
        n = self.size
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        tokens += [f"\u2581w{i}" for i in range(n - len(tokens))]
        return {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(n - 259)],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (n - 259),  # unknown, control, byte, normal
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
        }


@contextmanager
def llama_cpp_model(path, n_ctx: int = 64):
    # float32 KV cache so that only the matmul accumulation order differs from ours
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=1, verbose=False,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # fmt: skip
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    with llama_cpp_model(path) as llm:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def our_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0].float().numpy()


def random_model(**overrides):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("wq.weight", "wk.weight")):
                p.mul_(8)  # sharp attention: the scores, hence RoPE, matter
            elif name.endswith(("wv.weight", "wo.weight")):
                p.mul_(5)  # and attention's output weighs in the logits
    return model


VARIANTS = {
    "gqa": {},
    "mha": {"n_kv_heads": None},
    "tied": {"tie_embeddings": True},
    "head_dim": {"head_dim": 32},
    "llama31_rope": {"rope_theta": 500000.0, "head_dim": 32,
                     "rope_scaling": RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_seq_len=64)},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_logits_match_llama_cpp(tmp_path, variant) -> None:
    model = random_model(**VARIANTS[variant])
    path = tmp_path / "m.gguf"
    G.write(path, model.config, model_tensors(model), tokenizer=SpmVocab(model.config.vocab_size))
    theirs = llama_cpp_logits(path, TOKENS)
    ours = our_logits(model, TOKENS)
    assert theirs.shape == ours.shape
    assert np.abs(ours).max() > 0.5  # the comparison is not between near-zero logits
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-3)


def test_llama31_rope_scaling_changes_llama_cpp_logits(tmp_path) -> None:
    """The rope_freqs.weight tensor is really used by llama.cpp (so the test above checks our factors)."""
    scaled = random_model(**VARIANTS["llama31_rope"])
    plain = random_model(**{**VARIANTS["llama31_rope"], "rope_scaling": None})
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    G.write(a, scaled.config, model_tensors(scaled), tokenizer=SpmVocab(512))
    G.write(b, plain.config, model_tensors(plain), tokenizer=SpmVocab(512))
    assert np.abs(llama_cpp_logits(a, TOKENS) - llama_cpp_logits(b, TOKENS)).max() > 0.1


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_reduced_precision_files_match_llama_cpp(tmp_path, dtype) -> None:
    """Against our model loaded from the same file (same rounded weights); llama.cpp may round activations."""
    model = random_model()
    path = tmp_path / "m.gguf"
    G.write(path, model.config, model_tensors(model), tokenizer=SpmVocab(512), dtype=dtype)
    loaded, _ = load_model(path, dtype=torch.float32)
    theirs, ours = llama_cpp_logits(path, TOKENS), our_logits(loaded, TOKENS)
    scale = np.abs(ours).max()
    # measured (max error / max logit): f16 0.001, bf16 0.008, q8_0 0.017, q4_0 0.03, q4_1 0.018
    tolerance = {"f16": 0.005, "bf16": 0.03, "q8_0": 0.05, "q4_0": 0.08, "q4_1": 0.08}[dtype]
    assert np.abs(theirs - ours).max() < tolerance * scale
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


def test_smollm2_q4_1_agrees_with_llama_cpp(smollm2_gguf) -> None:
    """llama.cpp rounds activations to 8 bits for Q4_1/Q8_0 matmuls: the logits agree closely, not exactly."""
    model, _ = load_model(smollm2_gguf)
    prompts = [
        [504, 3575, 282, 4649, 314],  # "The capital of France is"
        [33, 28, 216, 34, 28, 216, 35, 28, 216, 36, 28, 216, 37, 28],  # "1, 2, 3, 4, 5,"
        [6403, 1980, 253, 655, 28, 665, 436, 253],  # "Once upon a time, there was a"
        [1604, 3987, 46477, 24, 94, 727, 472],  # "def fibonacci(n):\n   "
    ]
    with llama_cpp_model(smollm2_gguf, n_ctx=128) as llm:
        for tokens in prompts:
            llm.reset()
            llm.eval(tokens)
            theirs = np.array(llm.scores[: len(tokens)], dtype=np.float32)
            ours = our_logits(model, tokens)
            for t in range(len(tokens)):
                assert np.corrcoef(theirs[t], ours[t])[0, 1] > 0.99, (tokens, t)
            # The next token agrees; where our top two are within llama.cpp's rounding, it is one of them.
            top = np.argsort(ours[-1])[::-1]
            if ours[-1][top[0]] - ours[-1][top[1]] > 1.0:
                assert theirs[-1].argmax() == top[0], tokens
            else:
                assert theirs[-1].argmax() in top[:2], tokens


def llama_cpp_quantize(src, dst, ftype: str) -> None:
    """llama.cpp's own quantizer (no importance matrix), as `llama-quantize SRC DST FTYPE` runs it."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


# The types each file type puts in the model (rows of 256 weights, so every K-quant applies).
QUANTIZED_FILES = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}, "Q3_K_M": {"Q3_K"},
                   "Q2_K": {"Q2_K"}, "Q4_0": {"Q4_0"}, "Q4_1": {"Q4_1"}, "Q5_0": {"Q5_0"}, "Q5_1": {"Q5_1"},
                   "Q8_0": {"Q8_0"}, "IQ4_NL": {"IQ4_NL"}, "IQ4_XS": {"IQ4_XS"}}  # fmt: skip


@pytest.mark.parametrize("ftype", list(QUANTIZED_FILES))
def test_llama_cpp_quantized_files_run_in_their_blocks(tmp_path, ftype) -> None:
    """Files quantized by llama.cpp, loaded by default (blocks run as stored, 8-bit activations as llama.cpp's):
    the same logits as llama.cpp's on the same file, up to float summation order (the activations are rounded
    exactly as llama.cpp rounds them)."""
    import llamaforge
    from llamaforge.quantize import GGUFLinear

    model = random_model(dim=256, hidden_dim=512, n_layers=2)
    src, dst = tmp_path / "f32.gguf", tmp_path / f"{ftype}.gguf"
    G.write(src, model.config, model_tensors(model), tokenizer=SpmVocab(model.config.vocab_size))
    llama_cpp_quantize(src, dst, ftype)
    types = {t.qtype.name for t in G.read_header(dst).tensors.values()}
    assert QUANTIZED_FILES[ftype] <= types, types
    llm = llamaforge.load(dst)
    assert isinstance(llm.model.layers[0].feed_forward.w1, GGUFLinear)
    theirs, ours = llama_cpp_logits(dst, TOKENS), our_logits(llm.model, TOKENS)
    scale = np.abs(ours).max()
    assert scale > 0.5
    # Measured: equal to < 1e-5 of the largest logit at every position for every type, but one position of the
    # IQ4_NL file (0.4%): summation order can put an activation on the other side of an 8-bit rounding boundary.
    per_position = np.abs(theirs - ours).max(-1) / scale
    assert (per_position < 1e-4).sum() >= len(TOKENS) - 1 and per_position.max() < 1e-2, per_position
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
