"""Tensor-parallel inference on gloo with 2 CPU processes: each rank holds its slices of the weights and its KV
heads, and the split model gives the one-process logits and greedy tokens (float checkpoints, a tied embedding,
a quantized GGUF kept in its blocks); ``torchrun ... generate --tp 2`` prints what one process prints; shapes
that cannot be split are refused before any weight is read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import llamaforge
from llamaforge.checkpoint import gguf as G
from llamaforge.checkpoint import model_tensors, save_model
from llamaforge.config import get_preset
from llamaforge.errors import UserError
from llamaforge.evaluate.scoring import Scorer
from llamaforge.inference.tensor_parallel import TensorParallel, check_shape, slicer
from llamaforge.model import build_model
from llamaforge.quantize import GGUFEmbedding, GGUFLinear

PROMPTS = [[5, 17, 42, 8, 99, 3, 250, 11, 64], [7, 7, 300, 2]]
NEW_TOKENS = 12
# (context, continuation) pairs for log-likelihood scoring: a shared context, one- and three-token continuations
REQUESTS = [([5, 17, 42, 8], [99, 3]), ([5, 17, 42, 8], [250]), ([7, 7], [300, 2, 11])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny(path: Path, fmt: str = "hf", dtype=None, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", **overrides)).eval()
    if fmt == "gguf":
        G.write(path, model.config, model_tensors(model), dtype=dtype)
    else:
        save_model(model, path, fmt)
    return model


def _tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) written into `path`; its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 10, trainer)
    if tk.get_vocab_size() % 2:  # a vocabulary that splits over 2 ranks
        tk.add_special_tokens(["<pad>"])
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return tk.get_vocab_size()


def _tiny_with_tokenizer(path: Path, **overrides) -> None:
    """A tiny random HF model with a tokenizer (written after the model: a checkpoint directory is replaced whole)."""
    vocab = _tokenizer(path.with_name(path.name + "-tokenizer"))
    _tiny(path, "hf", vocab_size=vocab, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((path.with_name(path.name + "-tokenizer") / name).read_bytes())


def _one_process(path: Path, cache_type: str | None = None) -> dict:
    llm = llamaforge.load(path)
    with torch.no_grad():
        logits = llm.model(torch.tensor([PROMPTS[0]]))
    done = llm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, cache_type=cache_type)
    scores = Scorer(llm.model, batch_size=2, progress=False).score(REQUESTS)
    return {"logits": logits, "tokens": [c.token_ids for c in done], "scores": scores}


def _worker(rank: int, port: int, path: str, cache_type: str | None, result_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    torch.set_num_threads(1)
    from llamaforge.inference.tensor_parallel import follow, load_sharded, start

    tp = start(2, "cpu")
    llm = load_sharded(path, tp)
    model = llm.model
    with torch.no_grad():  # every rank runs an uncached forward together
        logits = model(torch.tensor([PROMPTS[0]]))
    held = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mine = {"held": held, "kv_heads": model.layers[0].attention.n_kv_heads,
            "kinds": {name: type(m).__name__ for name, m in model.named_modules()}}  # fmt: skip
    if not tp.is_leader:
        follow(model)
        torch.save(mine, f"{result_file}.{rank}")
        torch.distributed.destroy_process_group()  # gloo's threads joined before exit (else: terminate called)
        return
    done = llm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, cache_type=cache_type)
    engine = llm.engine(cache_type=cache_type)
    scores = Scorer(model, batch_size=2, progress=False).score(REQUESTS)  # with the other ranks, as eval --tp
    mine.update(logits=logits, tokens=[c.token_ids for c in done], step=engine.step_fn.name,
                cache_heads=engine.cache.n_kv_heads, scores=scores)  # fmt: skip
    tp.stop()
    torch.save(mine, f"{result_file}.{rank}")
    torch.distributed.destroy_process_group()


def _two_ranks(path: Path, tmp_path: Path, cache_type: str | None = None) -> list[dict]:
    result = tmp_path / "result"
    mp.start_processes(_worker, args=(_free_port(), str(path), cache_type, str(result)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    return [torch.load(f"{result}.{rank}", weights_only=False) for rank in range(2)]


def _assert_same_run(ranks: list[dict], one: dict) -> None:
    lead = ranks[0]
    assert lead["step"] == "tensor-parallel"
    torch.testing.assert_close(lead["logits"], one["logits"], rtol=1e-4, atol=1e-4)
    assert lead["tokens"] == one["tokens"]
    assert [s.logprob for s in lead["scores"]] == pytest.approx([s.logprob for s in one["scores"]], abs=1e-4)
    assert [s.greedy for s in lead["scores"]] == [s.greedy for s in one["scores"]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["hf", "tied-meta"])
def test_two_ranks_match_one_process(tmp_path: Path, case: str) -> None:
    """Each rank holds half of every split matrix (whole heads: half the KV heads, in its cache too); the logits
    and the greedy tokens of a batch of two prompts are the one-process ones."""
    # head_dim 32 for the hf case: a q8_0 KV cache stores rows of whole 32-number blocks
    fmt, overrides = ("hf", {"dim": 128}) if case == "hf" else ("meta", {"tie_embeddings": True})
    model = _tiny(tmp_path / "m", fmt, **overrides)
    cache_type = "q8_0" if case == "hf" else None
    ranks = _two_ranks(tmp_path / "m", tmp_path, cache_type)
    _assert_same_run(ranks, _one_process(tmp_path / "m", cache_type))
    c = model.config
    assert ranks[0]["cache_heads"] == c.kv_heads // 2
    for rank in ranks:
        held = rank["held"]
        assert rank["kv_heads"] == c.kv_heads // 2
        assert held["layers.0.attention.wq.weight"] == (c.n_heads * c.dim_per_head // 2, c.dim)
        assert held["layers.0.attention.wk.weight"] == (c.kv_heads * c.dim_per_head // 2, c.dim)
        assert held["layers.0.attention.wo.weight"] == (c.dim, c.n_heads * c.dim_per_head // 2)
        assert held["layers.0.feed_forward.w1.weight"] == (c.ffn_hidden_dim // 2, c.dim)
        assert held["layers.0.feed_forward.w2.weight"] == (c.dim, c.ffn_hidden_dim // 2)
        assert held["tok_embeddings.weight"] == (c.vocab_size, c.dim // 2)
        assert held["output.weight"] == ((c.vocab_size, c.dim // 2) if case != "hf" else (c.vocab_size // 2, c.dim))
        assert held["norm.weight"] == (c.dim,)


@pytest.mark.timeout(300)
def test_quantized_gguf_splits_its_blocks(tmp_path: Path) -> None:
    """A Q8_0 GGUF stays in its blocks on each rank (rows, or whole blocks of columns) and gives the one-process
    greedy tokens of the same file."""
    path = tmp_path / "m.gguf"
    _tiny(path, "gguf", dtype="q8_0", hidden_dim=128, tie_embeddings=True)
    ranks = _two_ranks(path, tmp_path)
    one = _one_process(path)
    assert ranks[0]["step"] == "tensor-parallel"
    assert ranks[0]["tokens"] == one["tokens"]
    # the native kernels round activations to 8 bits per block, on each rank's blocks as on the whole matrix
    torch.testing.assert_close(ranks[0]["logits"], one["logits"], rtol=1e-3, atol=1e-3)
    for rank in ranks:
        assert rank["kinds"]["layers.0.feed_forward.w2"] == GGUFLinear.__name__
        assert rank["kinds"]["tok_embeddings"] == GGUFEmbedding.__name__
        held = rank["held"]
        assert held["layers.0.attention.wq.blocks"] == (32, 68)  # 32 of 64 rows, 64 weights = 2 blocks of 34 bytes
        assert held["layers.0.feed_forward.w2.blocks"] == (64, 68)  # 64 of 128 columns = 2 of 4 blocks per row


def test_a_split_that_cuts_gguf_blocks_is_refused(tmp_path: Path) -> None:
    """The tiny preset's FFN (160) splits into 80 columns per rank, not a whole number of 32-weight blocks."""
    from llamaforge.inference.tensor_parallel import block_slicer

    path = tmp_path / "m.gguf"
    model = _tiny(path, "gguf", dtype="q8_0")
    split = block_slicer(path, model.config, TensorParallel(1, 2, torch.device("cpu")))
    raw = G.read_raw(path)
    w1 = split(raw["layers.0.feed_forward.w1.weight"])  # rows: a view of the file's blocks
    assert w1.shape == (80, 64) and w1.data.data_ptr() == raw["layers.0.feed_forward.w1.weight"].data[80].data_ptr()
    with pytest.raises(UserError, match=r"--tp 2 would split tensor 'blk.0.ffn_down.weight' \(Q8_0, 32 weights per "
                                        r"block\) into 80 columns per rank"):  # fmt: skip
        split(raw["layers.0.feed_forward.w2.weight"])


