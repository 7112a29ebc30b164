"""GGUF checkpoints: dequantizers against the gguf package, the built-in SmolLM2 file, write/read round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, quants
from gguf import GGMLQuantizationType as Q

import llamaforge
from llamaforge import gguf_quants
from llamaforge.checkpoint import gguf as G
from llamaforge.checkpoint import load_model, model_tensors, save_model
from llamaforge.config import RopeScaling, get_preset
from llamaforge.errors import CheckpointError
from llamaforge.model import build_model

# Byte offsets of the float16 scale fields inside each block type.
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
              Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}  # fmt: skip


def random_blocks(qtype: Q, n: int, seed: int = 0) -> np.ndarray:
    """Random bytes for n blocks, with finite float16 scales (random bytes could be NaN/inf)."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks


def same_bits(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> bool:
    """Same shape, dtype and bytes (so NaN payloads and signed zeros count too)."""

    def as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().contiguous()
            x = x.view(torch.int16).numpy().view("V2") if x.dtype == torch.bfloat16 else x.numpy()
        return np.ascontiguousarray(x)

    a, b = as_numpy(a), as_numpy(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


# Dequantizers and quantizers ----------------------------------------------------------------------
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_dequantize_random_blocks_matches_gguf(qtype: Q) -> None:
    blocks = random_blocks(qtype, 300, seed=int(qtype))
    rows = blocks.reshape(10, -1)  # 10 rows of 30 blocks: a matrix as GGUF stores it
    expected = quants.dequantize(rows, qtype)
    ours = gguf_quants.dequantize(torch.from_numpy(rows), qtype)
    assert ours.dtype == torch.float32
    assert same_bits(ours, expected)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_dequantize_quantized_weights_matches_gguf(qtype: Q) -> None:
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    blocks = quants.quantize(x, qtype)
    ours = gguf_quants.dequantize(torch.from_numpy(blocks), qtype)
    assert same_bits(ours, quants.dequantize(blocks, qtype))
    assert torch.allclose(ours, torch.from_numpy(x), atol=0.6)  # and it really is an approximation of x


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_quantize_matches_gguf(qtype: Q) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 128)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    x[1, :32] = 1.0  # a constant block
    x[2, :32] = np.linspace(-1, 1, 32)  # values that land on rounding ties
    x[3] *= 1000
    ours = gguf_quants.quantize(torch.from_numpy(x), qtype)
    assert same_bits(ours, quants.quantize(x, qtype))


def test_dequantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="not a multiple of 34"):
        gguf_quants.dequantize(torch.zeros(33, dtype=torch.uint8), Q.Q8_0)
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        gguf_quants.dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS)
    with pytest.raises(NotImplementedError, match="IQ4_NL"):
        gguf_quants.quantize(torch.zeros(256), Q.IQ4_NL)
    with pytest.raises(ValueError, match="Q6_K: row length 96 is not a multiple of 256"):
        gguf_quants.quantize(torch.zeros(2, 96), Q.Q6_K)
    with pytest.raises(TypeError, match="float weights"):
        gguf_quants.quantize(torch.zeros(2, 256, dtype=torch.int8), Q.Q6_K)


# The built-in SmolLM2 file ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return llamaforge.load(smollm2_gguf, dtype=torch.float32)  # the dequantized path; blocks: test_gguf_blocks.py


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf) -> GGUFReader:
    """The gguf package's own parser (independent of ours); slow on a 100k-entry vocabulary, so shared."""
    return GGUFReader(smollm2_gguf)


def test_smollm2_config_is_the_preset_shape(smollm2_gguf) -> None:
    config = G.read_config(smollm2_gguf)
    assert config.replace(name="smollm2-135m") == get_preset("smollm2-135m")
    assert config.norm_eps == 1e-5 and config.rope_theta == 100000.0  # float32 metadata, shortest decimal


