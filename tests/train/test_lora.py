"""LoRA / QLoRA modules: exact trainable-parameter counts, merge equivalence, adapter save/load, NF4."""

from __future__ import annotations

import json

import pytest
import torch

from llamaforge.config import get_preset
from llamaforge.model import build_model
from llamaforge.train.lora import (
    LoraConfig,
    LoRALinear,
    NF4Linear,
    apply_adapter,
    apply_lora,
    expected_lora_parameters,
    merge_lora,
    nf4_code,
    parse_targets,
    quantize_base,
    read_adapter,
    save_adapter,
    trainable_parameters,
)
from llamaforge.train.loss import CausalLMLoss


def _model(preset: str = "tiny", **overrides):
    torch.manual_seed(0)
    return build_model(get_preset(preset, **overrides))


def _randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero (a no-op adapter); random B makes equivalence tests meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("targets", ["wq,wv", "all", "attention", "mlp"])
@pytest.mark.parametrize("r", [1, 4])
def test_only_adapters_train_with_exact_count(targets: str, r: int) -> None:
    model = _model()
    cfg = get_preset("tiny")
    adapted = apply_lora(model, LoraConfig(r=r, targets=targets))
    trainable = trainable_parameters(model)
    assert set(trainable) == {f"{n}.{ab}" for n in adapted for ab in ("lora_A", "lora_B")}
    # r * (in + out) per adapted linear, computed from the config's shapes
    shapes = {"wq": (cfg.dim, cfg.n_heads * cfg.dim_per_head), "wk": (cfg.dim, cfg.kv_heads * cfg.dim_per_head),
              "wv": (cfg.dim, cfg.kv_heads * cfg.dim_per_head), "wo": (cfg.n_heads * cfg.dim_per_head, cfg.dim),
              "w1": (cfg.dim, cfg.ffn_hidden_dim), "w3": (cfg.dim, cfg.ffn_hidden_dim),
              "w2": (cfg.ffn_hidden_dim, cfg.dim), "output": (cfg.dim, cfg.vocab_size)}  # fmt: skip
    names = parse_targets(targets)
    per_layer = sum(r * sum(shapes[t]) for t in names if t != "output")
    expected = per_layer * cfg.n_layers + (r * sum(shapes["output"]) if "output" in names else 0)
    assert sum(p.numel() for p in trainable.values()) == expected == expected_lora_parameters(model)


def test_training_changes_only_adapters() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, targets="all"))
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    tokens = torch.randint(0, 512, (2, 16))
    loss_sum, n = CausalLMLoss(model)(tokens[:, :-1], tokens[:, 1:])
    (loss_sum / n).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    opt.step()
    after = model.state_dict()
    for name, value in before.items():  # base weights live under <module>.base.weight now
        key = name if name in after else name.replace(".weight", ".base.weight")
        assert torch.equal(after[key], value), name


@pytest.mark.parametrize("preset,targets", [("tiny", "all"), ("tiny", "wq,wk,w2"), ("tiny-moe", "all")])
def test_merged_weights_give_same_logits(preset: str, targets: str) -> None:
    model = _model(preset, tie_embeddings=True) if preset == "tiny" else _model(preset)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=targets))
    _randomize_b(model)
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        base_plus_adapter = model(tokens)
        merge_lora(model)
        merged = model(tokens)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, base_plus_adapter, atol=1e-5, rtol=1e-5)
    if "output" in parse_targets(targets) and preset == "tiny":
        assert model.config.tie_embeddings is False  # the head got its own merged matrix


def test_merged_model_saves_and_reloads_as_hf(tmp_path) -> None:
    from llamaforge.checkpoint import load_model, save_model

    model = _model("tiny", tie_embeddings=True)
    apply_lora(model, LoraConfig(r=2, targets="all"))
    _randomize_b(model)
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        expected = model(tokens)
    merge_lora(model)
    save_model(model, tmp_path / "merged", "hf")
    reloaded, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["peft", "llamaforge"])
def test_adapter_round_trip(tmp_path, layout: str) -> None:
    model = _model()
    cfg = LoraConfig(r=4, alpha=12, targets="wq,wk,wv,w2,output")
    apply_lora(model, cfg)
    _randomize_b(model)
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        expected = model(tokens)
    out = save_adapter(model, tmp_path / "adapter", cfg, model.config, base_model="tiny", layout=layout)
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["r"] == 4 and meta["lora_alpha"] == 12
    if layout == "peft":
        assert sorted(meta["target_modules"]) == ["down_proj", "k_proj", "lm_head", "q_proj", "v_proj"]
    fresh = _model()
    apply_adapter(fresh, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), expected)
    loaded_cfg, pairs = read_adapter(out, fresh.config)
    assert loaded_cfg.r == 4 and loaded_cfg.scale == 3.0 and len(pairs) == 2 * 4 + 1


def test_adapter_mismatch_is_reported(tmp_path) -> None:
    model = _model()
    cfg = LoraConfig(r=2, targets="wq")
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "a", cfg, model.config)
    other = _model("tiny", dim=128, n_heads=4)
    with pytest.raises(Exception, match="adapter shapes"):
        apply_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        apply_adapter(_model(), tmp_path)


def test_nf4_levels_and_round_trip() -> None:
    code = nf4_code()
    assert code.shape == (16,) and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    # the published NF4 levels (QLoRA paper, appendix E), to 4 decimals
    published = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
                 0.4407, 0.5626, 0.7230, 1.0]  # fmt: skip
    torch.testing.assert_close(code, torch.tensor(published), atol=2e-4, rtol=0)
    w = torch.randn(96, 80)
    q = NF4Linear.from_float(w)
    err = (q.dequantize() - w).abs()
    # each weight is within half of the widest gap between levels, times its block's absmax
    absmax = w.flatten().view(-1, 64).abs().amax(1).repeat_interleave(64).view(96, 80)
    assert (err <= absmax * (code.diff().max() / 2) + 1e-6).all()
    assert err.mean() < 0.1 * w.abs().mean()


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_qlora_trains_adapters_through_frozen_4bit_base(scheme: str) -> None:
    model = _model()
    quantize_base(model, scheme)
    apply_lora(model, LoraConfig(r=4, targets="all"))
    _randomize_b(model)
    assert all(".lora_" in n for n in trainable_parameters(model))
    tokens = torch.randint(0, 512, (2, 12))  # 22 rows < 32: int4's kernel path in inference
    loss_sum, n = CausalLMLoss(model)(tokens[:, :-1], tokens[:, 1:])
    (loss_sum / n).backward()
    # the same computation with the dequantized weights as plain float layers gives the same gradients
    ref = _model()
    quantize_base(ref, scheme)
    with torch.no_grad():
        for name, mod in list(ref.named_modules()):
            if hasattr(mod, "dequantize") and not isinstance(mod, LoRALinear):
                lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
                lin.weight.copy_(mod.dequantize())
                parent, _, attr = name.rpartition(".")
                setattr(ref.get_submodule(parent), attr, lin)
    apply_lora(ref, LoraConfig(r=4, targets="all"))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    ref_sum, _ = CausalLMLoss(ref)(tokens[:, :-1], tokens[:, 1:])
    (ref_sum / n).backward()
    torch.testing.assert_close(loss_sum, ref_sum, atol=1e-4, rtol=1e-5)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    # inference through the quantized kernels agrees with the float reference
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), atol=0.1, rtol=0.05)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets="wq,bogus")
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="QLoRA"):
        quantize_base(_model(), "int3")
    assert parse_targets("q_proj,lm_head,wq") == ("wq", "output")
