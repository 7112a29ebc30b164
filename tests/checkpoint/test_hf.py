"""Hugging Face checkpoints: config translation, q/k permutation, sharding, dtypes, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llamaforge.checkpoint import detect_format, hf, load_model, model_tensors, save_model
from llamaforge.config import RopeScaling, get_preset
from llamaforge.errors import CheckpointError
from llamaforge.model import build_model

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}  # fmt: skip


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny", **overrides)).eval()


def assert_same_tensors(a, b) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("rows,heads", [(64, 4), (32, 2), (16, 1), (96, 3)])
def test_permutation_round_trip(rows: int, heads: int) -> None:
    w = torch.randn(rows, 8)
    permuted = hf.permute_to_hf(w, heads)
    assert not torch.equal(permuted, w)
    assert torch.equal(hf.permute_from_hf(permuted, heads), w)
    # Within a head, HF's first half holds the even (first-of-pair) rows of Meta's layout.
    hd = rows // heads
    assert torch.equal(permuted[: hd // 2], w[0:hd:2])


def test_config_rope_parameters_and_dtype_keys() -> None:
    data = {**HF_CONFIG, "dtype": "bfloat16", "head_dim": 32, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}  # fmt: skip
    config = hf.config_from_hf(data, "config.json")
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_seq_len=8192)  # fmt: skip
    assert config.head_dim == 32 and config.dim_per_head == 32
    assert config.hidden_dim == 160 and config.max_seq_len == 4096 and config.kv_heads == 2
    assert config.extra["dtype"] == "bfloat16"


def test_config_legacy_rope_scaling_and_torch_dtype() -> None:
    data = {**HF_CONFIG, "torch_dtype": "float16", "rope_theta": 1e6, "tie_word_embeddings": True,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}  # fmt: skip
    config = hf.config_from_hf(data, "config.json")
    assert config.rope_theta == 1e6 and config.rope_scaling == RopeScaling()
    assert config.tie_embeddings and config.head_dim is None and config.extra["dtype"] == "float16"
    back = hf.config_to_hf(config, torch.float16)
    assert hf.config_from_hf(back, "x").replace(name="", extra={}) == config.replace(name="", extra={})


def test_config_rejects_other_rope_types() -> None:
    data = {**HF_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(CheckpointError, match=r"config\.json.*rope_type 'yarn'"):
        hf.config_from_hf(data, "config.json")


def test_write_then_read_is_exact(tmp_path: Path) -> None:
    model = tiny()
    save_model(model, tmp_path / "m", "hf")
    assert detect_format(tmp_path / "m") == "hf"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["intermediate_size"] == 160
    loaded, fmt = load_model(tmp_path / "m")
    assert fmt == "hf"
    assert loaded.config.replace(name="", extra={}) == model.config.replace(name="", extra={})
    assert_same_tensors(model, loaded)
    tokens = torch.randint(0, 512, (1, 12))
    with torch.inference_mode():
        assert torch.equal(model(tokens), loaded(tokens))


def test_stored_q_k_are_permuted(tmp_path: Path) -> None:
    model = tiny()
    save_model(model, tmp_path / "m", "hf")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        stored_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        stored_k = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
        stored_v = f.get_tensor("model.layers.1.self_attn.v_proj.weight")
    assert torch.equal(stored_q, hf.permute_to_hf(model.layers[0].attention.wq.weight.detach(), 4))
    assert torch.equal(stored_k, hf.permute_to_hf(model.layers[1].attention.wk.weight.detach(), 2))
    assert torch.equal(stored_v, model.layers[1].attention.wv.weight.detach())


def test_sharded_write_and_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf, "MAX_SHARD_BYTES", 100_000)
    model = tiny()
    save_model(model, tmp_path / "m", "hf")
    index = json.loads((tmp_path / "m" / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "m" / hf.SINGLE_FILE).exists()
    assert all((tmp_path / "m" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model_tensors(model).values())
    loaded, _ = load_model(tmp_path / "m")
    assert_same_tensors(model, loaded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_dtype(dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny()
    save_model(model, tmp_path / "m", "hf", dtype=dtype)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded, _ = load_model(tmp_path / "m")  # dtype=None keeps the file's dtype
    assert loaded.tok_embeddings.weight.dtype == dtype
    assert torch.equal(loaded.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight.to(dtype))
    as_float, _ = load_model(tmp_path / "m", dtype=torch.float32)
    assert as_float.norm.weight.dtype == torch.float32


def test_tied_model_writes_no_lm_head(tmp_path: Path) -> None:
    model = tiny(tie_embeddings=True)
    save_model(model, tmp_path / "m", "hf")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.tie_embeddings
    assert loaded.output.weight is loaded.tok_embeddings.weight


def test_tokenizer_and_generation_config(tmp_path: Path) -> None:
    class Tok:
        bos_id, eos_id = 1, 2

        def save_pretrained(self, directory) -> None:
            (Path(directory) / "tokenizer.json").write_text("{}")

    save_model(tiny(), tmp_path / "m", "hf", tokenizer=Tok())
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


def test_loaded_tensors_are_memory_mapped(tmp_path: Path) -> None:
    """In the stored dtype, the non-permuted tensors are the file's memory map, not a copy."""
    save_model(tiny(), tmp_path / "m", "hf")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    loaded, _ = load_model(tmp_path / "m")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    mapped = [line.split() for line in maps.read_text().splitlines() if line.endswith("model.safetensors")]
    ranges = [tuple(int(x, 16) for x in fields[0].split("-")) for fields in mapped]
    ptr = loaded.tok_embeddings.weight.data_ptr()
    assert names and any(lo <= ptr < hi for lo, hi in ranges)


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    save_model(tiny(seed=1), tmp_path / "m", "hf")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    class BrokenTokenizer:  # fails after the weights are written into the temporary directory
        def save_pretrained(self, directory) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(tiny(seed=2), tmp_path / "m", "hf", tokenizer=BrokenTokenizer())
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_write_refuses_wrong_shapes(tmp_path: Path) -> None:
    bad = tiny()
    bad.layers[0].attention.wq.weight = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wq\.weight has shape \(3, 3\)"):
        save_model(bad, tmp_path / "m", "hf")
    assert not (tmp_path / "m").exists()