def test_smollm2_weights_equal_gguf_dequantize(smollm2, smollm2_reader) -> None:
    assert smollm2.format == "gguf"
    params = dict(smollm2.model.state_dict())
    reader = smollm2_reader
    types = {}
    for t in reader.tensors:
        name = G.llamaforge_name(t.name)
        expected = quants.dequantize(t.data, t.tensor_type)
        assert same_bits(params[name], expected), t.name
        types[t.name] = t.tensor_type
    assert types["token_embd.weight"] == Q.Q8_0 and types["blk.0.attn_q.weight"] == Q.Q4_1
    assert types["blk.0.attn_norm.weight"] == Q.F32
    assert smollm2.model.output.weight is smollm2.model.tok_embeddings.weight  # tied: no output.weight


def test_smollm2_runs(smollm2) -> None:
    with torch.inference_mode():
        logits = smollm2.model(torch.tensor([[1, 504, 3458, 282, 253]]))
    assert logits.shape == (1, 5, 49152) and torch.isfinite(logits).all()


def test_read_raw_gives_the_stored_blocks(smollm2_gguf, smollm2_reader) -> None:
    raw = G.read_raw(smollm2_gguf)
    reader = smollm2_reader
    assert len(raw) == len(reader.tensors) == 272
    for t in reader.tensors:
        r = raw[G.llamaforge_name(t.name)]
        assert r.gguf_name == t.name and r.qtype == t.tensor_type
        assert r.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(r.data.numpy().reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8))
    q = raw["layers.0.attention.wq.weight"]
    assert q.shape == (576, 576) and q.data.shape == (576, 576 // 32 * 20) and q.data.dtype == torch.uint8
    assert (q.block_size, q.type_size) == (32, 20)
    assert q.dequantize().shape == (576, 576)


def test_read_metadata(smollm2_gguf, smollm2_reader) -> None:
    md = G.read_metadata(smollm2_gguf)
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 30
    assert md["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and md["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert len(md["tokenizer.ggml.merges"]) == 48900 and md["tokenizer.ggml.merges"][0] == "Ġ t"
    assert md["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert "{% for message in messages %}" in md["tokenizer.chat_template"]
    for key, field in smollm2_reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            if isinstance(value, float):
                assert md[key] == pytest.approx(value, rel=1e-6), key
            else:
                assert md[key] == value, key


def test_detect(smollm2_gguf, tmp_path) -> None:
    assert G.detect(smollm2_gguf)
    (tmp_path / "notes.txt").write_text("hello")
    assert not G.detect(tmp_path / "notes.txt") and not G.detect(tmp_path)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(b"GGUF" + bytes(20))
    assert G.detect(renamed)  # recognised by its magic


# Write -> read round trips ------------------------------------------------------------------------
def tiny(preset: str = "tiny", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_preset(preset, **overrides)).eval()
    with torch.no_grad():  # norms away from 1 so that they are really checked
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


TOKENS = torch.tensor([[1, 7, 300, 42, 511, 0, 99, 5]])


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha"])
def test_f32_round_trip_is_bit_exact(tmp_path, preset) -> None:
    model = tiny(preset)
    path = save_model(model, tmp_path / "tiny.gguf", "gguf")
    assert G.read_config(path).replace(name=model.config.name) == model.config
    loaded, fmt = load_model(path)
    assert fmt == "gguf"
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert same_bits(ours[name], theirs[name]), name
    with torch.inference_mode():
        assert torch.equal(model(TOKENS), loaded(TOKENS))
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert set(types.values()) == {Q.F32} and "output.weight" in types


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_round_trip_is_exact_to_the_dtype(tmp_path, dtype) -> None:
    model = tiny()
    path = tmp_path / "tiny.gguf"
    G.write(path, model.config, model_tensors(model), dtype=dtype)
    loaded, _ = load_model(path)
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == dtype, name
        assert same_bits(got, tensor.to(dtype)), name
    stored = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert stored["blk.0.attn_q.weight"] == (Q.F16 if dtype == torch.float16 else Q.BF16)
    assert stored["blk.0.attn_norm.weight"] == Q.F32  # norms stay float32, as llama.cpp expects
    # dtype=None keeps the model's own dtype
    G.write(path, model.config, model_tensors(model.to(dtype)))
    assert {t.name: t.tensor_type for t in GGUFReader(path).tensors} == stored


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_write(tmp_path, kind) -> None:
    """Each matrix in the mix's type (the 64-wide head falls back from Q6_K to Q8_0, as in llama.cpp), with the
    blocks the gguf package's independent quantizer gives."""
    model = tiny()
    path = tmp_path / "tiny.gguf"
    G.write(path, model.config, model_tensors(model), dtype=kind)
    raw = G.read_raw(path)
    weights = model.state_dict()
    for name, r in raw.items():
        w = weights[name].numpy()
        if w.ndim == 1:
            assert r.qtype == Q.F32
            continue
        assert r.qtype == (Q.Q8_0 if name == "output.weight" else Q[kind.upper()]), name
        assert np.array_equal(r.data.numpy(), quants.quantize(w, r.qtype)), name
    loaded, _ = load_model(path)
    with torch.inference_mode():
        a, b = model(TOKENS), loaded(TOKENS)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95
    metadata = G.read_metadata(path)
    assert metadata["general.file_type"] == {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9}[kind]
    assert metadata["general.quantization_version"] == 2


def test_tied_embeddings_round_trip(tmp_path) -> None:
    model = tiny(tie_embeddings=True)
    path = save_model(model, tmp_path / "tied.gguf", "gguf")
    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}
    loaded, _ = load_model(path)
    assert loaded.config.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    with torch.inference_mode():
        assert torch.equal(model(TOKENS), loaded(TOKENS))


def test_explicit_head_dim_round_trip(tmp_path) -> None:
    model = tiny(head_dim=32)  # 4 heads of 32 on a 64-wide model
    path = save_model(model, tmp_path / "hd.gguf", "gguf")
    assert G.read_config(path).replace(name=model.config.name) == model.config
    loaded, _ = load_model(path)
    with torch.inference_mode():
        assert torch.equal(model(TOKENS), loaded(TOKENS))


def test_llama31_rope_scaling_round_trip(tmp_path) -> None:
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    model = tiny(rope_scaling=scaling, rope_theta=500000.0, head_dim=32)
    path = save_model(model, tmp_path / "rope.gguf", "gguf")
    factors = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    assert factors.tensor_type == Q.F32 and len(factors.data) == 16
    assert G.read_config(path).rope_scaling == scaling
    loaded, _ = load_model(path)
    assert torch.equal(loaded.rope_freqs, model.rope_freqs)


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "llama-3.2-1b"])
def test_rope_factors_map_back_to_presets(preset) -> None:
    config = get_preset(preset)
    factors = G.rope_factors(config.rope_scaling, config.rope_theta, config.dim_per_head).astype(np.float32)
    got = G.rope_scaling_from_factors(factors.astype(np.float64), config.rope_theta, config.dim_per_head, 8192)
    assert got == config.rope_scaling
    # A non-standard band is recovered by fitting the interpolated frequencies.
    odd = RopeScaling(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_seq_len=8192)
    factors = G.rope_factors(odd, config.rope_theta, config.dim_per_head).astype(np.float32).astype(np.float64)
    assert G.rope_scaling_from_factors(factors, config.rope_theta, config.dim_per_head, 8192) == odd
    assert G.rope_scaling_from_factors(np.ones(64), config.rope_theta, 128, 8192) is None
    with pytest.raises(CheckpointError, match=r"do not follow Llama 3\.1"):
        G.rope_scaling_from_factors(np.linspace(1, 8, 64), config.rope_theta, 128, 8192)