def test_shapes_that_do_not_split_are_refused() -> None:
    check_shape(get_preset("tiny"), 2)
    with pytest.raises(UserError, match=r"--tp 4: n_kv_heads \(2\) is not divisible by 4"):
        check_shape(get_preset("tiny"), 4)
    with pytest.raises(UserError, match=r"n_heads \(4\) is not divisible by 3.*vocab_size \(512\) is not divisible"):
        check_shape(get_preset("tiny"), 3)
    with pytest.raises(UserError, match="mixture-of-experts layers are not split"):
        check_shape(get_preset("tiny-moe"), 2)


def test_slices_are_copies_of_whole_heads() -> None:
    """A rank keeps a copy of its slice (not a view holding the whole tensor alive), rows or columns as SPLITS says."""
    config = get_preset("tiny")
    take = slicer(config, TensorParallel(1, 2, torch.device("cpu")))
    w = torch.arange(64 * 64, dtype=torch.float32).view(64, 64)
    rows = take("layers.1.attention.wq.weight", w)
    assert torch.equal(rows, w[32:]) and rows.untyped_storage().nbytes() == w.nbytes // 2
    cols = take("layers.1.attention.wo.weight", w)
    assert torch.equal(cols, w[:, 32:]) and cols.untyped_storage().nbytes() == w.nbytes // 2
    norm = torch.ones(64)
    assert take("layers.1.attention_norm.weight", norm) is norm


