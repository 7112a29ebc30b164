"""Fuzzing the Hugging Face (config.json + safetensors) and Meta (params.json + .pth) readers: a damaged checkpoint
loads or is refused with a CheckpointError naming the file; a pickle is never run."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import SLOW_EXAMPLES, refuses_cleanly
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.checkpoint import load_model, model_tensors
from llamaforge.config import ModelConfig
from llamaforge.errors import CheckpointError
from llamaforge.model import build_model

CONFIG = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=96, vocab_size=16, max_seq_len=64)
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 96,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
             "tie_word_embeddings": False, "hidden_act": "silu"}  # fmt: skip
META_PARAMS = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 16, "multiple_of": 32,
               "norm_eps": 1e-5, "rope_theta": 10000.0}  # fmt: skip
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}  # fmt: skip
HF_LAYER = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
            "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight"}  # fmt: skip
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X", ""]
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}

torch.manual_seed(0)
TENSORS = {name: t.detach().clone() for name, t in model_tensors(build_model(CONFIG)).items()}


def hf_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{HF_LAYER[rest]}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
RARE = st.integers(0, 9).map(lambda x: x == 9)


def damaged_json(draw: Any, valid: dict[str, Any], rare: Any) -> bytes:
    data = dict(valid)
    for key in list(data):
        if draw(rare):
            del data[key]
        elif draw(rare):
            data[key] = draw(json_values | st.integers(-(2**40), 2**40))
    if draw(rare):
        data[draw(st.text(max_size=10))] = draw(json_values)
    text = json.dumps(data) if not draw(rare) else json.dumps(draw(json_values))
    raw = text.encode()
    if draw(rare):
        raw = raw[: draw(st.integers(0, len(raw)))]
    if draw(rare):
        raw = b"[" * draw(st.integers(1, 100_000))  # deep nesting
    return raw


@st.composite
def hf_checkpoints(draw: Any, damage: bool = True) -> dict[str, bytes]:
    """config.json and model.safetensors of a tiny llama, either possibly damaged (valid with damage=False)."""
    rare = RARE if damage else st.just(False)
    header: dict[str, Any] = {}
    data = b""
    for name, t in TENSORS.items():
        dtype = draw(st.sampled_from(DTYPES)) if draw(rare) else "F32"
        shape = list(t.shape)
        if draw(rare):
            shape = draw(st.lists(st.one_of(st.integers(-2, 70), st.integers(0, 2**64)), max_size=5))
        n = 1
        for d in shape:
            n *= max(d, 0) if isinstance(d, int) else 0
        nbytes = n * SIZES.get(dtype, 4) if n < 1 << 20 else 4
        begin, end = len(data), len(data) + nbytes
        if draw(rare):
            begin, end = draw(st.integers(-1, 2**64)), draw(st.integers(-1, 2**64))
        data += draw(st.binary(min_size=0, max_size=16)).ljust(nbytes, b"\0")[:nbytes]
        header[hf_name(name) if not draw(rare) else draw(st.text(max_size=12))] = {
            "dtype": dtype, "shape": shape, "data_offsets": [begin, end]}  # fmt: skip
    if draw(rare):
        header["__metadata__"] = draw(json_values)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    length = draw(st.integers(0, 2**64 - 1)) if draw(rare) else len(head)
    blob = struct.pack("<Q", length) + head + data
    if draw(rare):
        blob = blob[: draw(st.integers(0, len(blob)))]
    return {"config.json": damaged_json(draw, HF_CONFIG, rare), "model.safetensors": blob}


def fake_pickle(marker: Path) -> bytes:
    """A .pth whose pickle would run a shell command if it were unpickled without weights_only."""

    class Payload:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    buf = io.BytesIO()
    torch.save({"tok_embeddings.weight": Payload()}, buf)
    return buf.getvalue()


def pth_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(TENSORS, buf)
    return buf.getvalue()


PTH = pth_bytes()


@st.composite
def meta_checkpoints(draw: Any, damage: bool = True) -> dict[str, Any]:
    pth: bytes | str = PTH
    kinds = ["valid", "bytes", "truncate", "pickle", "garbage"] if damage else ["valid"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        out = bytearray(PTH)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        pth = bytes(out)
    elif kind == "truncate":
        pth = PTH[: draw(st.integers(0, len(PTH) - 1))]
    elif kind == "pickle":
        pth = "pickle"
    elif kind == "garbage":
        pth = draw(st.binary(max_size=200))
    return {
        "params.json": damaged_json(draw, META_PARAMS, RARE if damage else st.just(False)),
        "consolidated.00.pth": pth,
    }


def write_dir(root: Path, files: dict[str, Any], name: str = "ckpt") -> Path:
    path = root / name
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(fake_pickle(root / "pwned") if data == "pickle" else data)
    return path


def load_dir(path: Path) -> Any:
    model, _ = load_model(path)
    return model


def check_checkpoint(files: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dir(Path(tmp), files)
        model = refuses_cleanly(path, load_dir, (CheckpointError,))
        assert not (Path(tmp) / "pwned").exists(), "a pickle in the checkpoint was run"
        if model is not None:
            logits = model(torch.tensor([[1, 2, 3]]))
            assert logits.shape == (1, 3, model.config.vocab_size)


@settings(max_examples=3)
@given(hf_checkpoints(damage=False), meta_checkpoints(damage=False))
def test_valid_checkpoints_load(tmp_path: Path, hf_files: dict[str, bytes], meta_files: dict[str, Any]) -> None:
    """The generators' undamaged checkpoints load (so the fuzzers start from loadable files)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, fmt = load_model(write_dir(Path(tmp), hf_files, "hf"))
        assert fmt == "hf" and model.config.n_layers == 1
        model, fmt = load_model(write_dir(Path(tmp), meta_files, "meta"))
        assert fmt == "meta" and torch.equal(model.tok_embeddings.weight, TENSORS["tok_embeddings.weight"])


def test_a_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    path = write_dir(tmp_path, {"params.json": json.dumps(META_PARAMS).encode(), "consolidated.00.pth": "pickle"})
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


@given(hf_checkpoints())
def test_fuzz_hf_safetensors(bounded_memory, files: dict[str, bytes]) -> None:
    check_checkpoint(files)


@given(meta_checkpoints())
def test_fuzz_meta(bounded_memory, files: dict[str, Any]) -> None:
    check_checkpoint(files)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES)
@given(hf_checkpoints())
def test_fuzz_hf_safetensors_long(bounded_memory, files: dict[str, bytes]) -> None:
    check_checkpoint(files)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES)
@given(meta_checkpoints())
def test_fuzz_meta_long(bounded_memory, files: dict[str, Any]) -> None:
    check_checkpoint(files)