# Llama 4 ---------------------------------------------------------------------------------------------------------
LLAMA4_CONFIG = {
    "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "hidden_size": 64, "intermediate_size": 32,
    "intermediate_size_mlp": 96, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "vocab_size": 512, "num_local_experts": 4, "interleave_moe_layer_step": 2,
    "attention_chunk_size": 16, "rope_theta": 500000.0,
}  # fmt: skip


def test_llama4_config_defaults_and_lists() -> None:
    c = hf.config_from_hf_llama4(LLAMA4_CONFIG, "config.json")
    assert c.n_experts == 4 and c.moe_every == 2 and c.moe_hidden_dim == 32 and c.ffn_hidden_dim == 96
    assert c.nope_layer_interval == 4 and c.use_qk_norm and c.attn_temperature_tuning
    assert [c.is_moe_layer(i) for i in range(8)] == [False, True] * 4
    explicit = {**LLAMA4_CONFIG, "moe_layers": [2, 5], "no_rope_layers": [1, 1, 0, 1, 1, 0, 1, 1]}
    c = hf.config_from_hf_llama4(explicit, "config.json")
    assert c.moe_every == 3 and c.nope_layer_interval == 3
    assert hf.config_from_hf_llama4({**LLAMA4_CONFIG, "moe_layers": []}, "x").n_experts == 0
    assert hf.config_from_hf_llama4({**LLAMA4_CONFIG, "no_rope_layers": [1] * 8}, "x").nope_layer_interval is None
    unstated = {k: v for k, v in LLAMA4_CONFIG.items() if k != "head_dim"}
    assert hf.config_from_hf_llama4(unstated, "x").dim_per_head == 128  # Llama4TextConfig's default
    back = hf.config_to_hf_llama4(c, torch.float32)
    assert hf.config_from_hf_llama4(back, "x").replace(name="", extra={}) == c.replace(name="", extra={})


@pytest.mark.parametrize("field,value,message", [
    ("moe_layers", [1, 2, 6], "moe_layers .* are not every n-th layer"),
    ("no_rope_layers", [1, 0, 1, 1, 1, 1, 1, 0], "no_rope_layers .* do not mark every n-th layer"),
    ("no_rope_layers", [1, 0], "no_rope_layers must list a 0/1 flag for each of the 8 layers"),
    ("layer_types", ["full_attention"] * 7 + ["chunked_attention"], "layer_types puts chunked attention on "
                                                                      "layers \\[7\\]"),
])  # fmt: skip
def test_llama4_config_refuses_irregular_layers(field: str, value, message: str) -> None:
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        hf.config_from_hf_llama4({**LLAMA4_CONFIG, field: value}, "config.json")


def test_llama4_write_read_and_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-moe")).eval()
    save_model(model, tmp_path / "m", "hf")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForCausalLM"] and config["moe_layers"] == [1, 3]
    assert config["no_rope_layers"] == [1, 1, 1, 0] and config["attention_chunk_size"] == 16
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        gate_up = f.get_tensor("model.layers.1.feed_forward.experts.gate_up_proj")
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert "model.layers.0.feed_forward.gate_proj.weight" in f.keys()  # noqa: SIM118
        assert "model.layers.1.feed_forward.shared_expert.down_proj.weight" in f.keys()  # noqa: SIM118
    experts = model.layers[1].feed_forward.experts
    assert torch.equal(gate_up, torch.cat([experts.w1, experts.w3], dim=-1))
    assert torch.equal(q, model.layers[0].attention.wq.weight)  # Llama 4 stores q and k unpermuted
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.replace(name="", extra={}) == model.config.replace(name="", extra={})
    assert_same_tensors(model, loaded)


def test_llama4_unknown_tensor_names_the_key_and_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    save_model(build_model(get_preset("tiny-moe")), tmp_path / "m", "hf")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.feed_forward.experts.gate_bias"] = torch.zeros(4)
    save_file(tensors, file)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: unexpected tensor "
        r"'model\.layers\.1\.feed_forward\.experts\.gate_bias' \(not a weight of Llama4ForCausalLM\)",
    ):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.float16])
def test_a_tensor_in_another_float_dtype_loads_and_runs(dtype: torch.dtype, tmp_path: Path) -> None:
    """One norm weight stored as float64 or float8 (found by the checkpoint fuzzer: the load worked, the forward
    raised) loads as float32; a float16 one keeps its dtype, which the float32 forward promotes."""
    from safetensors.torch import load_file, save_file

    model = tiny()
    save_model(model, tmp_path / "m", "hf")
    file = tmp_path / "m" / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.0.input_layernorm.weight"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    loaded, _ = load_model(tmp_path / "m")
    weight = loaded.layers[0].attention_norm.weight
    assert weight.dtype == (torch.float16 if dtype == torch.float16 else torch.float32)
    assert torch.equal(weight.float(), model.layers[0].attention_norm.weight.to(dtype).float())
    with torch.inference_mode():
        assert loaded(torch.randint(0, 512, (1, 5))).dtype == torch.float32
