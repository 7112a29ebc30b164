"""Graceful shutdown of a real `llamaforge serve` process (SIGTERM while a stream is running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import API_KEY, MODEL, free_port

openai = pytest.importorskip("openai")


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _prompt_tokens(base: str) -> float:
    """Prompt tokens of the requests the server has accepted so far."""
    from llamaforge.serve.metrics import parse

    metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return parse(metrics).get("llamaforge_prompt_tokens_total", 0)


def test_graceful_shutdown_on_sigterm(tiny_model_dir, tmp_path):
    """A real `llamaforge serve` process: SIGTERM lets the running stream and a non-streaming request in flight
    finish, then the process exits 0."""
    port = free_port()
    env = {**os.environ, "LLAMAFORGE_API_KEY": API_KEY}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llamaforge",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--served-model-name",
            MODEL,
            "--max-seq-len",
            "256",
            "--drain-timeout",
            "60",  # generous: a loaded CI machine once needed more than 20 s for these 200 tokens
            "--log-level",
            "warning",
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(base + "/health").status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait_for(healthy, timeout=120), proc.stdout.read1().decode() if proc.poll() is not None else ""
        client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
        stream = client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        it = iter(stream)
        next(it)
        accepted = _prompt_tokens(base)
        with ThreadPoolExecutor(1) as pool:  # a second request, accepted before the signal (it may be queued)
            waiting = pool.submit(client.completions.create, model=MODEL, prompt="Hello", max_tokens=100,
                                  temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
            assert _wait_for(lambda: _prompt_tokens(base) > accepted, timeout=30)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            rest = list(it)
            answer = waiting.result(timeout=90)
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 100
        finish = rest[-1].choices[0].finish_reason if rest else None
        if finish != "length":  # finished, not cut off; show the server's log and the timing otherwise
            proc.kill()
            log = proc.communicate(timeout=10)[0].decode(errors="replace")[-3000:]
            pytest.fail(f"stream ended with {finish!r} after {len(rest)} chunks, {time.monotonic() - started:.1f} s "
                        f"after SIGTERM; server output:\n{log}")  # fmt: skip
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
