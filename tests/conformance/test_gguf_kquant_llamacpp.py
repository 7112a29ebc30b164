"""Quantized GGUF writing against llama.cpp's own quantizer (``llama_model_quantize``, through llama-cpp-python).

llama.cpp is the reference for both halves of a quantized file: the blocks (ggml's ``quantize_row_*_ref``,
which it uses without an importance matrix) and the mix (which type each tensor gets). A float model is
written as an F32 or F16 GGUF, llama.cpp quantizes that file, and every tensor it wrote is compared with
ours: its type with ``gguf_mixes.tensor_type``, its bytes with ``gguf_quants.quantize``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llamaforge.checkpoint import gguf as G
from llamaforge.checkpoint import model_tensors
from llamaforge.config import ModelConfig
from llamaforge.gguf_mixes import MIXES, tensor_type
from llamaforge.gguf_quants import quantize
from llamaforge.model import build_model

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.conformance


def llama_cpp_quantize(src: Path, dst: Path, mix: str, pure: bool = False) -> dict[str, G.GGUFTensor]:
    """Quantize `src` with llama.cpp to the mix `mix` (every matrix to its default type when `pure`)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix].file_type)
    params.nthread = 2
    params.pure = pure
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0, mix
    return G.read_raw(dst)


def random_model(config: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return model_tensors(build_model(config))


# Rows as trained checkpoints have them, and rows that trip quantizers up (ties, zeros, extreme scales).
def _rows(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    normal = rng.standard_normal(n)
    return [
        normal * 0.02,
        rng.standard_t(2, n) * 0.01,  # heavy tails
        rng.laplace(size=n) * rng.lognormal(0, 2),
        np.zeros(n),
        np.full(n, 0.5),
        np.full(n, -0.3),
        normal * 1e-30,  # tiny
        normal * 1e-40,  # denormal: the scales' inverses overflow
        normal * 1e4,  # huge (but float16 scales still finite, as llama.cpp checks)
        np.round(normal * 8) / 8,  # values on a grid: rounding ties
        np.where(rng.random(n) < 0.9, 0.0, normal),  # sparse
        np.abs(normal) + 1,  # all positive: the offset types' min clamps to 0
        -np.abs(normal) - 0.1,  # all negative
        np.concatenate([np.zeros(n // 2), normal[n // 2 :]]),  # whole zero blocks
        torch.from_numpy(normal * 0.02).bfloat16().double().numpy(),  # bfloat16 values
        np.where(np.arange(n) == 7, 1.0, normal * 0.01),  # one outlier
        rng.integers(0, 4, n) - 1.5,  # four levels
        normal + 3,
    ]


def real_like(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The matrices of `tensors` refilled row by row from ``_rows``, cycling through its kinds."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in tensors.items():
        if t.dim() < 2:
            out[name] = t
            continue
        rows = []
        while len(rows) < t.shape[0]:
            rows += _rows(rng, t.shape[1])
        out[name] = torch.from_numpy(np.stack(rows[: t.shape[0]]).astype(np.float32))
    return out


# Every GGUF block type we quantize, with a mix whose default it is (quantized "pure": all matrices in it).
TYPES = {Q.Q8_0: "q8_0", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0", Q.Q5_1: "q5_1", Q.Q2_K: "q2_k",
         Q.Q3_K: "q3_k_m", Q.Q4_K: "q4_k_m", Q.Q5_K: "q5_k_m", Q.Q6_K: "q6_k"}  # fmt: skip


@pytest.fixture(scope="module")
def real_like_f32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    config = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=256,
                         max_seq_len=64)  # fmt: skip
    tensors = real_like(random_model(config))
    path = tmp_path_factory.mktemp("kquant") / "f32.gguf"
    G.write(path, config, tensors, dtype="f32")
    return path, tensors


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_blocks_match_llama_cpp(real_like_f32, tmp_path: Path, qtype: Q) -> None:
    src, tensors = real_like_f32
    theirs = llama_cpp_quantize(src, tmp_path / "q.gguf", TYPES[qtype], pure=True)
    matrices = [name for name, t in tensors.items() if t.dim() == 2]
    assert {theirs[name].qtype for name in matrices} == {qtype}
    for name in matrices:
        ours = quantize(tensors[name], qtype)
        assert ours.shape == theirs[name].data.shape, name
        mismatched = (ours != theirs[name].data).any(dim=1).nonzero().flatten().tolist()
        assert not mismatched, f"{name}: rows {mismatched[:10]} differ"


@pytest.fixture(scope="module")
def smollm2_values_f32(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    """A model whose matrices hold SmolLM2's trained weights (layers 0-3, 2048 embedding rows, dequantized from
    the built-in Q4_1/Q8_0 file, so full of exact ties), refolded into rows of 512 and 1536."""
    raw = G.read_raw(smollm2_gguf)
    names = [n for n in raw if n.startswith(("layers.0.", "layers.1.", "layers.2.", "layers.3.")) and "norm" not in n]
    pool = torch.cat([raw[n].dequantize().flatten() for n in names]
                     + [raw["tok_embeddings.weight"].dequantize()[:2048].flatten()])  # fmt: skip
    config = ModelConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=1536, vocab_size=1024,
                         max_seq_len=64)  # fmt: skip
    tensors, used = {}, 0
    for name, t in random_model(config).items():
        if t.dim() == 2:
            t = pool[used : used + t.numel()].reshape(t.shape).clone()
            used += t.numel()
        tensors[name] = t
    assert used <= pool.numel()
    path = tmp_path_factory.mktemp("smollm2") / "f32.gguf"
    G.write(path, config, tensors, dtype="f32")
    return path, tensors


@pytest.mark.slow  # about 5 s a type: 7.3M weights
@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_blocks_match_llama_cpp_on_trained_weights(smollm2_values_f32, tmp_path: Path, qtype: Q) -> None:
    src, tensors = smollm2_values_f32
    theirs = llama_cpp_quantize(src, tmp_path / "q.gguf", TYPES[qtype], pure=True)
    for name, t in tensors.items():
        if t.dim() == 2:
            assert theirs[name].qtype == qtype, name
            assert torch.equal(quantize(t, qtype), theirs[name].data), name


# Mixes: small random models whose shapes exercise every rule of llama_tensor_get_type ---------------------
CONFIGS = {
    # 16 layers: the "more bits" layer pattern (first/last eighth, every third between); 8 query heads per
    # KV head (q2_k's attn_v rule); every row a multiple of 256.
    "gqa8": ModelConfig(dim=256, n_layers=16, n_heads=8, n_kv_heads=1, hidden_dim=256, vocab_size=256,
                        max_seq_len=64),
    # Multi-head attention (q2_k's attn_v gets Q3_K, not Q4_K).
    "mha": ModelConfig(dim=256, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=256, max_seq_len=64),
    # Rows of 96 and 160 (multiples of 32, not of 256): the K-quant fallbacks; a tied head.
    "tied_odd": ModelConfig(dim=96, n_layers=9, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=320,
                            tie_embeddings=True, max_seq_len=64),
    # Rows of 80: not even a multiple of 32, so F16 (llama.cpp refuses the 32-weight mixes there).
    "rows80": ModelConfig(dim=80, n_layers=4, n_heads=5, hidden_dim=96, vocab_size=300, max_seq_len=64),
    # 80 layers with grouped-query attention: llama.cpp's "70B" model type, whose attn_v gets Q5_K.
    "70b": ModelConfig(dim=256, n_layers=80, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=32, vocab_size=256,
                       max_seq_len=64),
}  # fmt: skip
K_MIXES = [m for m in MIXES if "_k" in m]
CASES = [(c, m) for c in CONFIGS for m in MIXES if m in K_MIXES or c in ("gqa8", "tied_odd")]
# The rules, spelled out (each also checked against llama.cpp below).
EXPECTED = [
    ("gqa8", "q4_k_m", "output.weight", Q.Q6_K),
    ("gqa8", "q4_k_m", "tok_embeddings.weight", Q.Q4_K),
    ("gqa8", "q4_k_m", "layers.0.attention.wv.weight", Q.Q6_K),
    ("gqa8", "q4_k_m", "layers.2.attention.wv.weight", Q.Q4_K),
    ("gqa8", "q4_k_m", "layers.4.attention.wv.weight", Q.Q6_K),
    ("gqa8", "q4_k_m", "layers.14.feed_forward.w2.weight", Q.Q6_K),
    ("gqa8", "q4_k_m", "layers.5.feed_forward.w2.weight", Q.Q4_K),
    ("gqa8", "q4_k_m", "layers.5.attention.wq.weight", Q.Q4_K),
    ("gqa8", "q4_k_s", "layers.3.attention.wv.weight", Q.Q5_K),
    ("gqa8", "q4_k_s", "layers.4.attention.wv.weight", Q.Q4_K),
    ("gqa8", "q4_k_s", "layers.1.feed_forward.w2.weight", Q.Q5_K),
    ("gqa8", "q5_k_m", "layers.7.attention.wv.weight", Q.Q6_K),
    ("gqa8", "q3_k_m", "layers.1.attention.wv.weight", Q.Q5_K),
    ("gqa8", "q3_k_m", "layers.2.attention.wv.weight", Q.Q4_K),
    ("gqa8", "q3_k_m", "layers.0.feed_forward.w2.weight", Q.Q5_K),
    ("gqa8", "q3_k_m", "layers.1.feed_forward.w2.weight", Q.Q4_K),
    ("gqa8", "q3_k_m", "layers.1.attention.wo.weight", Q.Q4_K),
    ("gqa8", "q2_k", "layers.1.attention.wv.weight", Q.Q4_K),
    ("gqa8", "q2_k", "layers.1.attention.wo.weight", Q.Q3_K),
    ("gqa8", "q2_k", "layers.1.feed_forward.w2.weight", Q.Q3_K),
    ("gqa8", "q2_k", "layers.1.feed_forward.w1.weight", Q.Q2_K),
    ("gqa8", "q4_0", "output.weight", Q.Q6_K),
    ("gqa8", "q8_0", "output.weight", Q.Q8_0),
    ("gqa8", "q5_1", "layers.0.attention.wv.weight", Q.Q5_1),
    ("tied_odd", "q4_k_m", "tok_embeddings.weight", Q.Q8_0),
    ("tied_odd", "q4_k_m", "layers.0.attention.wq.weight", Q.Q5_0),
    ("tied_odd", "q5_k_s", "layers.0.attention.wq.weight", Q.Q5_1),
    ("tied_odd", "q3_k_s", "layers.0.attention.wq.weight", Q.Q4_0),
    ("tied_odd", "q6_k", "layers.0.feed_forward.w2.weight", Q.Q8_0),
    ("tied_odd", "q2_k", "layers.0.attention.wv.weight", Q.Q4_0),  # Q3_K, which rows of 96 cannot hold
    ("mha", "q2_k", "layers.0.attention.wv.weight", Q.Q3_K),
    ("tied_odd", "q4_0", "tok_embeddings.weight", Q.Q8_0),
    ("rows80", "q4_k_m", "layers.0.attention.wq.weight", Q.F16),
    ("70b", "q4_k_s", "layers.10.attention.wv.weight", Q.Q5_K),
    ("70b", "q3_k_s", "layers.10.attention.wv.weight", Q.Q5_K),
    ("70b", "q4_k_m", "layers.0.attention.wv.weight", Q.Q6_K),
]


@pytest.fixture(scope="module")
def f16_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("mixes")
    models = {}
    for name, config in CONFIGS.items():
        tensors = random_model(config)
        G.write(root / f"{name}.gguf", config, tensors, dtype="f16")
        models[name] = root / f"{name}.gguf", tensors
    return models


@pytest.mark.parametrize(("config", "mix"), CASES)
def test_mix_matches_llama_cpp(f16_models, tmp_path: Path, config: str, mix: str) -> None:
    src, tensors = f16_models[config]
    theirs = llama_cpp_quantize(src, tmp_path / "q.gguf", mix)
    cfg = CONFIGS[config]
    assert set(theirs) == set(tensors)
    for name, t in theirs.items():
        assert t.qtype == tensor_type(cfg, name, t.shape, mix), name
    for table_config, table_mix, name, qtype in EXPECTED:
        if (table_config, table_mix) == (config, mix):
            assert theirs[name].qtype == qtype, name
    assert G.read_metadata(tmp_path / "q.gguf")["general.file_type"] == MIXES[mix].file_type
    # Our writer, from the float16 weights, gives the same file contents.
    if config in ("tied_odd", "rows80"):  # small enough to quantize here
        halves = {n: t.half() if t.dim() > 1 else t for n, t in tensors.items()}
        G.write(tmp_path / "ours.gguf", cfg, halves, dtype=mix)
        ours = G.read_raw(tmp_path / "ours.gguf")
        for name, t in theirs.items():
            assert ours[name].qtype == t.qtype and torch.equal(ours[name].data, t.data), name
        assert G.read_metadata(tmp_path / "ours.gguf")["general.file_type"] == MIXES[mix].file_type


def test_expected_table_covers_the_cases() -> None:
    assert {(c, m) for c, m, _, _ in EXPECTED} <= set(CASES)


# End to end: a Hugging Face checkpoint -> `llamaforge convert --quantize q4_k_m` -> llama.cpp -------------
def make_hf_checkpoint(directory: Path) -> Path:
    """A random transformers LlamaForCausalLM (rows a multiple of 256) with a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog", "quantized blocks, as llama.cpp writes"]
                           * 20, trainer)  # fmt: skip
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.slow  # about 35 s: transformers, a tokenizer to train, the CLI in a subprocess
def test_convert_quantize_q4_k_m_runs_in_llama_cpp(tmp_path: Path) -> None:
    import subprocess
    import sys

    pytest.importorskip("transformers")
    from llamaforge.checkpoint import load_model

    src = make_hf_checkpoint(tmp_path / "hf")
    dst = tmp_path / "model-q4_k_m.gguf"
    result = subprocess.run([sys.executable, "-m", "llamaforge", "convert", str(src), str(dst), "--to", "gguf",
                             "--quantize", "q4_k_m"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "q4_k_m" in result.stderr
    config = G.read_config(dst)
    raw = G.read_raw(dst)
    assert {name: t.qtype for name, t in raw.items()} == {
        name: tensor_type(config, name, t.shape, "q4_k_m") for name, t in raw.items()
    }
    assert raw["output.weight"].qtype == Q.Q6_K and raw["layers.0.attention.wq.weight"].qtype == Q.Q4_K
    assert G.read_metadata(dst)["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M

    # Greedy decoding in llama.cpp; llamaforge's float32 model of the same file (the dequantized blocks) gives
    # the same logits along the way, up to llama.cpp's 8-bit rounding of activations.
    prompt = [0, *range(300, 306)]
    n_new = 8
    # a float32 KV cache (type 0), so that the cache adds no rounding of its own
    llm = llama_cpp.Llama(model_path=str(dst), logits_all=True, n_ctx=64, n_threads=1, verbose=False, type_k=0,
                          type_v=0)  # fmt: skip
    try:
        llm.eval(prompt)
        for _ in range(n_new):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        tokens = list(llm.input_ids[: llm.n_tokens])
        theirs = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    finally:
        llm.close()
    model, _ = load_model(dst, dtype=torch.float32)
    with torch.inference_mode():
        ours = model(torch.tensor([tokens]))[0].numpy()
    scale = np.abs(ours).max()
    assert scale > 1.0  # the logits are not all near zero
    # measured: max error 0.044 of the largest logit, correlation >= 0.998 per position (llama.cpp on a q8_0
    # file of the same model, whose weights both sides read identically: 0.022)
    assert np.abs(theirs - ours).max() < 0.1 * scale
    for t in range(len(prompt) - 1, len(tokens) - 1):
        assert np.corrcoef(theirs[t], ours[t])[0, 1] > 0.99, t
        top = np.sort(ours[t])[::-1]
        if top[0] - top[1] > 0.2 * scale:  # a clear choice: llama.cpp's greedy token is ours too
            assert tokens[t + 1] == int(ours[t].argmax()), t
    # llamaforge's own greedy decoding of the file follows the same path where the choices are clear.
    from llamaforge import load

    completion = load(dst, dtype=torch.float32).generate(prompt, max_new_tokens=n_new, temperature=0,
                                                          ignore_eos=True)  # fmt: skip
    assert completion.token_ids[0] == tokens[len(prompt)]
