"""Prompt-cache files: a prompt's KV cache saved to disk and loaded back, bit for bit.

``save_prompt_cache(engine, path, tokens)`` writes the keys and values that the engine's cache holds for the
longest prefix of `tokens` made of whole blocks (a prompt's last partial block is recomputed, < 16 tokens);
``load_prompt_cache(engine, path)`` puts them back into the engine's cache as cached prefix blocks, so the next
prompt that starts with those tokens skips computing them (``llamaforge generate --prompt-cache FILE``, the
server's ``/slots`` save and restore).

The file is safetensors (``k`` and ``v``, [n_layers, tokens, n_kv_heads, row] as the cache stores them) with
metadata naming what the keys and values depend on: the model (its config and a fingerprint of its weights),
the tokenizer (a fingerprint of its vocabulary), the cache dtype and the file format version. A file written for
anything else is refused with a ``PromptCacheError`` naming what differs, and so is a corrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .engine import Engine

FORMAT = "llamaforge-prompt-cache"
VERSION = 1
_SAMPLE = 4096  # elements of each weight tensor that go into the model fingerprint


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be used here: foreign (another model, tokenizer, dtype, version) or corrupt."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's config and of a strided sample of every weight (names, dtypes, shapes, values)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary (every piece) and its special ids; "none" without a tokenizer."""
    if tokenizer is None:
        return "none"
    h = hashlib.sha256(f"{tokenizer.vocab_size}:{tokenizer.bos_id}:{tokenizer.eos_id}".encode())
    for i in range(tokenizer.vocab_size):
        try:
            piece = tokenizer.id_to_piece(i)
        except (ValueError, KeyError, IndexError):  # ids some backends leave unassigned
            piece = None
        h.update(f"{i}\0{piece}\0".encode())
    return h.hexdigest()[:32]


def _identity(engine: Engine) -> dict[str, str]:
    fingerprints = engine.fingerprints  # computed once per engine
    if not fingerprints:
        fingerprints["model"] = model_fingerprint(engine.model)
        fingerprints["tokenizer"] = tokenizer_fingerprint(engine.tokenizer)
    return {
        "format": FORMAT,
        "version": str(VERSION),
        "model": fingerprints["model"],
        "model_config": json.dumps(dataclasses.asdict(engine.config), sort_keys=True, default=str),
        "tokenizer": fingerprints["tokenizer"],
        "dtype": engine.cache.cache_type,
    }


def save_prompt_cache(engine: Engine, path: str | os.PathLike, tokens: list[int]) -> int:
    """Write the cached keys and values of `tokens`' longest whole-block prefix to `path`; returns how many tokens
    were saved (0 when none of it is cached: nothing is written then)."""
    n, k, v = engine.cache.export_prefix(tokens)
    if n == 0:
        return 0
    meta = {**_identity(engine), "tokens": json.dumps(list(tokens[:n]))}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"k": k.contiguous().cpu(), "v": v.contiguous().cpu()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never a half-written file under the real name
    return n


def load_prompt_cache(engine: Engine, path: str | os.PathLike) -> list[int]:
    """Check that `path` was written for this engine's model, tokenizer and cache dtype, and put its keys and
    values into the engine's cache as a cached prefix; returns the file's tokens. ``PromptCacheError`` otherwise."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PromptCacheError(f"{path}: not a readable prompt-cache file ({exc})") from None
    _check(path, meta, _identity(engine))
    try:
        tokens = [int(t) for t in json.loads(meta["tokens"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise PromptCacheError(f"{path}: corrupted prompt-cache file (its token list: {exc})") from None
    k, v = tensors.get("k"), tensors.get("v")
    c = engine.cache
    want = (c.n_layers, len(tokens), c.n_kv_heads, c.row_width)
    for name, t in (("k", k), ("v", v)):
        if t is None or tuple(t.shape) != want or t.dtype != c.dtype:
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise PromptCacheError(f"{path}: corrupted prompt-cache file: '{name}' is {got}, expected {want} {c.dtype}")
    if any(not 0 <= t < engine.config.vocab_size for t in tokens):
        raise PromptCacheError(f"{path}: corrupted prompt-cache file: a token id is outside the vocabulary")
    need = c.blocks_for(len(tokens)) + 1
    if c.num_free < need - 1 and c.capacity < engine.cache_limit:
        c.grow(min(c.num_blocks + need, c.blocks_for(engine.cache_limit) + 1))
    c.import_prefix(tokens, k.to(c.device), v.to(c.device))
    return tokens


def _check(path: Path, meta: dict[str, str], here: dict[str, str]) -> None:
    if meta.get("format") != FORMAT:
        raise PromptCacheError(f"{path}: not a llamaforge prompt-cache file (format {meta.get('format')!r})")
    if meta.get("version") != here["version"]:
        raise PromptCacheError(f"{path}: written by prompt-cache format version {meta.get('version')}; this "
                               f"llamaforge reads version {here['version']}")  # fmt: skip
    if meta.get("model") != here["model"]:
        theirs = json.loads(meta.get("model_config") or "{}")
        ours = json.loads(here["model_config"])
        diff = [f"{key} {theirs.get(key)!r} in the file, {ours.get(key)!r} here" for key in sorted(ours)
                if theirs.get(key) != ours.get(key)]  # fmt: skip
        what = "; ".join(diff[:4]) if diff else "the same configuration, different weights"
        raise PromptCacheError(f"{path}: written for another model ({what})")
    if meta.get("tokenizer") != here["tokenizer"]:
        raise PromptCacheError(f"{path}: written with another tokenizer (vocabulary fingerprint "
                               f"{meta.get('tokenizer')}, here {here['tokenizer']})")  # fmt: skip
    if meta.get("dtype") != here["dtype"]:
        raise PromptCacheError(f"{path}: holds a {meta.get('dtype')} KV cache; this engine's cache is "
                               f"{here['dtype']}")  # fmt: skip
