"""Soak benchmark: `llamaforge serve` on the 1B-shape GGUF, driven at its capacity for a long time by mixed
clients, then stopped with SIGTERM while requests are in flight (issue 21, item 4).

    .venv/bin/python benchmarks/bench_soak.py --duration 60               # a short run while developing
    .venv/bin/python benchmarks/bench_soak.py --duration 1800 --write     # the 30-minute soak, into RESULTS.md

The server (``bench_serve.llamaforge_server``: ``--threads 2``, ``--max-batch 4``, context 512) serves
``random-1b.Q4_K_M.gguf`` (made by ``model_files.py`` when missing). As many clients as its max batch loop
for ``--duration`` seconds, each picking its next request at random from this mix:

- streaming and non-streaming chat and completions (``ignore_eos``, 8..``--max-tokens`` tokens): the answer
  must be complete (``finish_reason`` "length", every token counted in ``usage``, a stream ends with [DONE]);
- cancellations: a stream closed after its first 1-3 chunks, or before its first chunk (right after the response
  headers, or while still waiting for them);
- bad requests, each of which must get its 4xx with OpenAI's error body (negative temperature, unknown model,
  a prompt longer than the context, malformed JSON, wrong types, ``max_tokens`` 0, a huge ``n``, an oversized body);
- long prompts: token ids up to 16 tokens short of the context, each one new (no prefix-cache hits).

Every minute: requests by outcome, p50/p99 latency (end to end, completed requests) and time to first token
(streams), the server's resident memory (``VmRSS`` of /proc/<pid>/status, sampled every 2 s) and the machine's
load average. Then the drain: ``--max-batch`` + 2 requests (streams and non-streaming, some queued) are in the
server when it gets SIGTERM; each must complete, a request sent after the signal must be refused (connection
refused or 503) or served, and the process must exit 0.

Checks (any failure makes the script exit 1): no unexpected outcome (5xx, a 4xx other than the expected one, a
connection error or reset, a timeout, an incomplete answer); the engine holds no request or KV-cache block once
the clients stop; resident memory grows < 1 % from the end of the warm-up (``--warmup``) to the end of the run,
both measured with the server idle (the clients pause after the warm-up until it holds no request: under load
the RSS swings by a few % with the prompts being prefilled); the drain loses nothing and exits 0; no traceback
in the server log. The RSS under load (per minute, and its least-squares trend) is reported as well.
p99 latency stability (last third / first third of the run after the warm-up) is reported, not enforced: on a
shared machine it follows the other jobs' load. The table and the JSON (``--json``, default in the log folder)
are printed; ``--write`` also puts a "## Serving: soak" section into RESULTS.md with the command and the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from bench_serve import _free_port, _pct, llamaforge_server  # the sibling scripts, imported by plain name
from model_files import ensure_models, model_path
from results import RESULTS, replace_section

ROOT = Path(__file__).resolve().parent.parent
MODEL = "model"  # the served model name (bench_serve's)
EXPECTED = ("ok", "cancelled_mid", "cancelled_early", "rejected_as_expected")
MIX = {"chat_stream": 3, "chat": 2, "completion_stream": 2, "completion": 2, "cancel_mid": 1, "cancel_early": 1,
       "bad": 2, "long_prompt": 1}  # fmt: skip
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me a long story about a llama who learns to program."}]  # fmt: skip


@dataclass
class Outcome:
    kind: str
    outcome: str  # one of EXPECTED, or what went wrong
    start: float  # seconds since the soak started
    end: float
    ttft: float | None = None
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start


class UnexpectedError(Exception):
    """An answer the client should not have got: its outcome name and a detail."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome, self.detail = outcome, detail


# One request of each kind ------------------------------------------------------------------------------------------
def _check_error_body(response: httpx.Response, want: int) -> None:
    if response.status_code != want:
        outcome = "server_error" if response.status_code >= 500 else "wrong_status"
        raise UnexpectedError(outcome, f"HTTP {response.status_code} (expected {want}): {response.text[:200]}")
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        raise UnexpectedError("bad_error_body", response.text[:200]) from None
    if not message:
        raise UnexpectedError("bad_error_body", response.text[:200])