class FakeTokenizer:
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def gguf_metadata(self) -> dict:
        tokens = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(509)]
        return {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [float(-i) for i in range(512)],
            "tokenizer.ggml.token_type": [2, 3, 3] + [1] * 509,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": True,
        }


def test_tokenizer_metadata_is_written_with_llama_cpp_types(tmp_path) -> None:
    model = tiny()
    path = save_model(model, tmp_path / "tok.gguf", "gguf", tokenizer=FakeTokenizer())
    md = G.read_metadata(path)
    expected = FakeTokenizer().gguf_metadata()
    for key, value in expected.items():
        assert md[key] == value, key
    assert md["tokenizer.chat_template"] == FakeTokenizer.chat_template
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.scores"].types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    assert fields["tokenizer.ggml.token_type"].types == [GGUFValueType.ARRAY, GGUFValueType.INT32]
    assert fields["tokenizer.ggml.bos_token_id"].types == [GGUFValueType.UINT32]
    assert fields["tokenizer.ggml.add_bos_token"].types == [GGUFValueType.BOOL]
    with pytest.raises(ValueError, match="gguf_metadata"):
        save_model(model, tmp_path / "bad.gguf", "gguf", tokenizer=object())
    assert not (tmp_path / "bad.gguf").exists()


def test_model_metadata_is_complete(tmp_path) -> None:
    model = tiny()
    md = G.read_metadata(save_model(model, tmp_path / "m.gguf", "gguf"))
    c = model.config
    assert md["general.architecture"] == "llama" and md["general.file_type"] == 0
    assert (md["llama.block_count"], md["llama.embedding_length"], md["llama.feed_forward_length"]) == (2, 64, 160)
    assert (md["llama.attention.head_count"], md["llama.attention.head_count_kv"]) == (4, 2)
    assert md["llama.context_length"] == c.max_seq_len and md["llama.vocab_size"] == c.vocab_size
    assert md["llama.rope.dimension_count"] == 16 and md["llama.rope.freq_base"] == c.rope_theta
    assert md["llama.attention.layer_norm_rms_epsilon"] == c.norm_eps


