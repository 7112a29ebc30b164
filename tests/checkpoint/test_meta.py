"""Meta checkpoints: params.json translation, FFN width encoding, multi-shard merging, tied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamaforge.checkpoint import detect_format, load_model, meta, model_tensors, save_model
from llamaforge.config import RopeScaling, get_preset
from llamaforge.model import build_model


def tiny(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny", **overrides)).eval()


def assert_same_tensors(a, b) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_write_then_read_is_exact(tmp_path: Path) -> None:
    model = tiny()
    save_model(model, tmp_path / "m", "meta")
    assert detect_format(tmp_path / "m") == "meta"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["consolidated.00.pth", "params.json"]
    loaded, fmt = load_model(tmp_path / "m")
    assert fmt == "meta"
    ffn = dict(multiple_of=loaded.config.multiple_of, ffn_dim_multiplier=loaded.config.ffn_dim_multiplier)
    assert loaded.config.replace(name="") == model.config.replace(name="", **ffn)
    assert_same_tensors(model, loaded)


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3.1-405b", "code-llama-34b",
                                    "llama-3.2-1b", "smollm2-135m", "stories15m", "tiny"])  # fmt: skip
def test_params_reproduce_the_ffn_width(preset: str) -> None:
    config = get_preset(preset)
    params = meta.params_for(config)
    assert meta.meta_ffn_width(config.dim, params["multiple_of"], params["ffn_dim_multiplier"]) == config.ffn_hidden_dim
    if config.hidden_dim is None:  # Meta's own models keep their own multiple_of and multiplier
        assert (params["multiple_of"], params["ffn_dim_multiplier"]) == (config.multiple_of, config.ffn_dim_multiplier)


@pytest.mark.parametrize("hidden", [1, 7, 100, 160, 171, 1000, 4097])
def test_ffn_params_for_any_width(hidden: int) -> None:
    multiple_of, multiplier = meta.ffn_params(64, hidden, 256, None)
    assert meta.meta_ffn_width(64, multiple_of, multiplier) == hidden


def test_rope_scaling_and_extra_params(tmp_path: Path) -> None:
    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
    model = tiny(rope_scaling=scaling, rope_theta=500000.0, max_seq_len=1024)
    save_model(model, tmp_path / "m", "meta")
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    config = meta.read_config(tmp_path / "m")
    assert config.rope_scaling == scaling and config.rope_theta == 500000.0 and config.max_seq_len == 1024


def test_meta_style_params_json(tmp_path: Path) -> None:
    """A params.json as Meta ships it (LLaMA 2 style: vocab_size -1, no rope_theta) plus rope.freqs."""
    model = tiny(n_kv_heads=None, hidden_dim=None, multiple_of=32)  # Meta's formula: 192
    state = dict(model_tensors(model))
    state["rope.freqs"] = torch.zeros(8)
    (tmp_path / "m").mkdir()
    torch.save(state, tmp_path / "m" / "consolidated.00.pth")
    params = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.vocab_size == 512 and loaded.config.rope_theta == 10000.0
    assert loaded.config.ffn_hidden_dim == 192 and not loaded.config.tie_embeddings
    assert_same_tensors(model, loaded)


def test_use_scaled_rope_without_factors_means_llama31(tmp_path: Path) -> None:
    model = tiny()
    (tmp_path / "m").mkdir()
    torch.save(model_tensors(model), tmp_path / "m" / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
              "ffn_dim_multiplier": 0.9, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}  # fmt: skip
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    config = meta.read_config(tmp_path / "m")
    assert config.rope_scaling == RopeScaling() and config.ffn_hidden_dim == 160


def test_tied_embeddings_stored_once(tmp_path: Path) -> None:
    model = tiny(tie_embeddings=True)
    save_model(model, tmp_path / "m", "meta")
    state = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True, mmap=True)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])  # Meta's model needs output
    assert (
        state["output.weight"].untyped_storage().data_ptr()
        == state["tok_embeddings.weight"].untyped_storage().data_ptr()
    )
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight


def split_by_hand(state: dict[str, torch.Tensor], n: int, embedding_dim: int, kv_repeat: int = 1) -> list[dict]:
    """Shard a state dict the way Meta's model parallelism does (see the module docstring of meta.py)."""
    shards: list[dict] = [{} for _ in range(n)]
    for name, tensor in state.items():
        if tensor.dim() == 1:
            parts = [tensor.clone() for _ in range(n)]
        elif name == "tok_embeddings.weight":
            parts = list(tensor.chunk(n, dim=embedding_dim))
        elif name.endswith(("wo.weight", "w2.weight")):
            parts = list(tensor.chunk(n, dim=1))
        elif kv_repeat > 1 and name.endswith(("wk.weight", "wv.weight")):
            parts = [p for p in tensor.chunk(n // kv_repeat, dim=0) for _ in range(kv_repeat)]
        else:
            parts = list(tensor.chunk(n, dim=0))
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


@pytest.mark.parametrize("n,embedding_dim,kv_repeat", [(2, 1, 1), (2, 0, 1), (4, 0, 2)],
                         ids=["llama2-2shards", "llama3-2shards", "4shards-kv-replicated"])  # fmt: skip
def test_multi_shard_merge(n: int, embedding_dim: int, kv_repeat: int, tmp_path: Path) -> None:
    model = tiny()
    save_model(model, tmp_path / "one", "meta")
    state = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    (tmp_path / "m").mkdir()
    for i, shard in enumerate(split_by_hand(state, n, embedding_dim, kv_repeat)):
        torch.save(shard, tmp_path / "m" / f"consolidated.{i:02d}.pth")
    params = json.loads((tmp_path / "one" / "params.json").read_text())
    params["vocab_size"] = -1
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.vocab_size == 512
    assert_same_tensors(model, loaded)


def test_bfloat16_write(tmp_path: Path) -> None:
    model = tiny()
    save_model(model, tmp_path / "m", "meta", dtype=torch.bfloat16)
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.layers[1].feed_forward.w2.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.layers[1].feed_forward.w2.weight, model.layers[1].feed_forward.w2.weight.bfloat16())


def test_tokenizer_model_written(tmp_path: Path) -> None:
    class Tok:
        def _files_for_save(self):
            return "tokenizer.model", b"spm-bytes", "LlamaTokenizer"

    save_model(tiny(), tmp_path / "m", "meta", tokenizer=Tok())
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == b"spm-bytes"


def test_refuses_head_dim_meta_cannot_express(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim"):
        save_model(tiny(head_dim=32), tmp_path / "m", "meta")
    assert not (tmp_path / "m").exists()
