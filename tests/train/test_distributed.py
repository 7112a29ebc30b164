"""Two CPU processes on gloo (loopback): DDP and FSDP2 reproduce the single-process losses for the same
global batch, and an FSDP2 run killed mid-way resumes exactly."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_loop import kill_at, tiny_recipe

from llamaforge.train.checkpointing import full_model_state
from llamaforge.train.recipe import Killed, Trainer

STEPS = 8
# one process: 2 sequences x 2 accumulation steps; two processes: 1 sequence each x 2 steps (same batch)
SINGLE = {"data.micro_batch_size": "2"}
DOUBLE = {"data.micro_batch_size": "1"}


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now (bound together, then released), not a port and its neighbours, which
    may be taken."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port() -> int:
    return _free_ports(1)[0]


def _capture_weights(box: dict, steps: int):
    def callback(done: int, metrics: dict) -> None:
        if done == steps:  # collective under FSDP: every rank calls it
            box["weights"] = full_model_state(box["trainer"].module)

    return callback


def _run(recipe, callbacks=()) -> dict:
    box: dict = {}
    trainer = Trainer(recipe, callbacks=[*callbacks, _capture_weights(box, STEPS)])
    box["trainer"] = trainer
    try:
        trainer.fit()
    except Killed:
        box["killed"] = True
    return {"losses": [h["loss"] for h in trainer.history], "weights": box.get("weights"),
            "val": [v["val_loss"] for v in trainer.val_history], "killed": box.get("killed", False)}  # fmt: skip


def _worker(rank: int, ports: list[int], mode: str, data: str, out: str, result_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    par = {**DOUBLE, "train.parallel": mode}
    os.environ["MASTER_PORT"] = str(ports[0])
    results["straight"] = _run(tiny_recipe(Path(data), Path(out) / "straight", **par))
    if mode == "fsdp":
        os.environ["MASTER_PORT"] = str(ports[1])
        results["killed"] = _run(tiny_recipe(Path(data), Path(out) / "resumed", **par), [kill_at(6)])
        os.environ["MASTER_PORT"] = str(ports[2])
        results["resumed"] = _run(tiny_recipe(Path(data), Path(out) / "resumed", **par, **{"train.resume": "true"}))
    if rank == 0:
        torch.save(results, result_file)


def _spawn(mode: str, data: Path, out: Path) -> dict:
    result_file = out / f"{mode}.pt"
    ports = _free_ports(3)
    mp.start_processes(_worker, args=(ports, mode, str(data), str(out), str(result_file)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    return torch.load(result_file, weights_only=False)


@pytest.fixture(scope="module")
def single(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    box: dict = {}
    trainer = Trainer(tiny_recipe(prepared, tmp_path_factory.mktemp("single"), **SINGLE),
                      callbacks=[_capture_weights(box, STEPS)])  # fmt: skip
    box["trainer"] = trainer
    trainer.fit()
    return {"losses": [h["loss"] for h in trainer.history], "weights": box["weights"],
            "val": [v["val_loss"] for v in trainer.val_history]}  # fmt: skip


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.timeout(300)
def test_ddp_matches_single_process(prepared: Path, tmp_path: Path, single: dict) -> None:
    res = _spawn("ddp", prepared, tmp_path)["straight"]
    assert res["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert res["val"] == pytest.approx(single["val"], rel=1e-5)
    _assert_same_weights(res["weights"], single["weights"], atol=1e-5)


@pytest.mark.timeout(300)
def test_fsdp_matches_single_process_and_resumes_exactly(prepared: Path, tmp_path: Path, single: dict) -> None:
    res = _spawn("fsdp", prepared, tmp_path)
    straight, killed, resumed = res["straight"], res["killed"], res["resumed"]
    assert straight["losses"] == pytest.approx(single["losses"], rel=1e-5)
    _assert_same_weights(straight["weights"], single["weights"], atol=1e-5)
    # killed during step 6 (last checkpoint: step 4), then resumed: the same run, step for step
    assert killed["killed"] and len(killed["losses"]) == 6
    assert killed["losses"] == pytest.approx(straight["losses"][:6], abs=1e-6)
    assert len(resumed["losses"]) == STEPS - 4
    assert resumed["losses"] == pytest.approx(straight["losses"][4:], abs=1e-6)
    _assert_same_weights(resumed["weights"], straight["weights"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_cli_fsdp(prepared: Path, tmp_path: Path) -> None:
    """The documented launch: torchrun -m llamaforge pretrain, 2 CPU processes, FSDP2, then --resume."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "llamaforge", "pretrain", "--model.preset", "tiny",
            "--model.overrides", "{vocab_size: 258}", "--data.path", str(prepared), "--data.seq_len", "32",
            "--data.micro_batch_size", "1", "--train.parallel", "fsdp", "--train.out_dir", str(tmp_path),
            "--optim.warmup_steps", "2", "--train.ckpt_interval", "2", "--logging.console", "false"]  # fmt: skip
    first = subprocess.run([*base, "--train.steps", "4"], env=env, capture_output=True, text=True, timeout=500)
    assert first.returncode == 0, first.stderr[-3000:]
    base[base.index("--master_port") + 1] = str(_free_port())
    second = subprocess.run([*base, "--train.steps", "6", "--resume"], env=env, capture_output=True, text=True,
                            timeout=500)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["start_step"] == 4 and summary["steps"] == 6
    assert (tmp_path / "final" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dead_rank_ends_the_others_with_a_clear_error(prepared: Path, tmp_path: Path) -> None:
    """Two ranks of `pretrain --parallel.tp 2` launched without torchrun (as on two hosts: no agent ends the others
    when one dies); rank 0 killed mid-run: rank 1 ends within seconds, naming what happened, without a traceback."""
    import signal
    import subprocess
    import sys
    import time

    port = _free_port()
    argv = [sys.executable, "-m", "llamaforge", "pretrain", "--model.preset", "tiny", "--model.overrides",
            "{vocab_size: 258}", "--data.path", str(prepared), "--data.seq_len", "32", "--data.micro_batch_size", "1",
            "--parallel.tp", "2", "--train.out_dir", str(tmp_path), "--train.steps", "10000", "--train.log_interval",
            "1", "--train.ckpt_interval", "100000", "--train.eval_interval", "100000",
            "--logging.console", "false"]  # fmt: skip
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(port),
               "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}  # fmt: skip
        env.pop("LLAMAFORGE_DEBUG", None)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 200
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and '"train"' in metrics.read_text()):  # training has started
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGKILL)
        start = time.monotonic()
        _, err = procs[1].communicate(timeout=60)
        assert time.monotonic() - start < 5
        assert procs[1].returncode == 2, err[-3000:]
        assert "llamaforge pretrain: error: rank 1 of 2: lost contact with another rank (" in err
        assert "Traceback" not in err
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_peer_lost_names_the_rank_and_gloos_reason() -> None:
    from llamaforge.distributed import peer_lost
    from llamaforge.errors import PeerLostError

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                        "by peer [127.0.0.1]:52945. This is typically caused by a remote worker crashing.")  # fmt: skip
    lost = peer_lost(gloo, "rank 1 of 2")
    assert isinstance(lost, PeerLostError)
    assert str(lost).startswith("rank 1 of 2: lost contact with another rank (Connection closed by peer "
                                "[127.0.0.1]:52945); it crashed")  # fmt: skip
    assert peer_lost(RuntimeError("CUDA out of memory"), "rank 1 of 2") is None
    assert peer_lost(ValueError("/gloo/ in a message"), "rank 1 of 2") is None
