"""N-D meshes on gloo with 2 and 4 CPU processes: tensor parallel, pipelines (1F1B, GPipe, interleaved 1F1B),
FSDP2 x TP and PP x TP reproduce the single-process loss curve and weights for the same global batch, and a
checkpoint saved under one mesh resumes under another (or on one process) with the uninterrupted run's curve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import _assert_same_weights, _free_port, _free_ports
from test_loop import tiny_recipe

from llamaforge.checkpoint import load_model, model_tensors
from llamaforge.train.checkpointing import full_model_state
from llamaforge.train.recipe import Trainer

# one process: 2 sequences x 2 accumulation steps per optimizer step; every layout below sees the same global batch
FOUR_LAYERS = {"model.overrides": "{vocab_size: 258, max_seq_len: 64, n_layers: 4}"}
STEP4 = "checkpoints/step_00000004"


def _run(recipe) -> dict:
    box: dict = {}

    def capture(done: int, metrics: dict) -> None:
        if done == recipe.train.steps:  # collective: every rank calls it
            box["weights"] = full_model_state(trainer.module, trainer.layout)

    trainer = Trainer(recipe, callbacks=[capture])
    summary = trainer.fit()
    return {"losses": [h["loss"] for h in trainer.history], "val": [v["val_loss"] for v in trainer.val_history],
            "grad_norms": [h["grad_norm"] for h in trainer.history], "weights": box.get("weights"),
            "start": summary["start_step"]}  # fmt: skip


def _worker(rank: int, world: int, runs: list, ports: list[int], data: str, out: str, result_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for (name, overrides), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        overrides = {k: v.replace("{out}", out) for k, v in overrides.items()}
        results[name] = _run(tiny_recipe(Path(data), Path(out) / name, **overrides))
    if rank == 0:
        torch.save(results, result_file)


def _spawn(world: int, runs: list, data: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / f"results_{world}.pt"
    mp.start_processes(_worker, args=(world, runs, _free_ports(len(runs)), str(data), str(out), str(result_file)),
                       nprocs=world, start_method="spawn")  # fmt: skip
    return torch.load(result_file, weights_only=False)


def _single(data: Path, out: Path, **overrides: str) -> dict:
    torch.set_num_threads(1)
    return _run(tiny_recipe(data, out, **overrides))


def _assert_same_run(run: dict, reference: dict, first_step: int = 0) -> None:
    assert run["start"] == first_step
    assert run["losses"] == pytest.approx(reference["losses"][first_step:], rel=1e-5)
    assert run["val"] == pytest.approx(reference["val"][len(reference["val"]) - len(run["val"]) :], rel=1e-5)
    assert run["grad_norms"] == pytest.approx(reference["grad_norms"][first_step:], rel=1e-4)
    _assert_same_weights(run["weights"], reference["weights"], atol=1e-5)


@pytest.fixture(scope="module")
def single(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _single(prepared, tmp_path_factory.mktemp("single"))


@pytest.mark.timeout(400)
def test_two_process_meshes_match_one_process(prepared: Path, tmp_path: Path, single: dict) -> None:
    """TP 2, PP 2 (1F1B) and interleaved PP 2 x 2 stages on 2 processes; the TP run's step-4 checkpoint resumes
    as a pipeline and on one process."""
    runs = [
        ("tp", {"parallel.tp": "2", "train.activation_checkpointing": "true"}),
        ("pp", {"parallel.pp": "2"}),
        ("pp_from_tp", {"parallel.pp": "2", "train.resume": f"{{out}}/tp/{STEP4}"}),
        ("interleaved", {"parallel.pp": "2", "parallel.pp_schedule": "Interleaved1F1B", **FOUR_LAYERS}),
    ]
    res = _spawn(2, runs, prepared, tmp_path)
    _assert_same_run(res["tp"], single)
    _assert_same_run(res["pp"], single)
    _assert_same_run(res["pp_from_tp"], single, first_step=4)
    _assert_same_run(res["interleaved"], _single(prepared, tmp_path / "single4", **FOUR_LAYERS))
    on_one = _single(prepared, tmp_path / "one", **{"train.resume": str(tmp_path / "tp" / STEP4)})
    _assert_same_run(on_one, single, first_step=4)
    # the export at the end of a tensor-parallel run is the whole model
    exported, _ = load_model(tmp_path / "tp" / "final")
    for name, tensor in model_tensors(exported).items():
        torch.testing.assert_close(tensor, single["weights"][f"model.{name}"], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_process_meshes_and_reshard(prepared: Path, tmp_path: Path, single: dict) -> None:
    """FSDP2 x TP, PP x TP and FSDP2 x PP (GPipe) on 4 processes; the FSDP2 x TP checkpoint resumes on 2 processes
    (FSDP2 only) with the uninterrupted curve, and its export equals the one-process weights."""
    runs = [
        ("dp_tp", {"parallel.tp": "2", "data.micro_batch_size": "1"}),
        ("pp_tp", {"parallel.tp": "2", "parallel.pp": "2"}),
        ("dp_pp", {"parallel.pp": "2", "parallel.pp_schedule": "GPipe", "data.micro_batch_size": "1"}),
    ]
    res = _spawn(4, runs, prepared, tmp_path)
    for name in ("dp_tp", "pp_tp", "dp_pp"):
        _assert_same_run(res[name], single)
    dp = {"train.parallel": "fsdp", "data.micro_batch_size": "1", "train.resume": f"{tmp_path}/dp_tp/{STEP4}"}
    resumed = _spawn(2, [("dp", dp)], prepared, tmp_path / "two")
    _assert_same_run(resumed["dp"], single, first_step=4)
    for name in ("dp_tp", "pp_tp"):
        exported, _ = load_model(tmp_path / name / "final")
        for key, tensor in model_tensors(exported).items():
            torch.testing.assert_close(tensor, single["weights"][f"model.{key}"], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_tensor_parallel_then_convert(prepared: Path, tmp_path: Path) -> None:
    """The documented launch: torchrun -m llamaforge pretrain --parallel.tp 2, then convert its DCP checkpoint to
    GGUF on one process; a layout that does not fit fails on every rank with the numbers at fault."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "llamaforge", "pretrain", "--model.preset", "tiny",
            "--model.overrides", "{vocab_size: 258}", "--data.path", str(prepared), "--data.seq_len", "32",
            "--data.micro_batch_size", "2", "--parallel.tp", "2", "--train.out_dir", str(tmp_path / "run"),
            "--optim.warmup_steps", "2", "--train.ckpt_interval", "2", "--train.steps", "2",
            "--logging.console", "false"]  # fmt: skip
    done = subprocess.run(base, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    converted = subprocess.run([sys.executable, "-m", "llamaforge", "convert", str(step), str(tmp_path / "m.gguf"),
                                "--to", "gguf"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    gguf, _ = load_model(tmp_path / "m.gguf")
    final, _ = load_model(tmp_path / "run" / "final")
    for name, tensor in model_tensors(final).items():
        assert torch.equal(model_tensors(gguf)[name], tensor), name

    shutil.rmtree(tmp_path / "run")
    base[base.index("--master_port") + 1] = str(_free_port())
    bad = subprocess.run([*base, "--model.overrides", "{vocab_size: 258, n_heads: 2, n_kv_heads: 1}"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode != 0
    assert "n_kv_heads (1) is not divisible by parallel.tp (2)" in bad.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tied_embeddings_tensor_parallel_run_and_resume(prepared: Path, tmp_path: Path) -> None:
    """A tied model (one matrix for the embedding and the output) trains under TP 2 as on one process, and its
    TP checkpoint resumes on one process with the uninterrupted curve."""
    tied = {"model.overrides": "{vocab_size: 258, max_seq_len: 64, tie_embeddings: true}"}
    reference = _single(prepared, tmp_path / "single", **tied)
    res = _spawn(2, [("tp", {**tied, "parallel.tp": "2"})], prepared, tmp_path)
    _assert_same_run(res["tp"], reference)
    resumed = _single(prepared, tmp_path / "one", **tied, **{"train.resume": str(tmp_path / "tp" / STEP4)})
    _assert_same_run(resumed, reference, first_step=4)
    exported, _ = load_model(tmp_path / "tp" / "final")
    assert exported.output.weight is exported.tok_embeddings.weight
