"""LoRA numerics against Hugging Face PEFT on transformers' LlamaForCausalLM.

The same random tiny model (written with ``save_model(..., "hf")``), the same LoRA configuration and adapter
weights (ours saved in PEFT's layout and loaded with ``PeftModel.from_pretrained``), the same batch with
response-only labels: the loss and every adapter gradient must agree. q/k ``lora_B`` rows are compared in the
HF (rotate-half) row order, as saved.
"""

from __future__ import annotations

import pytest
import torch

from llamaforge.checkpoint import save_model
from llamaforge.checkpoint.hf import permute_to_hf
from llamaforge.config import get_preset
from llamaforge.model import build_model
from llamaforge.train.lora import LoraConfig, LoRALinear, apply_lora, save_adapter
from llamaforge.train.loss import IGNORE_INDEX, CausalLMLoss

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _hf_name(name: str) -> str:
    from llamaforge.train.lora import _hf_module_name

    return _hf_module_name(name)


@pytest.mark.parametrize("targets,tied", [("wq,wk,wv,wo,w1,w2,w3", False), ("wq,wk,wv,output", False),
                                          ("wk,w2", True)])  # fmt: skip
def test_loss_and_adapter_grads_match_peft(tmp_path, targets: str, tied: bool) -> None:
    torch.manual_seed(0)
    config = get_preset("tiny", tie_embeddings=tied)
    model = build_model(config)
    save_model(model, tmp_path / "hf", "hf")

    cfg = LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=targets)
    adapted = apply_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in adapted.values():  # random A and B: a zero B would hide most of the math
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    save_adapter(model, tmp_path / "adapter", cfg, config, layout="peft")

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32,
                                                       attn_implementation="eager")  # fmt: skip
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    hf.train()
    model.train()

    ids = torch.randint(0, config.vocab_size, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX  # response-only loss: the prompt does not count
    labels[1, 15:] = IGNORE_INDEX

    ours_sum, count = CausalLMLoss(model)(ids[:, :-1], labels[:, 1:])
    ours = ours_sum / count
    ours.backward()
    theirs = hf(input_ids=ids, labels=labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    peft_params = dict(hf.named_parameters())
    trainable = {n for n, p in peft_params.items() if p.requires_grad}
    assert len(trainable) == 2 * len(adapted)  # PEFT trains exactly the same tensors
    for name, mod in adapted.items():
        assert isinstance(mod, LoRALinear)
        stem = f"base_model.model.{_hf_name(name)}"
        a = peft_params[f"{stem}.lora_A.default.weight"].grad
        b = peft_params[f"{stem}.lora_B.default.weight"].grad
        our_b = mod.lora_B.grad
        last = name.split(".")[-1]
        if last in ("wq", "wk"):
            our_b = permute_to_hf(our_b, config.n_heads if last == "wq" else config.kv_heads)
        torch.testing.assert_close(mod.lora_A.grad, a, atol=1e-6, rtol=1e-4, msg=f"{name} lora_A grad")
        torch.testing.assert_close(our_b, b, atol=1e-6, rtol=1e-4, msg=f"{name} lora_B grad")