def test_write_rejects_what_gguf_cannot_hold(tmp_path) -> None:
    model = tiny()
    tensors = model_tensors(model)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        G.write(tmp_path / "x.gguf", model.config, tensors, dtype="q3_k")
    with pytest.raises(ValueError, match="missing tensors"):
        G.write(tmp_path / "x.gguf", model.config, {k: v for k, v in tensors.items() if k != "norm.weight"})
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_directory_with_one_gguf(tmp_path) -> None:
    model = tiny()
    save_model(model, tmp_path / "m.gguf", "gguf")
    assert G.detect(tmp_path)
    loaded = llamaforge.load(tmp_path)
    assert loaded.format == "gguf"
    save_model(model, tmp_path / "other.gguf", "gguf")
    with pytest.raises(CheckpointError, match=r"2 \.gguf files"):
        G.read_config(tmp_path)


def test_short_vocabulary_is_padded_and_long_one_refused(tmp_path) -> None:
    model = tiny()

    class Short(FakeTokenizer):
        def __init__(self, n: int) -> None:
            self.n = n

        def gguf_metadata(self) -> dict:
            md = super().gguf_metadata()
            for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                md[key] = (md[key] * 2)[: self.n]
            return md

    md = G.read_metadata(save_model(model, tmp_path / "pad.gguf", "gguf", tokenizer=Short(500)))
    assert len(md["tokenizer.ggml.tokens"]) == len(md["tokenizer.ggml.scores"]) == 512
    assert md["tokenizer.ggml.tokens"][500:502] == ["[PAD500]", "[PAD501]"] and md["tokenizer.ggml.token_type"][-1] == 5
    with pytest.raises(ValueError, match="600 tokens"):
        save_model(model, tmp_path / "long.gguf", "gguf", tokenizer=Short(600))


