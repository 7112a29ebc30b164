"""Fixtures for the server tests: a tiny random model with a small ChatML tokenizer saved to disk, and a real
uvicorn server on a free loopback port (in a thread of the test process) driven with the `openai` client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

API_KEY = "test-key-123"
MODEL = "tiny-chat"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little model that wanted to talk.",
    '{"name": "llama", "age": 3, "tags": ["a", "b"], "ok": true, "none": null}',
    "Hello, how are you today? I am fine, thank you very much!",
    "numbers: 0 1 2 3 4 5 6 7 8 9 10 42 3.14 -7 1e5",
]


def make_tiny_model_dir(directory: Path, seed: int = 0, vocab_size: int = 384, max_seq_len: int = 512,
                        extra_special: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A random `tiny` llamaforge model in Hugging Face format with a byte-level BPE tokenizer and a ChatML
    chat template (<|im_end|> ends a turn); `extra_special`: more special tokens (e.g. fill-in-the-middle ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llamaforge.checkpoint import save_model
    from llamaforge.config import get_preset
    from llamaforge.model import build_model

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    torch.manual_seed(seed)
    config = get_preset("tiny", vocab_size=tk.get_vocab_size(), max_seq_len=max_seq_len)
    model = build_model(config).eval()
    save_model(model, directory, "hf")
    tk.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("serve") / "tiny-chat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    base_url: str
    app: Any
    server: Any
    api_key: str | None

    def client(self, **kw: Any) -> Any:
        import openai

        kw.setdefault("api_key", self.api_key or "unused")
        kw.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url + "/v1", max_retries=0, **kw)

    def http(self, **kw: Any) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.base_url, headers=headers, **kw)

    def metrics(self) -> dict[str, float]:
        from llamaforge.serve.metrics import parse

        with self.http() as h:
            return parse(h.get("/metrics").text)

    @property
    def state(self) -> Any:
        from llamaforge.serve import server_state

        return server_state(self.app)


@contextlib.contextmanager
def run_server(
    model_dir: Path | None = None,
    llm: Any = None,
    loader: Any = None,
    wait_ready: bool = True,
    port: int | None = None,
    draft: Any = None,
    **config: Any,
) -> Iterator[Running]:
    """Serve on 127.0.0.1 (on `port`, or a free one) from a thread; stop on exit."""
    import uvicorn

    import llamaforge
    from llamaforge.serve import ServerConfig, create_app

    if llm is None and loader is None:
        llm = llamaforge.load(model_dir)
    config.setdefault("model_name", MODEL)
    config.setdefault("max_seq_len", 256)
    app = create_app(ServerConfig(**config), llm=llm, loader=loader, draft=draft)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = Running(f"http://127.0.0.1:{port}", app, server, config.get("api_key"))
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    if wait_ready:
        while not running.state.ready:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not become ready")
            time.sleep(0.02)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Running]:
    with run_server(tiny_model_dir, api_key=API_KEY, max_batch=4, max_queue=16) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Running) -> Any:
    return server.client()
