"""Graceful shutdown of a real `llamaforge serve` process (SIGTERM while a stream is running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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


def test_graceful_shutdown_on_sigterm(tiny_model_dir, tmp_path):
    """A real `llamaforge serve` process: SIGTERM lets the running stream finish, then the process exits."""
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
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        rest = list(it)
        finish = rest[-1].choices[0].finish_reason if rest else None
        if finish != "length":  # finished, not cut off; show the server's log and the timing otherwise
            proc.kill()
            log = proc.communicate(timeout=10)[0].decode(errors="replace")[-3000:]
            pytest.fail(f"stream ended with {finish!r} after {len(rest)} chunks, {time.monotonic() - started:.1f} s "
                        f"after SIGTERM; server output:\n{log}")  # fmt: skip
        assert proc.wait(timeout=90) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