def test_smollm2_tokenizer_is_written_back_unchanged(smollm2_gguf, tmp_path) -> None:
    from llamaforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    path = save_model(tiny(vocab_size=49152), tmp_path / "t.gguf", "gguf", tokenizer=tokenizer)
    original = {k: v for k, v in G.read_metadata(smollm2_gguf).items() if k.startswith("tokenizer.")}
    written = {k: v for k, v in G.read_metadata(path).items() if k.startswith("tokenizer.")}
    assert written == original
    assert load_tokenizer(path).encode("Hello, world!") == tokenizer.encode("Hello, world!")


def test_llama4_metadata_and_expert_layout(tmp_path) -> None:
    """llama.cpp's llama4 keys and tensor names; the experts stored [E, out, in]; the file reads back exactly."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-moe", n_experts_per_token=2)).eval()
    G.write(tmp_path / "m.gguf", model.config, model_tensors(model))
    md = G.read_metadata(tmp_path / "m.gguf")
    assert md["general.architecture"] == "llama4"
    assert md["llama4.expert_count"] == 4 and md["llama4.expert_used_count"] == 2
    assert md["llama4.expert_feed_forward_length"] == 96 and md["llama4.feed_forward_length"] == 160
    assert md["llama4.interleave_moe_layer_step"] == 2 and md["llama4.attention.sliding_window"] == 16
    assert md["llama4.no_rope_layer_step"] == 4 and md["llama4.attention.qk_norm"] is True
    header = G.read_header(tmp_path / "m.gguf")
    assert header.tensors["blk.1.ffn_gate_exps.weight"].shape == (4, 96, 64)
    assert header.tensors["blk.1.ffn_down_exps.weight"].shape == (4, 64, 96)
    assert header.tensors["blk.1.ffn_gate_inp.weight"].shape == (4, 64)
    assert "blk.1.ffn_up_shexp.weight" in header.tensors and "blk.0.ffn_gate.weight" in header.tensors
    raw = G.read_raw(tmp_path / "m.gguf")
    w1 = model.layers[1].feed_forward.experts.w1.detach()
    assert torch.equal(raw["layers.1.feed_forward.experts.w1"].dequantize(), w1.transpose(1, 2))
    loaded = dict(G.read_tensors(tmp_path / "m.gguf", G.read_config(tmp_path / "m.gguf")))
    assert G.read_config(tmp_path / "m.gguf").replace(name="") == model.config.replace(name="")
    for name, t in model_tensors(model).items():
        assert torch.equal(loaded[name], t), name


def test_llama4_defaults_are_llama_cpp_s(tmp_path) -> None:
    """A llama4 file with only llama.cpp's keys: NoPE every 4th layer, 8192-token chunks, temperature tuning with
    llama.cpp's constants, QK norm unless the model has 128 experts."""
    from gguf import GGUFWriter

    torch.manual_seed(0)
    config = get_preset("tiny-moe").replace(attention_chunk_size=8192, n_experts=128)
    model = build_model(config)
    G.write(tmp_path / "full.gguf", model.config, model_tensors(model))
    header = G.read_header(tmp_path / "full.gguf")
    w = GGUFWriter(tmp_path / "cpp.gguf", "llama4")
    ours = ("llama4.no_rope_layer_step", "llama4.attention.temperature_scale", "llama4.attention.temperature_length",
            "llama4.attention.qk_norm", "llama4.attention.sliding_window")  # fmt: skip
    for key, value in header.metadata.items():
        if key not in ours and not key.startswith("general.architecture") and key != "GGUF.kv_count":
            w.add_key_value(key, value, G._value_type(key, value)[0], sub_type=G._value_type(key, value)[1])
    data = G._open_data(header)
    for info in header.tensors.values():
        w.add_tensor(info.name, data[info.offset : info.offset + info.nbytes].view(np.float32).reshape(info.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    c = G.read_config(tmp_path / "cpp.gguf")
    assert c.nope_layer_interval == 4 and c.attention_chunk_size == 8192 and not c.use_qk_norm
    assert c.attn_temperature_tuning and c.attn_floor_scale == 8192 and c.attn_scale == pytest.approx(0.1)
