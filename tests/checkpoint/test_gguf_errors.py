"""Damaged and unsupported GGUF files fail with a CheckpointError that names the file and the problem."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

import llamaforge
from llamaforge.checkpoint import gguf as G
from llamaforge.checkpoint import load_model, save_model
from llamaforge.config import get_preset
from llamaforge.errors import CheckpointError, UserError
from llamaforge.model import build_model


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    path = save_model(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "gguf")
    return path.read_bytes()


def write_bytes(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def tensor_entry(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of one tensor-table entry: n_dims, dims, type, offset."""
    key = struct.pack("<Q", len(name)) + name.encode()
    start = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, start)
    dims = start + 4
    return {"n_dims": start, "dims": dims, "type": dims + 8 * n_dims, "offset": dims + 8 * n_dims + 4}


def patched(data: bytes, pos: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, value)
    return bytes(out)


def expect_error(path: Path, pattern: str, tensors: bool = False) -> None:
    """read_config (and, with tensors=True, reading the weights) raises CheckpointError naming `path`."""
    with pytest.raises(CheckpointError, match=pattern) as info:
        if tensors:
            list(G.read_tensors(path, G.read_config(path)))
        else:
            G.read_config(path)
    assert str(path) in str(info.value)


def test_good_file_loads(good_bytes, tmp_path) -> None:
    path = write_bytes(tmp_path, good_bytes)
    load_model(path)  # the fixture itself is sound: every failure below comes from the damage


def test_bad_magic(good_bytes, tmp_path) -> None:
    expect_error(write_bytes(tmp_path, b"GGUG" + good_bytes[4:]), r"not a GGUF file \(magic b'GGUG'")


def test_empty_and_tiny_files(tmp_path) -> None:
    expect_error(write_bytes(tmp_path, b""), "not a GGUF file")
    expect_error(write_bytes(tmp_path, b"GGUF\x03\x00\x00\x00"), "not a GGUF file")


def test_unsupported_version(good_bytes, tmp_path) -> None:
    expect_error(write_bytes(tmp_path, patched(good_bytes, 4, "<I", 99)), "GGUF version 99 is not supported")


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.3, 0.7, 0.999])
def test_truncated_file(good_bytes, tmp_path, fraction) -> None:
    cut = max(24, int(len(good_bytes) * fraction))
    expect_error(write_bytes(tmp_path, good_bytes[:cut]), "truncated")


def test_truncated_in_tensor_data_names_the_tensor(good_bytes, tmp_path) -> None:
    path = write_bytes(tmp_path, good_bytes[:-100])
    expect_error(path, r"'output.weight' data .* extends past the end of the file")


def test_absurd_counts(good_bytes, tmp_path) -> None:
    expect_error(write_bytes(tmp_path, patched(good_bytes, 8, "<Q", 1 << 60)), "tensors cannot fit")
    expect_error(write_bytes(tmp_path, patched(good_bytes, 16, "<Q", 1 << 60)), "metadata entries cannot fit")
    # the first key's length
    expect_error(write_bytes(tmp_path, patched(good_bytes, 24, "<Q", 1 << 62)), "truncated or corrupt")


def test_tensor_offset_past_end(good_bytes, tmp_path) -> None:
    pos = tensor_entry(good_bytes, "blk.0.attn_q.weight")["offset"]
    path = write_bytes(tmp_path, patched(good_bytes, pos, "<Q", 1 << 40))
    expect_error(path, r"'blk.0.attn_q.weight' data .* extends past the end of the file")


def test_misaligned_and_overlapping_tensors(good_bytes, tmp_path) -> None:
    entry = tensor_entry(good_bytes, "blk.0.attn_q.weight")
    (offset,) = struct.unpack_from("<Q", good_bytes, entry["offset"])
    expect_error(write_bytes(tmp_path, patched(good_bytes, entry["offset"], "<Q", offset + 4)), "not aligned")
    expect_error(write_bytes(tmp_path, patched(good_bytes, entry["offset"], "<Q", 0)), "overlap")


def test_absurd_dimensions(good_bytes, tmp_path) -> None:
    entry = tensor_entry(good_bytes, "blk.0.attn_q.weight")
    expect_error(write_bytes(tmp_path, patched(good_bytes, entry["n_dims"], "<I", 9)), "has 9 dimensions")
    expect_error(write_bytes(tmp_path, patched(good_bytes, entry["dims"], "<Q", 1 << 50)), "absurd dimensions")
    expect_error(write_bytes(tmp_path, patched(good_bytes, entry["dims"], "<Q", 0)), "absurd dimensions")