def test_tp_needs_a_torchrun_job_of_that_size(monkeypatch) -> None:
    from llamaforge.inference.tensor_parallel import start

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match=r"--tp 2 needs 2 processes, this job has 1: launch with torchrun "
                                        r"--nproc-per-node 2"):  # fmt: skip
        start(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"a torchrun job of 2 processes: add --tp 2"):
        start(1)


def test_generate_tp_outside_torchrun_and_with_unsupported_options_is_refused(tmp_path: Path, capsys,
                                                                              monkeypatch) -> None:  # fmt: skip
    from llamaforge.cli import main

    _tiny(tmp_path / "m", "hf")
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "1 2 3", "-n", "2", "--tp", "2"]
    assert main(args) == 2
    assert "--tp 2 needs 2 processes, this job has 1: launch with torchrun" in capsys.readouterr().err
    assert main([*args, "--speculative-ngram", "--compile"]) == 2
    assert "--tp 2 does not combine with --compile, --speculative-ngram" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_generate_tp2_prints_what_one_process_prints(tmp_path: Path) -> None:
    """The documented launch: torchrun --nproc-per-node 2 -m llamaforge generate --tp 2 (greedy) prints the text
    of one process; a model whose heads do not split fails on every rank with the numbers at fault."""
    model_dir = tmp_path / "m"
    _tiny_with_tokenizer(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("LLAMAFORGE_DEBUG", None)
    args = ["generate", "--model", str(model_dir), "--prompt", "hello world", "-n", "16", "-t", "0", "--threads", "1"]
    one = subprocess.run([sys.executable, "-m", "llamaforge", *args], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "llamaforge"]  # fmt: skip
    two = subprocess.run([*torchrun, *args, "--tp", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    assert "Traceback" not in two.stderr

    wrong = subprocess.run([sys.executable, "-m", "llamaforge", *args, "--tp", "2"], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert wrong.returncode != 0 and "--tp 2 needs 2 processes, this job has 1" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    _tiny_with_tokenizer(tmp_path / "odd", n_heads=2, n_kv_heads=1)
    torchrun[torchrun.index("--master-port") + 1] = str(_free_port())
    bad = subprocess.run([*torchrun, *args, "--tp", "2", "--model", str(tmp_path / "odd")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0
    assert "--tp 2: n_kv_heads (1) is not divisible by 2" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_serve_tp2_answers_as_one_process(tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 -m llamaforge serve --tp 2: the OpenAI API's greedy completion is one process's;
    stopping the job (SIGTERM to torchrun) ends it."""
    import httpx

    model_dir = tmp_path / "m"
    _tiny_with_tokenizer(model_dir)
    expected = llamaforge.load(model_dir).generate("hello world", max_new_tokens=16, temperature=0, ignore_eos=True)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "llamaforge", "serve", "--tp", "2", "--model", str(model_dir),
               "--port", str(port), "--log-level", "warning", "--threads", "1", "--no-webui"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 200
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        body = {"model": "m", "prompt": "hello world", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected.text
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode is not None  # both ranks ended with torchrun (the follower does not hang on)


# A rank that dies or hangs: the others end within seconds, saying so ---------------------------------------------
_RANK_SCRIPT = """
import sys, time
from llamaforge.errors import PeerLostError
from llamaforge.inference.tensor_parallel import follow, load_sharded, start

tp = start(2, "cpu", timeout_s=float(sys.argv[2]))
llm = load_sharded(sys.argv[1], tp)
if tp.is_leader:
    time.sleep(float(sys.argv[3]))  # idle for longer than the timeout: the heartbeat keeps the follower
    done = llm.generate([[5, 17, 42]], max_new_tokens=4, temperature=0, ignore_eos=True)
    print("generated", done[0].token_ids, flush=True)
    time.sleep(300)  # until the test kills one of the ranks
else:
    try:
        follow(llm.model)
    except PeerLostError as exc:
        print("lost:", exc, flush=True)
        sys.exit(3)
"""


def _start_ranks(model: Path, timeout_s: float, idle_s: float) -> list[subprocess.Popen]:
    """Two ranks of a job launched without torchrun (as on two hosts: no agent ends one when the other dies)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(port),
               "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(model), str(timeout_s), str(idle_s)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        assert line or proc.poll() is None, f"rank exited ({proc.returncode}): {proc.stderr.read()[-3000:]}"
    raise AssertionError(f"no {prefix!r} line within {timeout_s} s")


def _time_to_exit(proc: subprocess.Popen, limit_s: float) -> float:
    start = time.monotonic()
    proc.wait(timeout=limit_s)
    return time.monotonic() - start


@pytest.mark.timeout(180)
def test_follower_outlives_idle_leader_and_ends_when_it_dies(tmp_path: Path) -> None:
    """Rank 0 idle for twice the ranks' timeout: its heartbeat keeps the follower, which then runs its forwards;
    rank 0 killed: the follower ends within seconds with an error naming what happened."""
    _tiny(tmp_path / "m", "hf")
    leader, follower = _start_ranks(tmp_path / "m", timeout_s=2.0, idle_s=4.0)
    try:
        assert _wait_for_line(leader, "generated", 150)
        assert follower.poll() is None
        leader.kill()
        assert _time_to_exit(follower, 30) < 5
        out, err = follower.communicate()
        assert follower.returncode == 3, err[-3000:]
        assert "lost: tensor-parallel rank 1 of 2: lost contact with rank 0 (" in out
        assert "it crashed, was stopped or hangs: see its log" in out
    finally:
        for p in (leader, follower):
            p.kill()
            p.communicate()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hung_leader_or_a_dead_follower_ends_the_job(tmp_path: Path) -> None:
    """Rank 0 stopped (SIGSTOP, as a hung process or a vanished host): the follower gives up after the timeout.
    A follower killed: rank 0 exits within seconds (its forwards cannot run any more), saying why."""
    import signal

    _tiny(tmp_path / "m", "hf")
    leader, follower = _start_ranks(tmp_path / "m", timeout_s=3.0, idle_s=0.0)
    try:
        _wait_for_line(leader, "generated", 150)
        leader.send_signal(signal.SIGSTOP)
        assert _time_to_exit(follower, 60) < 3.0 + 5
        out, _ = follower.communicate()
        assert follower.returncode == 3 and "lost contact with rank 0 (Timed out" in out
    finally:
        for p in (leader, follower):
            p.kill()
            p.communicate()

    leader, follower = _start_ranks(tmp_path / "m", timeout_s=3.0, idle_s=0.0)
    try:
        _wait_for_line(leader, "generated", 150)
        follower.kill()
        assert _time_to_exit(leader, 60) < 5
        _, err = leader.communicate()
        assert leader.returncode == 1
        assert "llamaforge: error: tensor-parallel rank 0 of 2: lost contact with a follower rank (" in err
    finally:
        for p in (leader, follower):
            p.kill()
            p.communicate()


def test_a_tensor_parallel_scorer_needs_the_kv_cache(tmp_path: Path) -> None:
    model = _tiny(tmp_path / "m", "hf")
    model.tensor_parallel = TensorParallel(0, 2, torch.device("cpu"))  # (as load_sharded marks a split model)
    with pytest.raises(UserError, match="scores through its KV cache: drop --no-prefix-reuse"):
        Scorer(model, prefix_reuse=False)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_eval_tp2_scores_as_one_process(tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 -m llamaforge eval --tp 2: the log-likelihood tasks' scores (and a generative
    task's answers) are one process's."""
    import json

    data = Path(__file__).parents[1] / "evaluate" / "data"
    model_dir = tmp_path / "m"
    _tiny_with_tokenizer(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("LLAMAFORGE_DEBUG", None)
    args = ["eval", "--model", str(model_dir), "--tasks", "piqa,boolq,mmlu,nq_open", "--data-dir", str(data), "-q",
            "--batch-size", "4", "--log-samples", "--max-new-tokens", "8", "--threads", "1"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "llamaforge", *args, "-o", str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), "-m", "llamaforge"]  # fmt: skip
    two = subprocess.run([*torchrun, *args, "--tp", "2", "-o", str(tmp_path / "two.json")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Traceback" not in two.stderr
    results = [json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("one", "two")]
    assert results[0].keys() == results[1].keys() == {"piqa", "boolq", "mmlu", "nq_open"}
    for task in ("piqa", "boolq", "mmlu"):
        a, b = results[0][task], results[1][task]
        assert b["acc"] == a["acc"]
        for x, y in zip(a["items"], b["items"], strict=True):
            for key, value in x.items():
                floats = isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float))
                if floats:  # log-likelihoods
                    assert y[key] == pytest.approx(value, abs=1e-4), (task, key)
                else:
                    assert y[key] == value, (task, key)
    assert results[1]["nq_open"]["items"] == results[0]["nq_open"]["items"]
