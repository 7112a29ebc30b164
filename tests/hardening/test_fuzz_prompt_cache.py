"""Fuzzing prompt-cache files (llamaforge/inference/prompt_cache.py): a damaged or foreign file loads or is refused
with a PromptCacheError naming the file, and leaves the engine usable."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import SLOW_EXAMPLES, refuses_cleanly
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from llamaforge.config import get_preset
from llamaforge.inference import Engine, PromptCacheError, SamplingParams, load_prompt_cache, save_prompt_cache
from llamaforge.model import build_model

GREEDY = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
PROMPT = list(range(1, 40))


@pytest.fixture(scope="module")
def engine_and_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, dict[str, str], dict[str, Any]]:
    torch.manual_seed(0)
    engine = Engine(build_model(get_preset("tiny")).eval(), max_batch=1, max_seq_len=128)
    engine.run([engine.add(PROMPT, GREEDY)])
    path = tmp_path_factory.mktemp("cache") / "p.cache"
    assert save_prompt_cache(engine, path, PROMPT) == 32
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    return engine, meta, tensors


json_text = st.one_of(
    st.text(max_size=20),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=8,
    ).map(json.dumps),
    st.integers(1, 50_000).map(lambda n: "[" * n),
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool]


@st.composite
def cache_files(draw: Any, meta: dict[str, str], tensors: dict[str, torch.Tensor], damage: bool = True) -> bytes:
    meta = dict(meta)
    rare = st.integers(0, 7).map(lambda x: x == 7) if damage else st.just(False)
    for key in list(meta):
        if draw(rare):
            del meta[key]
        elif draw(rare):
            meta[key] = draw(json_text)
    if draw(rare):  # tokens of another length or outside the vocabulary
        meta["tokens"] = json.dumps(draw(st.lists(st.integers(-5, 600), max_size=40)))
    out = {}
    for name, t in tensors.items():
        if draw(rare):
            continue
        if draw(rare):
            shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=5))
            t = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
        out[name] = t
    if draw(rare):
        out[draw(st.text(min_size=1, max_size=5))] = torch.zeros(2)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(out, str(Path(tmp) / "x"), metadata=meta)
        data = bytearray((Path(tmp) / "x").read_bytes())
    for _ in range(draw(st.integers(0, 4)) if draw(rare) else 0):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(rare):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def check_cache_file(engine: Engine, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.cache"
        path.write_bytes(data)
        tokens = refuses_cleanly(path, lambda p: load_prompt_cache(engine, p), (PromptCacheError,))
        if tokens is not None:
            assert all(0 <= t < engine.config.vocab_size for t in tokens)
    (out,) = engine.run([engine.add(PROMPT[:20], GREEDY)])  # the engine still works
    assert len(out.token_ids) == 2


def test_valid_file_loads(engine_and_file) -> None:
    engine, meta, tensors = engine_and_file

    @settings(max_examples=3)
    @given(cache_files(meta, tensors, damage=False))
    def valid(data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "ok.cache").write_bytes(data)
            assert load_prompt_cache(engine, Path(tmp) / "ok.cache") == PROMPT[:32]

    valid()


def test_fuzz_prompt_cache(bounded_memory, engine_and_file) -> None:
    engine, meta, tensors = engine_and_file
    given(cache_files(meta, tensors))(lambda data: check_cache_file(engine, data))()


@pytest.mark.slow
def test_fuzz_prompt_cache_long(bounded_memory, engine_and_file) -> None:
    engine, meta, tensors = engine_and_file
    settings(max_examples=SLOW_EXAMPLES)(
        given(cache_files(meta, tensors))(lambda data: check_cache_file(engine, data))
    )()