def test_unknown_type_id(good_bytes, tmp_path) -> None:
    pos = tensor_entry(good_bytes, "blk.0.attn_q.weight")["type"]
    expect_error(write_bytes(tmp_path, patched(good_bytes, pos, "<I", 999)), "unknown ggml type id 999")


def test_shape_not_matching_blocks(tmp_path) -> None:
    w = GGUFWriter(tmp_path / "rows.gguf", "llama")
    w.add_tensor("x", np.zeros((2, 34), dtype=np.uint8), raw_dtype=Q.Q8_0)  # 2 rows of 32
    _write(w)
    data = (tmp_path / "rows.gguf").read_bytes()
    pos = tensor_entry(data, "x")["dims"]
    expect_error(write_bytes(tmp_path, patched(data, pos, "<Q", 48)), "rows of 48 values, not a multiple of 32")


# Well-formed files that llamaforge cannot use ------------------------------------------------------
def llama_writer(path: Path, skip: str = "", **overrides) -> GGUFWriter:
    """A writer with the tiny preset's llama metadata, minus `skip`, with `overrides` (key -> value)."""
    w = GGUFWriter(path, overrides.pop("arch", "llama"))
    a = w.arch
    keys = {f"{a}.block_count": 1, f"{a}.embedding_length": 64, f"{a}.feed_forward_length": 160,
            f"{a}.attention.head_count": 4, f"{a}.attention.head_count_kv": 2, f"{a}.context_length": 256,
            f"{a}.attention.layer_norm_rms_epsilon": 1e-5, f"{a}.rope.freq_base": 10000.0}  # fmt: skip
    keys.update(overrides)
    for key, value in keys.items():
        if key == skip:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((512, 64), dtype=np.float32))
    return w


def _write(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_metadata_key(tmp_path) -> None:
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.layer_norm_rms_epsilon"):
        path = tmp_path / f"{key}.gguf"
        _write(llama_writer(path, skip=key))
        expect_error(path, f"missing metadata key '{key}'")


def test_wrong_metadata_type(tmp_path) -> None:
    path = tmp_path / "t.gguf"
    _write(llama_writer(path, **{"llama.block_count": "thirty"}))
    expect_error(path, r"'llama.block_count' should be int, got 'thirty'")
    _write(llama_writer(path, **{"llama.attention.head_count": 0}))
    expect_error(path, r"'llama.attention.head_count' must be positive")


def test_inconsistent_metadata(tmp_path) -> None:
    path = tmp_path / "kv.gguf"
    _write(llama_writer(path, **{"llama.attention.head_count_kv": 3}))
    expect_error(path, r"inconsistent model metadata: .*n_kv_heads \(3\) must divide n_heads \(4\)")


def test_unsupported_architecture(tmp_path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write(llama_writer(path, arch="gpt2"))
    expect_error(path, "architecture 'gpt2' is not supported")
    _write(llama_writer(path, arch="qwen2"))
    expect_error(path, "architecture 'qwen2' is not supported .*reads 'llama', 'llama4'")


def test_unsupported_rope_scaling(tmp_path) -> None:
    path = tmp_path / "yarn.gguf"
    _write(llama_writer(path, **{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}))
    expect_error(path, "RoPE scaling type 'yarn'")


def test_split_file(tmp_path) -> None:
    path = tmp_path / "m-00001-of-00002.gguf"
    w = llama_writer(path)
    w.add_uint16("split.count", 2)
    _write(w)
    expect_error(path, "split GGUF")


def test_unsupported_quant_type_is_named(tmp_path) -> None:
    path = tmp_path / "iq.gguf"
    w = llama_writer(path)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 66), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)  # 256 per row
    _write(w)
    expect_error(path, r"'blk.0.attn_q.weight' has type IQ2_XXS, which llamaforge cannot read", tensors=True)


def test_unknown_tensor_name(tmp_path) -> None:
    path = tmp_path / "extra.gguf"
    w = llama_writer(path)
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, dtype=np.float32))
    _write(w)
    with pytest.raises(CheckpointError, match=r"unknown tensor 'blk\.0\.attn_q_norm\.weight'"):
        G.read_raw(path)


def test_load_reports_a_user_error(good_bytes, tmp_path) -> None:
    path = write_bytes(tmp_path, good_bytes[: len(good_bytes) // 2])
    with pytest.raises(UserError, match="truncated"):
        llamaforge.load(path)
