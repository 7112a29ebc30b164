"""Presets against published parameter counts and shapes."""

import math

import pytest

from llamaforge.config import ModelConfig, RopeScaling, get_preset, preset_names
from llamaforge.model import count_parameters

# LLaMA paper, Table 2 (../shared/reference/llama-facts.md): params (billions, as printed), FFN hidden.
LLAMA1 = {
    "llama-7b": (6.7, 4096, 32, 32, 11008),
    "llama-13b": (13.0, 5120, 40, 40, 13824),
    "llama-33b": (32.5, 6656, 52, 60, 17920),
    "llama-65b": (65.2, 8192, 64, 80, 22016),
}


@pytest.mark.parametrize("name", sorted(LLAMA1))
def test_llama1_matches_paper(name):
    params_b, dim, heads, layers, hidden = LLAMA1[name]
    cfg = get_preset(name)
    assert (cfg.dim, cfg.n_heads, cfg.n_layers, cfg.ffn_hidden_dim) == (dim, heads, layers, hidden)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.norm_eps) == (32000, 2048, 1e-6)
    # The paper prints counts truncated to one decimal (65.29B is printed as 65.2B).
    assert math.floor(count_parameters(cfg) / 1e8) / 10 == params_b


# Meta's published sizes for later generations (model cards / sku_list names), in billions, rounded.
# Llama 2 shapes come from Meta's params.json files: sku_list.py in llama-models 0.3.0 gives Llama 2
# the Llama 3 shape (GQA, ffn multiplier 1.3, theta 5e5), which does not match the released weights.
PUBLISHED = {
    "llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98,
    "code-llama-7b": 6.74, "code-llama-13b": 13.02, "code-llama-34b": 33.74, "code-llama-70b": 68.98,
    "llama-3-8b": 8.03, "llama-3-70b": 70.55, "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.55,
    "llama-3.1-405b": 405.85, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.3-70b-instruct": 70.55,
    "smollm2-135m": 0.13, "stories15m": 0.02,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts(name):
    assert round(count_parameters(get_preset(name)) / 1e9, 2) == PUBLISHED[name]


def test_llama3_matches_meta_sku_list():
    """The Llama 3.x presets' shapes equal the arch_args of Meta's llama_models/sku_list.py."""
    sku_list = pytest.importorskip("llama_models.sku_list")
    # A repo can appear twice (405B: an 8-way model-parallel variant with 8 KV heads, a 16-way one with 16).
    by_repo: dict[str, list[dict]] = {}
    for m in sku_list.all_registered_models():
        by_repo.setdefault(m.huggingface_repo, []).append(m.arch_args)
    pairs = {
        "meta-llama/Llama-3-8B": "llama-3-8b", "meta-llama/Llama-3-70B": "llama-3-70b",
        "meta-llama/Llama-3.1-8B": "llama-3.1-8b", "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
        "meta-llama/Llama-3.1-405B": "llama-3.1-405b", "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
        "meta-llama/Llama-3.2-3B": "llama-3.2-3b", "meta-llama/Llama-3.3-70B-Instruct": "llama-3.3-70b-instruct",
    }  # fmt: skip
    checked = 0
    for repo, preset in pairs.items():
        cfg = get_preset(preset)
        keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier", "multiple_of",
                "norm_eps", "rope_theta")  # fmt: skip
        ours = {k: getattr(cfg, k) for k in keys} | {"use_scaled_rope": cfg.rope_scaling is not None}
        variants = [{k: a[k] for k in ours} for a in by_repo.get(repo, []) if a]
        assert ours in variants, (preset, variants)
        checked += 1
    assert checked >= 6


def test_llama4_counts():
    """Llama 4: 17B active parameters; Maverick 400B total. (Scout's published 109B includes the vision
    encoder; its text part computes to 107.8B.)"""
    scout, maverick = get_preset("llama-4-scout-17b-16e"), get_preset("llama-4-maverick-17b-128e")
    assert scout.expert_hidden_dim == 8192 and maverick.ffn_hidden_dim == 16384
    assert round(count_parameters(scout, active=True) / 1e9) == 17
    assert round(count_parameters(maverick, active=True) / 1e9) == 17
    assert round(count_parameters(maverick) / 1e9) in (400, 401)
    assert 107 < count_parameters(scout) / 1e9 < 109


def test_meta_ffn_formula():
    # Llama 2 70B: int(2 * 4 * 8192 / 3) = 21845 -> * 1.3 = 28398 -> round up to 4096 = 28672
    assert get_preset("llama-2-70b").ffn_hidden_dim == 28672
    assert get_preset("llama-3.1-405b").ffn_hidden_dim == 53248
    assert get_preset("llama-3.2-1b").ffn_hidden_dim == 8192


def test_every_preset_builds_a_valid_config():
    for name in preset_names():
        cfg = get_preset(name)
        assert cfg.dim_per_head * cfg.n_heads >= cfg.dim or cfg.head_dim
        assert cfg.n_heads % cfg.kv_heads == 0


def test_unknown_preset_suggests():
    with pytest.raises(KeyError, match="llama-2-7b"):
        get_preset("llama2-7b")


def test_invalid_config_names_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, vocab_size=10)
    with pytest.raises(ValueError, match="dim"):
        ModelConfig(dim=0, n_layers=1, n_heads=4, vocab_size=10)


def test_dict_round_trip():
    cfg = get_preset("llama-3.1-8b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(ModelConfig.from_dict(cfg.to_dict()).rope_scaling, RopeScaling)
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_cross_attention_layers_take_no_kv_cache_slot():
    c = get_preset("tiny", n_layers=6, cross_attention_layers=(1, 4), extra_token_rows=8)
    assert c.token_rows == c.vocab_size + 8 and c.kv_layers == 4
    assert [c.kv_layer(i) for i in (0, 2, 3, 5)] == [0, 1, 2, 3]
    assert ModelConfig.from_dict(c.to_dict() | {"cross_attention_layers": [1, 4]}) == c  # JSON gives a list
    with pytest.raises(ValueError, match=r"cross_attention_layers \[6\] outside 0..5"):
        c.replace(cross_attention_layers=(6,))
    with pytest.raises(ValueError, match="extra_token_rows with tie_embeddings"):
        c.replace(tie_embeddings=True)