def _check_ok(response: httpx.Response) -> dict:
    if response.status_code != 200:
        outcome = "server_error" if response.status_code >= 500 else "wrong_status"
        raise UnexpectedError(outcome, f"HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


def _check_complete(finish: str | None, tokens: int | None, want: int, what: str) -> None:
    if finish != "length" or tokens != want:
        raise UnexpectedError("incomplete", f"{what}: finish_reason {finish!r}, {tokens} of {want} tokens")


async def _plain(client: httpx.AsyncClient, route: str, body: dict) -> None:
    data = _check_ok(await client.post(route, json=body))
    choice = data["choices"][0]
    _check_complete(choice["finish_reason"], data["usage"]["completion_tokens"], body["max_tokens"], route)


async def _stream(client: httpx.AsyncClient, route: str, body: dict, stop_after: int | None = None) -> float | None:
    """Read a stream to its end (or close it after `stop_after` content chunks); the time to its first content."""
    start = time.monotonic()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    ttft, chunks, finish, usage, done = None, 0, None, None, False
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            _check_ok(response)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise UnexpectedError("stream_error", line[:200])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    chunks += 1
                    ttft = ttft if ttft is not None else time.monotonic() - start
                finish = choice.get("finish_reason") or finish
            if stop_after is not None and chunks >= stop_after:
                return ttft  # leaving the block closes the connection mid-stream
    if not done:
        raise UnexpectedError("incomplete", f"{route}: the stream ended without [DONE]")
    _check_complete(finish, (usage or {}).get("completion_tokens"), body["max_tokens"], route + " (stream)")
    return ttft


def _bad_requests(ctx: int, vocab_ids: list[int]) -> list[tuple[str, dict | bytes, int]]:
    """(route, body, expected status) of requests a server must refuse."""
    c, m = "/v1/completions", "/v1/chat/completions"
    return [
        (c, {"model": MODEL, "prompt": "Hi", "temperature": -1}, 400),
        (c, {"model": "no-such-model", "prompt": "Hi", "max_tokens": 4}, 404),
        (c, {"model": MODEL, "prompt": (vocab_ids * (ctx // len(vocab_ids) + 2))[: ctx + 50], "max_tokens": 4}, 400),
        (c, b'{"model": "model", "prompt": "Hi", ', 400),
        (m, {"model": MODEL, "messages": "hello"}, 400),
        (m, {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400),
        (c, {"model": MODEL, "prompt": "Hi", "n": 10**6, "max_tokens": 4}, 400),
        (c, b'{"model": "model", "prompt": "' + b"x" * (5 << 20) + b'"}', 413),
    ]


class Soak:
    def __init__(self, args: argparse.Namespace, base: str, prompt_ids: list[int]) -> None:
        self.args, self.base, self.prompt_ids = args, base, prompt_ids
        self.bad = _bad_requests(args.ctx, prompt_ids)
        self.outcomes: list[Outcome] = []
        self.t0 = time.monotonic()
        self.counter = 0
        self.gate = asyncio.Event()  # cleared: the clients start nothing new (the quiet point after the warm-up)
        self.gate.set()
        self.busy = 0
        self.server_alive = lambda: True

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def one(self, client: httpx.AsyncClient, rng: random.Random, kind: str) -> Outcome:
        a = self.args
        start = self.now()
        tokens = rng.randint(8, a.max_tokens)
        chat = {
            "model": MODEL,
            "messages": CHAT,
            "max_tokens": tokens,
            "ignore_eos": True,
            "seed": rng.randrange(1 << 30),
        }
        text = {"model": MODEL, "prompt": "Once upon a time, a llama", "max_tokens": tokens, "ignore_eos": True,
                "seed": rng.randrange(1 << 30)}  # fmt: skip
        ttft, outcome = None, "ok"
        try:
            if kind == "chat_stream":
                ttft = await _stream(client, "/v1/chat/completions", chat)
            elif kind == "chat":
                await _plain(client, "/v1/chat/completions", chat)
            elif kind == "completion_stream":
                ttft = await _stream(client, "/v1/completions", text)
            elif kind == "completion":
                await _plain(client, "/v1/completions", text)
            elif kind == "cancel_mid":
                ttft = await _stream(
                    client, "/v1/completions", {**text, "max_tokens": 64}, stop_after=rng.randint(1, 3)
                )
                outcome = "cancelled_mid"
            elif kind == "cancel_early":
                outcome = "cancelled_early"
                if rng.random() < 0.5:  # the response has started (headers), no chunk read
                    async with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
                        if r.status_code != 200:
                            await r.aread()
                            _check_ok(r)
                else:  # gone while still waiting for the headers
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client.post("/v1/completions", json={**text, "stream": True}), 0.05)
            elif kind == "bad":
                route, body, want = self.bad[self.counter % len(self.bad)]
                self.counter += 1
                raw = isinstance(body, bytes)
                kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
                _check_error_body(await client.post(route, **kw), want)
                outcome = "rejected_as_expected"
            elif kind == "long_prompt":
                n = a.ctx - 8 - rng.randint(1, 16)
                ids = rng.sample(self.prompt_ids, k=min(n, len(self.prompt_ids)))
                ids += rng.choices(self.prompt_ids, k=n - len(ids))
                await _plain(client, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 8,
                                                         "ignore_eos": True})  # fmt: skip
            else:
                raise ValueError(kind)
        except UnexpectedError as exc:
            return Outcome(kind, exc.outcome, start, self.now(), ttft, exc.detail)
        except httpx.TimeoutException as exc:
            return Outcome(kind, "timeout", start, self.now(), ttft, repr(exc))
        except (httpx.HTTPError, OSError, ValueError) as exc:  # resets, refused connections, broken JSON
            return Outcome(kind, "connection_error", start, self.now(), ttft, repr(exc))
        return Outcome(kind, outcome, start, self.now(), ttft)

    async def worker(self, client: httpx.AsyncClient, seed: int, stop_at: float) -> None:
        rng = random.Random(seed)
        kinds, weights = list(MIX), list(MIX.values())
        while self.now() < stop_at and self.server_alive():
            await self.gate.wait()
            if self.now() >= stop_at:
                break
            self.busy += 1
            try:
                self.outcomes.append(await self.one(client, rng, rng.choices(kinds, weights)[0]))
            finally:
                self.busy -= 1

    async def quiet(self, client: httpx.AsyncClient, pid: int) -> int:
        """Pause the clients, let the server finish what it holds, and return its idle resident memory."""
        self.gate.clear()
        try:
            while self.busy:
                await asyncio.sleep(0.1)
            await wait_idle(client)
            return await idle_rss(pid)
        finally:
            self.gate.set()


# Server state ----------------------------------------------------------------------------------------------------
def vm_rss(pid: int) -> int:
    """Resident memory of process `pid` in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def sample_rss(pid: int, t0: float, samples: list[tuple[float, int, float]], every: float = 2.0) -> None:
    while True:
        with contextlib.suppress(OSError):
            samples.append((time.monotonic() - t0, vm_rss(pid), os.getloadavg()[0]))
        await asyncio.sleep(every)


async def idle_rss(pid: int) -> int:
    """The median of five VmRSS readings a second apart, starting 2 s after the server went idle: measured with no
    request in flight, so a prompt's transient activations do not count as growth."""
    await asyncio.sleep(2.0)
    readings = []
    for _ in range(5):
        readings.append(vm_rss(pid))
        await asyncio.sleep(1.0)
    return int(statistics.median(readings))


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    from llamaforge.serve.metrics import parse

    return parse((await client.get("/metrics")).text)


async def wait_idle(client: httpx.AsyncClient, timeout: float = 60.0) -> dict[str, float]:
    """The engine's gauges once nothing is running (or when `timeout` runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(client)
        held = [m["llamaforge_requests_active"], m["llamaforge_engine_tracked_requests"],
                m["llamaforge_kv_cache_blocks_used"]]  # fmt: skip
        if not any(held) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.5)


# Drain ----------------------------------------------------------------------------------------------------------------
async def drain(client: httpx.AsyncClient, proc: subprocess.Popen, args: argparse.Namespace) -> dict:
    """Fill the server (`--max-batch` + 2 requests: some wait in the queue), SIGTERM it, and check that every
    request completes, that a new one is refused or served, and that the process exits 0."""
    n = args.max_batch + 2
    before = await metrics(client)
    finished_before = sum(v for k, v in before.items() if k.startswith("llamaforge_generations_finished_total"))
    body = {"model": MODEL, "prompt": "The drain test", "max_tokens": args.drain_tokens, "ignore_eos": True}
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": args.drain_tokens, "ignore_eos": True}

    async def request(i: int) -> str:
        try:
            if i % 2:
                await _stream(client, "/v1/chat/completions", chat)
            else:
                await _plain(client, "/v1/completions", body)
        except UnexpectedError as exc:
            return f"{exc.outcome}: {exc.detail}"
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return f"connection_error: {exc!r}"
        return "ok"

    tasks = [asyncio.ensure_future(request(i)) for i in range(n)]
    deadline = time.monotonic() + 120
    while True:  # every request accepted (running, queued or already done) before the signal
        m = await metrics(client)
        finished = sum(v for k, v in m.items() if k.startswith("llamaforge_generations_finished_total"))
        accepted = m["llamaforge_requests_active"] + finished - finished_before
        if accepted >= n or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    in_flight = int(m["llamaforge_requests_active"])
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await asyncio.sleep(0.5)
    try:  # a new connection after the signal: refused, or 503, or (if it slipped in) served in full
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=args.drain_timeout + 30) as late:
            response = await late.post("/v1/completions", json={**body, "max_tokens": 4})
        if response.status_code == 503:
            _check_error_body(response, 503)
            late_outcome = "503"
        else:
            data = _check_ok(response)
            _check_complete(data["choices"][0]["finish_reason"], data["usage"]["completion_tokens"], 4, "late request")
            late_outcome = "served"
    except httpx.ConnectError:
        late_outcome = "refused"
    except UnexpectedError as exc:
        late_outcome = f"{exc.outcome}: {exc.detail}"
    except httpx.HTTPError as exc:
        late_outcome = f"connection_error: {exc!r}"
    results = await asyncio.gather(*tasks)
    drained = time.monotonic() - signalled
    try:
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, args.drain_timeout + 60)
    except subprocess.TimeoutExpired:
        code = None
    lost = [r for r in results if r != "ok"]
    ok = not lost and code == 0 and late_outcome in ("refused", "503", "served")
    return {"requests": n, "in_flight_at_sigterm": in_flight, "completed": results.count("ok"), "lost": lost,
            "late_request": late_outcome, "exit_code": code, "drain_seconds": round(drained, 2), "ok": ok}  # fmt: skip


# Report -------------------------------------------------------------------------------------------------------
def per_minute(outcomes: list[Outcome], samples: list[tuple[float, int, float]], duration: float) -> list[dict]:
    """One row per minute of the soak (a last partial minute joins the one before it)."""
    minutes = max(1, int(duration // 60))
    rows = []
    for minute in range(minutes):
        lo, hi = minute * 60, (minute + 1) * 60 if minute < minutes - 1 else float("inf")
        done = [o for o in outcomes if lo <= o.end < hi]
        ok = [o for o in done if o.outcome == "ok"]
        lat = [o.latency for o in ok]
        ttft = [o.ttft for o in done if o.ttft is not None]
        rss = [s[1] for s in samples if lo <= s[0] < hi]
        load = [s[2] for s in samples if lo <= s[0] < hi]
        counts = Counter(o.outcome for o in done)
        rows.append({
            "minute": minute + 1, "requests": len(done), **{k: counts.get(k, 0) for k in EXPECTED},
            "unexpected": sum(v for k, v in counts.items() if k not in EXPECTED),
            "latency_p50": _pct(lat, 50), "latency_p99": _pct(lat, 99), "ttft_p50": _pct(ttft, 50),
            "ttft_p99": _pct(ttft, 99), "rss_mib": statistics.median(rss) / 2**20 if rss else float("nan"),
            "load1": statistics.mean(load) if load else float("nan"),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    head = ("| min | requests | ok | cancelled mid / early | 4xx as expected | unexpected | latency p50 / p99 (s) | "
            "TTFT p50 / p99 (s) | RSS (MiB) | load |")  # fmt: skip
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['minute']} | {r['requests']} | {r['ok']} | {r['cancelled_mid']} / {r['cancelled_early']} | "
                     f"{r['rejected_as_expected']} | {r['unexpected']} | {r['latency_p50']:.2f} / "
                     f"{r['latency_p99']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['rss_mib']:.1f} | "
                     f"{r['load1']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def server_errors(log: Path) -> list[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if "Traceback" in line or line.startswith(("ERROR", "CRITICAL"))]


async def run(args: argparse.Namespace, model: Path, logs: Path) -> dict:
    from llamaforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    prompt_ids = sorted(set(tokenizer.encode(Path(__file__).read_text(encoding="utf-8"))))  # plain text tokens
    port = _free_port()
    serve_args = argparse.Namespace(quantize="gguf", max_batch=args.max_batch, ctx=args.ctx, threads=args.threads,
                                    llamaforge_args=["--drain-timeout", str(args.drain_timeout)])  # fmt: skip
    log = logs / "server.log"
    print(f"starting llamaforge serve on {model} (log {log}) ...", file=sys.stderr)
    load_before = os.getloadavg()
    with llamaforge_server(model, port, serve_args, log) as proc:
        base = f"http://127.0.0.1:{port}"
        limits = httpx.Limits(max_connections=4 * args.max_batch, max_keepalive_connections=4 * args.max_batch)
        async with httpx.AsyncClient(base_url=base, timeout=args.request_timeout, limits=limits) as client:
            soak = Soak(args, base, prompt_ids)
            soak.server_alive = lambda: proc.poll() is None
            samples: list[tuple[float, int, float]] = []
            sampler = asyncio.ensure_future(sample_rss(proc.pid, soak.t0, samples))
            print(f"soaking for {args.duration:.0f} s with {args.max_batch} clients ...", file=sys.stderr)
            reporter = asyncio.ensure_future(progress(soak, samples, args.duration))
            workers = [
                asyncio.ensure_future(soak.worker(client, args.seed * 1000 + i, args.duration))
                for i in range(args.max_batch)
            ]
            warm = min(args.warmup, args.duration / 3)
            await asyncio.sleep(max(0.0, warm - soak.now()))
            rss_warm = (soak.now(), await soak.quiet(client, proc.pid))
            print(f"  idle RSS after the warm-up: {rss_warm[1] / 2**20:.1f} MiB", file=sys.stderr)
            await asyncio.gather(*workers)
            elapsed = soak.now()
            if proc.poll() is not None:
                counts = dict(Counter(o.outcome for o in soak.outcomes))
                raise RuntimeError(f"the server exited with {proc.returncode} after {elapsed:.0f} s of the soak; "
                                   f"outcomes until then: {counts}; see {log}")  # fmt: skip
            reporter.cancel()
            idle = await wait_idle(client)
            rss_end = (soak.now(), await idle_rss(proc.pid))
            sampler.cancel()
            print("draining with SIGTERM ...", file=sys.stderr)
            drained = await drain(client, proc, args)
    load_after = os.getloadavg()
    rss = (rss_warm, rss_end)
    return summarize(
        args, model, soak, samples, elapsed, idle, rss, drained, server_errors(log), load_before, load_after
    )


async def progress(soak: Soak, samples: list, duration: float) -> None:
    minute = 1
    while True:
        await asyncio.sleep(max(0.0, minute * 60 - soak.now()))
        counts = Counter(o.outcome for o in soak.outcomes)
        rss = samples[-1][1] / 2**20 if samples else float("nan")
        print(f"  {minute:3d} min: {dict(counts)}  RSS {rss:.1f} MiB  load {os.getloadavg()[0]:.2f}", file=sys.stderr)
        minute += 1


def summarize(args, model, soak, samples, elapsed, idle, rss, drained, errors, load_before, load_after) -> dict:
    rows = per_minute(soak.outcomes, samples, elapsed)
    counts = Counter(o.outcome for o in soak.outcomes)
    unexpected = [o for o in soak.outcomes if o.outcome not in EXPECTED]
    (t_warm, rss_first), (_, rss_last) = rss
    growth = (rss_last - rss_first) / rss_first * 100
    warm = t_warm
    window = min(60.0, elapsed / 3)  # under load: the medians of the first and the last minute after the warm-up
    loaded_first = [s[1] for s in samples if warm + 10 <= s[0] < warm + 10 + window]
    loaded_last = [s[1] for s in samples if elapsed - window <= s[0] <= elapsed]
    loaded = [s for s in samples if warm + 10 <= s[0] <= elapsed]
    slope = statistics.linear_regression([s[0] for s in loaded], [s[1] for s in loaded]).slope if len(loaded) > 2 else 0
    after = sorted((o for o in soak.outcomes if o.outcome == "ok" and o.start >= warm), key=lambda o: o.end)
    third = len(after) // 3
    p99_first = _pct([o.latency for o in after[:third]], 99)
    p99_last = _pct([o.latency for o in after[-third:]], 99) if third else float("nan")
    leaked = {k: idle[k] for k in ("llamaforge_requests_active", "llamaforge_engine_tracked_requests",
                                   "llamaforge_kv_cache_blocks_used")}  # fmt: skip
    checks = {
        "no unexpected outcome": not unexpected,
        "engine idle after the soak (no request or cache block held)": not any(leaked.values()),
        "RSS growth < 1%": growth < 1.0,
        "drain on SIGTERM: nothing lost, exit 0": drained["ok"],
        "no traceback in the server log": not errors,
    }
    return {
        "command": "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "model": model.name,
        "duration_s": round(elapsed, 1),
        "clients": args.max_batch,
        "max_batch": args.max_batch,
        "threads": args.threads,
        "ctx": args.ctx,
        "max_tokens": args.max_tokens,
        "warmup_s": warm,
        "window_s": window,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "requests": len(soak.outcomes),
        "outcomes": dict(counts),
        "kinds": dict(Counter(o.kind for o in soak.outcomes)),
        "unexpected": [asdict(o) for o in unexpected[:50]],
        "rss_mib": {
            "after_warmup": rss_first / 2**20,
            "end": rss_last / 2**20,
            "loaded_first_window": statistics.median(loaded_first) / 2**20 if loaded_first else float("nan"),
            "loaded_last_window": statistics.median(loaded_last) / 2**20 if loaded_last else float("nan"),
            "trend_mib_per_hour": slope * 3600 / 2**20,
            "growth_pct": growth,
            "max": max(s[1] for s in samples) / 2**20,
        },
        "latency_p99_s": {
            "first_third": p99_first,
            "last_third": p99_last,
            "ratio": p99_last / p99_first if p99_first else float("nan"),
        },
        "idle_after_soak": leaked,
        "drain": drained,
        "server_log_errors": errors[:20],
        "minutes": rows,
        "checks": checks,
    }


def report(s: dict) -> str:
    rss, p99, d = s["rss_mib"], s["latency_p99_s"], s["drain"]
    lb, la = s["load_avg_before"], s["load_avg_after"]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items()))
    return "\n".join([
        "## Serving: soak",
        "",
        f"`.venv/bin/python benchmarks/bench_soak.py {s['command'].split('bench_soak.py', 1)[1].strip()}`"
        .replace(" `", "`"),
        "",
        f"Commit {s['commit']}. Model {s['model']} (llamaforge serve, --quantize gguf, --threads {s['threads']}, "
        f"--max-batch {s['max_batch']}, context {s['ctx']}); {s['clients']} closed-loop clients for "
        f"{s['duration_s']:.0f} s with the mix of the script's docstring (1-{s['max_tokens']} tokens, ignore_eos). "
        f"Machine: {s['machine']}; load average (1/5/15 min) {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} before, "
        f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} after. Latency is end to end for completed requests; TTFT for "
        "streams; RSS is the server's VmRSS (median of the minute's 2 s samples).",
        "",
        table(s["minutes"]),
        "",
        f"- {s['requests']} requests: {outcomes}.",
        f"- RSS with the server idle: {rss['after_warmup']:.1f} MiB after the {s['warmup_s']:.0f} s warm-up, "
        f"{rss['end']:.1f} MiB at the end: {rss['growth_pct']:+.2f}%. Under load: median "
        f"{rss['loaded_first_window']:.1f} MiB in the first {s['window_s']:.0f} s after the warm-up, "
        f"{rss['loaded_last_window']:.1f} MiB in the last; "
        f"least-squares trend {rss['trend_mib_per_hour']:+.1f} MiB/hour; max {rss['max']:.1f} MiB.",
        f"- p99 latency {p99['first_third']:.2f} s in the first third after the warm-up, {p99['last_third']:.2f} s "
        f"in the last ({p99['ratio']:.2f}x).",
        f"- Drain: {d['requests']} requests sent ({d['in_flight_at_sigterm']} in the engine at SIGTERM), "
        f"{d['completed']} completed, lost {len(d['lost'])}; a request after the signal: {d['late_request']}; "
        f"exit code {d['exit_code']} after {d['drain_seconds']:.1f} s.",
        *[f"- {name}: {'met' if ok else 'NOT met'}." for name, ok in s["checks"].items()],
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="GGUF file (default: the 1B-shape Q4_K_M of model_files.py)")
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of mixed traffic (default 1800)")
    p.add_argument("--warmup", type=float, default=120.0, help="seconds before the memory baseline (default 120)")
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch, and the number of clients")
    p.add_argument("--ctx", type=int, default=512, help="the server's --max-seq-len (default 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a request (default 32)")
    p.add_argument("--drain-tokens", type=int, default=24, help="tokens of each request in flight at SIGTERM")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="the server's --drain-timeout")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="where to write the JSON (default: the run's log folder)")
    p.add_argument("--write", action="store_true", help="put the '## Serving: soak' section into RESULTS.md")
    args = p.parse_args(argv)
    if args.duration < 60:
        p.error("--duration must be at least 60 s (per-minute figures)")
    model = args.model or model_path("1b", "q4_k_m")
    if args.model is None and not model.exists():
        ensure_models(["1b"], ["q4_k_m"], threads=args.threads)
    logs = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    summary = asyncio.run(run(args, model, logs))
    text = report(summary)
    print(text)
    out = args.json or logs / "soak.json"
    out.write_text(json.dumps(summary, indent=1, default=float))
    print(f"JSON: {out}; server log: {logs / 'server.log'}", file=sys.stderr)
    for o in summary["unexpected"][:10]:
        print(f"  unexpected: {o['kind']} {o['outcome']} at {o['end']:.1f} s: {o['detail']}", file=sys.stderr)
    if args.write:
        replace_section(text)
        print(f"wrote the soak section of {RESULTS}", file=sys.stderr)
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
