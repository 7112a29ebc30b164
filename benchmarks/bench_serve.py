"""Serving benchmark: llamaforge's server against llama-cpp-python's, on the same model and machine.

For each concurrency level (default 1, 4, 16, 64) that many clients stream completions in a closed loop
for --duration seconds (each client finishes at least one request); we report total output tokens/s and
p50/p99 time to first token and inter-token latency, measured by the clients. Both servers get the same
prompt, max_tokens, greedy decoding and the same CPU threads; the end-of-sequence tokens are banned with
``logit_bias`` so every request produces exactly max_tokens tokens on both servers.

    .venv/bin/python benchmarks/bench_serve.py                 # SmolLM2-135M (built-in), both servers
    .venv/bin/python benchmarks/bench_serve.py --write         # also update the "## Serving" section of RESULTS.md
    .venv/bin/python benchmarks/bench_serve.py --prefix-tokens 1500 --write   # prefix reuse: the "## Serving:
                                                               # prefix reuse" section

Prefix reuse (``--prefix-tokens N``): a system prompt of about N tokens, then a question. Each round uses a new
system prompt (it starts with the round's number, so nothing of it is cached): its first request's time to first
token is the cold one, a second request with the same system prompt and another question the warm one (the
server may reuse the first one's KV cache). Medians over ``--rounds``; one client, 4 streamed tokens each.

All traffic stays on 127.0.0.1. llama-cpp-python's rows are skipped (with a note) when it or its server
extras are not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PROMPT = "Write a long story about a llama who learns to program computers. Once upon a time,"


@dataclass
class Sample:
    ttft: float
    itls: list[float]
    tokens: int


@dataclass
class Level:
    server: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    elapsed: float = 0.0
    errors: int = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def row(self) -> dict[str, float | int | str]:
        ttfts = [s.ttft for s in self.samples]
        itls = [x for s in self.samples for x in s.itls]
        return {
            "server": self.server,
            "clients": self.concurrency,
            "requests": len(self.samples),
            "errors": self.errors,
            "tokens": self.tokens,
            "tok_s": self.tokens / self.elapsed if self.elapsed else 0.0,
            "ttft_p50": _pct(ttfts, 50),
            "ttft_p99": _pct(ttfts, 99),
            "itl_p50": _pct(itls, 50),
            "itl_p99": _pct(itls, 99),
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Servers -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _process(cmd: list[str], base: str, health: str, log: Path, timeout: float = 600):
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + health, timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[2]} did not become healthy in {timeout:.0f} s; see {log}")
                time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def llamaforge_server(model: Path, port: int, args: argparse.Namespace, log: Path):
    quantize = ["--quantize", args.quantize] if args.quantize != "none" else []
    cmd = [
        sys.executable,
        "-m",
        "llamaforge",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--served-model-name",
        "model",
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        "512",
        "--max-seq-len",
        str(args.ctx),
        "--threads",
        str(args.threads),
        "--log-level",
        "warning",
        *quantize,
        *args.llamaforge_args,
    ]
    return _process(cmd, f"http://127.0.0.1:{port}", "/health", log)


def llamacpp_server(model: Path, port: int, args: argparse.Namespace, log: Path):
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        "model",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(args.ctx),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--interrupt_requests",  # queue concurrent requests instead of cutting off the running stream
        "False",
    ]
    return _process(cmd, f"http://127.0.0.1:{port}", "/v1/models", log)


def llamacpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed"
    for extra in ("sse_starlette", "starlette_context", "pydantic_settings"):
        try:
            __import__(extra)
        except ImportError:
            return f"llama-cpp-python's server extra {extra} is not installed"
    return None


# Clients ----------------------------------------------------------------------------------------------------------
async def _one(client: httpx.AsyncClient, payload: dict) -> Sample:
    start = time.perf_counter()
    times: list[float] = []
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError("no tokens streamed")
    itls = [b - a for a, b in itertools.pairwise(times)]
    return Sample(ttft=times[0] - start, itls=itls, tokens=len(times))


async def run_level(name: str, base: str, concurrency: int, args: argparse.Namespace, eos_ids: list[int]) -> Level:
    payload = {
        "model": "model",
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "logit_bias": {str(i): -100 for i in eos_ids},
    }
    level = Level(name, concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as client:
        await _one(client, {**payload, "max_tokens": 2})  # warm-up, not counted
        start = time.perf_counter()
        stop_at = start + args.duration

        async def worker() -> None:
            first = True
            while first or time.perf_counter() < stop_at:
                first = False
                try:
                    level.samples.append(await _one(client, payload))
                except (httpx.HTTPError, RuntimeError) as exc:
                    level.errors += 1
                    print(f"  {name} c={concurrency}: request failed: {exc}", file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.elapsed = time.perf_counter() - start
    return level


# Prefix reuse ----------------------------------------------------------------------------------------------------
QUESTIONS = ["What is the main idea?", "Summarize it in one sentence.", "Who would enjoy reading this?",
             "What happens at the end?", "Give it a title.", "What is the tone of the text?"]  # fmt: skip


def system_prompt(tokenizer, n_tokens: int, round_: int) -> str:
    """About `n_tokens` tokens of varied English, starting with the round number (so rounds share no prefix)."""
    words = ["llama", "alpaca", "mountain", "river", "valley", "market", "weaver", "wool", "trader", "village", "song",
             "winter", "harvest", "stone", "bridge", "lantern", "story", "garden", "morning", "evening", "shepherd",
             "herd", "path", "journey"]  # fmt: skip
    sentences, i = [], 0
    while True:
        w = [words[(i * 7 + j * 3) % len(words)] for j in range(9)]
        sentences.append(f"The {w[0]} near the {w[1]} told the {w[2]} about a {w[3]} and its {w[4]} of {w[5]}.")
        i += 1
        text = f"Round {round_}. You are a careful assistant. Read this text first.\n" + " ".join(sentences)
        if len(tokenizer.encode(text)) >= n_tokens:
            return text


async def _ttft(client: httpx.AsyncClient, prompt: str) -> float:
    payload = {"model": "model", "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "stream": True}
    return (await _one(client, payload)).ttft


async def run_prefix(name: str, base: str, args: argparse.Namespace, tokenizer) -> dict:
    cold, warm = [], []
    async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout) as client:
        await _ttft(client, system_prompt(tokenizer, 64, -1) + "\nQuestion: warm-up\nAnswer:")
        for r in range(args.rounds):
            system = system_prompt(tokenizer, args.prefix_tokens, r)
            q1, q2 = QUESTIONS[r % len(QUESTIONS)], QUESTIONS[(r + 1) % len(QUESTIONS)]
            cold.append(await _ttft(client, f"{system}\nQuestion: {q1}\nAnswer:"))
            warm.append(await _ttft(client, f"{system}\nQuestion: {q2}\nAnswer:"))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"  {name:10s} cold TTFT {c:.3f}s  warm TTFT {w:.3f}s  ({c / w:.1f}x)  cold {cold} warm {warm}",
          file=sys.stderr)  # fmt: skip
    return {"server": name, "cold": c, "warm": w, "cold_all": cold, "warm_all": warm}


def prefix_table(rows: list[dict]) -> str:
    lines = ["| server | cold TTFT p50 (s) | warm TTFT p50 (s) | speed-up |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['cold']:.3f} | {r['warm']:.3f} | {r['cold'] / r['warm']:.1f}x |")
    return "\n".join(lines)


# Report ------------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = (
        "| server | clients | requests | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | "
            f"{r['ttft_p99']:.2f} | {r['itl_p50'] * 1000:.0f} | {r['itl_p99'] * 1000:.0f} |"
        )
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the "## Serving" section of RESULTS.md, keeping every other section."""
    from results import replace_section

    replace_section(text, path=path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--duration", type=float, default=30.0, help="seconds each level keeps issuing requests")
    p.add_argument("--max-batch", type=int, default=32, help="llamaforge's --max-batch")
    p.add_argument("--ctx", type=int, default=512, help="context per request on both servers")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--servers", nargs="+", default=["llamaforge", "llama.cpp"], choices=["llamaforge", "llama.cpp"])
    p.add_argument("--write", action="store_true", help="write the '## Serving' section of benchmarks/RESULTS.md")
    p.add_argument(
        "--quantize",
        default="gguf",
        choices=["gguf", "none"],
        help="llamaforge's --quantize: 'gguf' runs the file's own blocks, as llama.cpp does (default)",
    )
    p.add_argument("--prefix-tokens", type=int, default=0, help="run the prefix-reuse benchmark instead (see above)")
    p.add_argument("--rounds", type=int, default=5, help="prefix-reuse rounds (default 5)")
    p.add_argument("--llamaforge-args", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for llamaforge serve (last on the command line)")  # fmt: skip
    args = p.parse_args(argv)

    if args.model:
        model = Path(args.model)
    else:
        from llamaforge.hub import builtin_model_path

        model = builtin_model_path("smollm2-135m-instruct")
    from llamaforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    eos_ids = sorted(tokenizer.stop_ids)
    logs = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    if args.prefix_tokens:
        return prefix_main(model, args, tokenizer, logs, argv)
    rows: list[dict] = []
    notes: list[str] = []
    for name, url in each_server(model, args, logs, notes):
        for c in args.concurrency:
            level = asyncio.run(run_level(name, url, c, args, eos_ids))
            row = level.row()
            rows.append(row)
            print(
                f"  {name:10s} c={c:3d}: {row['tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50']:.2f}s "
                f"p99 {row['ttft_p99']:.2f}s  ITL p50 {row['itl_p50'] * 1e3:.0f}ms p99 {row['itl_p99'] * 1e3:.0f}ms"
                f"  ({row['requests']} requests, {row['errors']} errors)",
                file=sys.stderr,
            )
    ours = {r["clients"]: r["tok_s"] for r in rows if r["server"] == "llamaforge"}
    theirs = {r["clients"]: r["tok_s"] for r in rows if r["server"] == "llama.cpp"}
    checks = []
    if 1 in ours and 16 in ours:
        ratio = ours[16] / ours[1]
        checks.append(
            f"llamaforge at 16 clients / 1 client: {ratio:.1f}x (target >= 3x): {'met' if ratio >= 3 else 'NOT met'}."
        )
    if 16 in ours and 16 in theirs:
        checks.append(
            f"llamaforge / llama.cpp at 16 clients: {ours[16] / theirs[16]:.2f}x (target > 1): "
            f"{'met' if ours[16] > theirs[16] else 'NOT met'}."
        )
    import torch

    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(
        [
            "## Serving",
            "",
            f"`.venv/bin/python benchmarks/bench_serve.py {command}`".replace(" `", "`"),
            "",
            f"Model {model.name}; {args.max_tokens} output tokens per request (EOS banned), greedy, streamed; "
            f"closed-loop clients for {args.duration:.0f} s per level; {args.threads} CPU threads per server; "
            f"llamaforge --max-batch {args.max_batch}, context {args.ctx}. Machine: {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {platform.python_version()}. TTFT includes queueing; "
            "ITL is the gap between streamed chunks.",
            "",
            table(rows),
            "",
            *[f"- {c}" for c in checks + notes],
        ]
    )
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the Serving section of {RESULTS}", file=sys.stderr)
    return 0


def each_server(model: Path, args: argparse.Namespace, logs: Path, notes: list[str]) -> Iterator[tuple[str, str]]:
    """Start each of ``--servers`` in turn and yield (name, base URL) while it runs; llama.cpp is skipped, with a
    note, when llama-cpp-python's server extras are missing."""
    for name in args.servers:
        if name == "llama.cpp" and (missing := llamacpp_missing()):
            notes.append(f"llama.cpp rows skipped: {missing}.")
            continue
        port = _free_port()
        start = (llamaforge_server if name == "llamaforge" else llamacpp_server)(
            model, port, args, logs / f"{name}.log"
        )
        print(f"starting {name} ...", file=sys.stderr)
        with start:
            yield name, f"http://127.0.0.1:{port}"


def prefix_main(model: Path, args: argparse.Namespace, tokenizer, logs: Path, argv: list[str] | None) -> int:
    rows, notes = [], []
    for name, url in each_server(model, args, logs, notes):
        rows.append(asyncio.run(run_prefix(name, url, args, tokenizer)))
    ours = next((r for r in rows if r["server"] == "llamaforge"), None)
    checks = []
    if ours is not None:
        ratio = ours["cold"] / ours["warm"]
        checks.append(f"llamaforge warm / cold time to first token: {ratio:.1f}x faster (target >= 5x): "
                      f"{'met' if ratio >= 5 else 'NOT met'}.")  # fmt: skip
    import torch

    n = len(tokenizer.encode(system_prompt(tokenizer, args.prefix_tokens, 0)))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "## Serving: prefix reuse",
        "",
        f"`.venv/bin/python benchmarks/bench_serve.py {command}`",
        "",
        f"Model {model.name}; a system prompt of {n} tokens, then a question; one client, 4 streamed tokens per "
        f"request; {args.rounds} rounds, each with a new system prompt: its first request is cold, a second one "
        f"with the same system prompt warm. {args.threads} CPU threads per server, context {args.ctx}; llamaforge "
        f"--quantize {args.quantize}. Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}.",
        "",
        prefix_table(rows),
        "",
        *[f"- {c}" for c in checks + notes],
    ])  # fmt: skip
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the prefix-reuse section of {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
