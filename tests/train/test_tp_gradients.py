"""Per-parameter gradients of tensor-parallel training equal one process's, on gloo with 2 and 4 CPU processes:
tied and untied embeddings, LoRA adapters, TP 2 and FSDP2 x TP 2. The loss curve alone can miss a lost gradient
part: with a tied embedding the first step's loss is the same whether or not the output's share of the gradient
reaches the matrix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import _free_ports

from llamaforge.config import get_preset
from llamaforge.model import build_model
from llamaforge.train.lora import DEFAULT_TARGETS, LORA_TARGETS, LoraConfig, LoRALinear, apply_lora
from llamaforge.train.mesh import Layout, ParallelDims, build_layout, resolve_dims
from llamaforge.train.parallel import clip_grad_norm, parallelize_model

BATCH, SEQ = 4, 16


def _config(tied: bool):
    return get_preset("tiny", vocab_size=258, max_seq_len=64, tie_embeddings=tied)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, 258, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return data[:, :-1], data[:, 1:]


def _gradients(tied: bool, layout: Layout, lora: tuple[str, ...] = ()) -> dict:
    """One forward and backward of the batch (this rank's share of it) under ``layout``, with LoRA on the
    ``lora`` targets if any; every parameter's whole gradient (collective) and the gradient norm, as the Trainer
    takes them."""
    torch.manual_seed(0)
    model = build_model(_config(tied))
    if lora:
        apply_lora(model, LoraConfig(r=4, alpha=8.0, targets=lora))
        for m in model.modules():  # B = 0 would leave A without a gradient
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.05)
    runner = parallelize_model(model, layout, torch.device("cpu"))
    tokens, targets = _batch()
    share = BATCH // layout.dp_size
    rows = slice(layout.dp_rank * share, (layout.dp_rank + 1) * share)
    # FSDP2 averages the data-parallel gradients: scale by dp / all targets for the gradient of the mean loss
    runner.forward_backward([{"tokens": tokens[rows], "targets": targets[rows]}], layout.dp_size / targets.numel())
    grads = {}
    for name, p in runner.module.named_parameters():
        grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    norm = clip_grad_norm(list(runner.module.parameters()), 0.0)
    tied_now = getattr(model.output, "weight", None) is model.tok_embeddings.weight
    trainable = sorted(name for name, p in runner.module.named_parameters() if p.requires_grad)
    return {"grads": grads, "norm": norm, "tied": tied_now, "n_params": len(list(runner.module.parameters())),
            "trainable": trainable}  # fmt: skip


def _worker(rank: int, world: int, cases: list, port: int, result_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        results = {}
        for name, tied, tp, lora in cases:
            layout = build_layout(resolve_dims(world, tp=tp), torch.device("cpu"), rank)
            results[name] = _gradients(tied, layout, lora)
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: list, tmp_path: Path) -> dict:
    result_file = tmp_path / f"grads_{world}.pt"
    mp.start_processes(_worker, args=(world, cases, _free_ports(1)[0], str(result_file)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return torch.load(result_file, weights_only=False)


def _assert_same_gradients(run: dict, tied: bool, lora: tuple[str, ...] = ()) -> None:
    torch.set_num_threads(1)
    reference = _gradients(tied, Layout(ParallelDims()), lora)
    assert run["tied"] == reference["tied"]  # the tie survives parallelization: one matrix, one parameter
    assert run["n_params"] == reference["n_params"]
    assert run["trainable"] == reference["trainable"]  # a frozen base stays frozen
    if lora:
        assert run["trainable"] and all(name.endswith((".lora_A", ".lora_B")) for name in run["trainable"])
    assert run["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        if grad is None:
            assert run["grads"][name] is None, name
        else:
            torch.testing.assert_close(run["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert run["norm"] == pytest.approx(reference["norm"], rel=1e-5)


# (name, tied, tp, LoRA targets)
CASES = [("tied", True, 2, ()), ("untied", False, 2, ()), ("lora", False, 2, LORA_TARGETS),
         ("lora_tied", True, 2, DEFAULT_TARGETS)]  # fmt: skip


@pytest.mark.timeout(300)
def test_tensor_parallel_gradients_match_one_process(tmp_path: Path) -> None:
    res = _spawn(2, CASES, tmp_path)
    for name, tied, _, lora in CASES:
        _assert_same_gradients(res[name], tied, lora)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_by_tensor_parallel_gradients_match_one_process(tmp_path: Path) -> None:
    res = _spawn(4, CASES, tmp_path)
    for name, tied, _, lora in CASES:
        _assert_same_gradients(res[name], tied, lora)
