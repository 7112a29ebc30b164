"""Prompt-cache files (llamaforge/inference/prompt_cache.py): saved and loaded back bit for bit, reused by the next
prompt, and refused with a message naming what differs when written for another model, tokenizer, dtype or
version, or corrupted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llamaforge.config import get_preset
from llamaforge.inference import Engine, PromptCacheError, SamplingParams, load_prompt_cache, save_prompt_cache
from llamaforge.model import build_model

GREEDY = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture
def prompt():
    return torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(3)).tolist()


def _saved(model, prompt, path, **engine_kw) -> tuple[Engine, list[int]]:
    engine = Engine(model, max_batch=1, max_seq_len=256, **engine_kw)
    (out,) = engine.run([engine.add(prompt, GREEDY)])
    assert save_prompt_cache(engine, path, prompt) == 32  # two whole blocks of 16
    return engine, out.token_ids


def test_round_trip_is_bit_exact_and_the_prefix_is_reused(model, prompt, tmp_path):
    path = tmp_path / "p.cache"
    first, tokens = _saved(model, prompt, path)
    fresh = Engine(model, max_batch=1, max_seq_len=256)
    assert load_prompt_cache(fresh, path) == prompt[:32]
    for pool in ("k", "v"):  # the loaded blocks hold exactly what was computed
        want = first.cache.export_prefix(prompt)[1 if pool == "k" else 2]
        got = fresh.cache.export_prefix(prompt)[1 if pool == "k" else 2]
        assert torch.equal(got, want)
    (out,) = fresh.run([fresh.add(prompt, GREEDY)])
    assert out.cached_tokens == 32 and out.token_ids == tokens


def test_foreign_files_are_refused_naming_what_differs(model, prompt, tmp_path):
    path = tmp_path / "p.cache"
    _saved(model, prompt, path)
    other_shape = Engine(_model(n_layers=3), max_batch=1, max_seq_len=256)
    with pytest.raises(PromptCacheError, match=r"another model .*n_layers 2 in the file, 3 here"):
        load_prompt_cache(other_shape, path)
    other_weights = Engine(_model(seed=1), max_batch=1, max_seq_len=256)
    with pytest.raises(PromptCacheError, match="same configuration, different weights"):
        load_prompt_cache(other_weights, path)
    half = Engine(model, max_batch=1, max_seq_len=256, cache_dtype=torch.float16)
    with pytest.raises(PromptCacheError, match="holds a float32 KV cache; this engine's cache is float16"):
        load_prompt_cache(half, path)


def test_another_tokenizer_or_version_is_refused(model, prompt, tmp_path):
    from test_engine import ByteTokenizer

    path = tmp_path / "p.cache"
    _saved(model, prompt, path)
    with pytest.raises(PromptCacheError, match="another tokenizer"):
        load_prompt_cache(Engine(model, max_batch=1, max_seq_len=256, tokenizer=ByteTokenizer()), path)
    tensors, meta = _read(path)
    save_file(tensors, str(path), metadata={**meta, "version": "99"})
    with pytest.raises(PromptCacheError, match="format version 99; this llamaforge reads version 1"):
        load_prompt_cache(Engine(model, max_batch=1, max_seq_len=256), path)


def test_corrupted_files_are_refused(model, prompt, tmp_path):
    path = tmp_path / "p.cache"
    _saved(model, prompt, path)
    tensors, meta = _read(path)
    engine = Engine(model, max_batch=1, max_seq_len=256)
    save_file(tensors, str(path), metadata={**meta, "tokens": json.dumps(prompt[:31])})
    with pytest.raises(PromptCacheError, match="corrupted prompt-cache file: 'k' is"):
        load_prompt_cache(engine, path)
    save_file(tensors, str(path), metadata={**meta, "tokens": "[1, 2"})
    with pytest.raises(PromptCacheError, match="its token list"):
        load_prompt_cache(engine, path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PromptCacheError, match="not a readable prompt-cache file"):
        load_prompt_cache(engine, path)
    assert engine.cache.num_cached == 0  # nothing was imported


def test_nothing_cached_writes_nothing(model, tmp_path):
    engine = Engine(model, max_batch=1, max_seq_len=256)
    assert save_prompt_cache(engine, tmp_path / "none", [1, 2, 3]) == 0
    assert not (tmp_path / "none").exists()


def _read(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
