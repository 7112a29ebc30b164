"""GGUF checkpoints: llama.cpp's single-file format, read memory-mapped and written with ``gguf.GGUFWriter``.

Format interface (see ``llamaforge.checkpoint``): ``detect``, ``read_config``, ``read_tensors``, ``write``.
A GGUF checkpoint is a ``.gguf`` file, or a directory holding exactly one.

Reading parses the header (metadata and tensor table) with a small validating parser of its own rather
than ``gguf.GGUFReader``: that reader builds a numpy view per array element (about 5 s for SmolLM2's
100k-entry vocabulary) and raises bare ``ValueError``/``IndexError`` on damaged files. Every count,
length, offset and size is checked against the file before anything is read, and each problem raises
``CheckpointError`` naming the file and the key or tensor. Tensor data is memory-mapped (copy-on-write).

Extra entry points, for other parts of llamaforge:

- ``read_metadata(path) -> dict[str, Any]``: every metadata key as a Python value (str, int, float, bool
  or list), without touching tensor data; the tokenizer reads ``tokenizer.ggml.*`` from it. Float32
  scalars come back as their shortest decimal (``1e-05``, not ``9.999999747378752e-06``).
- ``read_raw(path) -> dict[str, GGUFTensor]``: every model tensor under its llamaforge name, still in
  its GGUF encoding: ``qtype`` (``gguf.GGMLQuantizationType``), ``shape`` (torch order, ``[out, in]``
  for matrices) and ``data``, a memory-mapped uint8 tensor ``[*shape[:-1], bytes_per_row]`` whose rows
  are ggml blocks (layouts in ``llamaforge.gguf_quants``). ``GGUFTensor.dequantize()`` gives float32.
  This is what a runtime that keeps Q8_0/Q4_0/Q4_1/Q4_K weights quantized starts from.
- ``write(..., dtype=...)``: ``None`` keeps each tensor's float dtype; ``torch.float32``/``float16``/
  ``bfloat16`` or ``"f32"``, ``"f16"``, ``"bf16"`` converts every weight matrix; a llama.cpp quantization
  mix (``"q4_k_m"``, ``"q8_0"``, ... in ``llamaforge.gguf_mixes.MIXES``) quantizes each matrix to the type
  llama.cpp's quantizer would choose for it, with the same blocks it would write, and records the mix as
  ``general.file_type``. Norms (and the RoPE factors) always stay F32, as llama.cpp expects.

Architectures: ``llama`` (dense models) and ``llama4`` (Llama 4's text model, as llama.cpp's
``convert_hf_to_gguf.py`` writes it): the router ``ffn_gate_inp``, the experts stacked per layer as
``ffn_gate_exps`` / ``ffn_up_exps`` [E, hidden, dim] and ``ffn_down_exps`` [E, dim, hidden] (each expert's matrix
in linear-layer orientation, so its rows are blocks as in any matrix; llamaforge's model keeps Meta's transposed
layout, and ``read_tensors`` / ``write`` transpose), the shared expert ``ffn_{gate,up,down}_shexp``; metadata
``expert_count``, ``expert_used_count``, ``expert_feed_forward_length``, ``interleave_moe_layer_step`` and
``attention.sliding_window`` (the chunk size of local attention, 0 for none). llama.cpp fixes the rest for every
Llama 4 (NoPE on every 4th layer, temperature tuning with floor 8192 and scale 0.1, QK norm unless the model has
128 experts); llamaforge reads those defaults and writes its model's own values beside them so that any Llama 4
shape round-trips: ``llama4.no_rope_layer_step`` (0: RoPE everywhere), ``llama4.attention.temperature_scale`` (0:
no tuning), ``llama4.attention.temperature_length`` (the floor scale) and ``llama4.attention.qk_norm``. Other
architectures are refused with an error naming them. A file written without a tokenizer has no vocabulary, and
llama.cpp needs one to open it.

Layout: GGUF lists dimensions fastest first (``ne``), so a matrix ``[out, in]`` in torch is ``ne = [in,
out]`` with the same bytes; q and k use the adjacent-pair RoPE layout, like Meta's, so nothing is permuted.
Llama 3.1 RoPE scaling is stored, as llama.cpp does, as per-frequency divisors in ``rope_freqs.weight``.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import mmap
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from gguf import GGMLQuantizationType as Q
from torch import Tensor

from ..config import ModelConfig, RopeScaling
from ..errors import CheckpointError
from ..gguf_mixes import MIXES, tensor_type
from ..gguf_quants import BLOCK_SIZES, DEQUANTIZABLE, dequantize, quantize
from . import check_tensors

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
ARCHITECTURE = "llama"
ARCHITECTURES = ("llama", "llama4")

# GGUF tensor names <-> llamaforge names; per-layer entries use the part after "blk.N." / "layers.N.".
_GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "output.weight"}  # fmt: skip
_LAYER_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    # Llama 4's mixture of experts
    "ffn_gate_inp.weight": "feed_forward.router.weight",
    "ffn_gate_exps.weight": "feed_forward.experts.w1",
    "ffn_up_exps.weight": "feed_forward.experts.w3",
    "ffn_down_exps.weight": "feed_forward.experts.w2",
    "ffn_gate_shexp.weight": "feed_forward.shared_expert.w1.weight",
    "ffn_up_shexp.weight": "feed_forward.shared_expert.w3.weight",
    "ffn_down_shexp.weight": "feed_forward.shared_expert.w2.weight",
}
_TO_GGUF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_TO_GGUF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
# Stacked experts: GGUF stores [E, out, in] (each expert as a linear weight), llamaforge Meta's [E, in, out].
EXPERT_TENSORS = ("feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3")
ROPE_FREQS = "rope_freqs.weight"

_FLOAT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
_TORCH_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
_FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16}


def gguf_name(name: str) -> str:
    """The GGUF name of a llamaforge tensor name, e.g. ``layers.3.attention.wq.weight -> blk.3.attn_q.weight``."""
    if name in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _TO_GGUF_LAYER:
        return f"blk.{m.group(1)}.{_TO_GGUF_LAYER[m.group(2)]}"
    raise KeyError(f"tensor {name!r} has no GGUF name")


def llamaforge_name(name: str) -> str | None:
    """The llamaforge name of a GGUF tensor name, or None when llamaforge does not know it."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


# Header parsing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: ``shape`` in torch order, ``offset`` absolute in the file."""

    name: str
    qtype: Q
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]  # by GGUF name, in file order
    alignment: int
    data_offset: int
    file_size: int


class _TruncatedError(Exception):
    pass


_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1), GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2), GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1), GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8), GGUFValueType.FLOAT64: ("<d", 8),
}  # fmt: skip
_NP_TYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}  # fmt: skip


class _Cursor:
    """Reads little-endian GGUF values from a buffer, refusing to run past its end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _TruncatedError(f"{what} at offset {self.pos} needs {n} bytes but the file has {self.size}")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALARS[vtype]
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Keep the bytes recoverable: s.encode("utf-8", "surrogateescape") gives them back.
            return raw.decode("utf-8", "surrogateescape")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype in _SCALARS:
            value = self.scalar(vtype, what)
            return _short_float(value) if vtype == GGUFValueType.FLOAT32 else value
        if vtype == GGUFValueType.ARRAY and depth < 2:
            item = self.u32(what)
            count = self.u64(what)
            if item == GGUFValueType.STRING:
                self.need(8 * count, what)  # every string has at least its 8-byte length
                return [self.string(what) for _ in range(count)]
            if item in _NP_TYPES:
                size = np.dtype(_NP_TYPES[item]).itemsize
                self.need(size * count, what)
                arr = np.frombuffer(self.buf, dtype=_NP_TYPES[item], count=count, offset=self.pos)
                self.pos += size * count
                return arr.tolist()
            if item == GGUFValueType.BOOL:
                self.need(count, what)
                arr = np.frombuffer(self.buf, dtype=np.uint8, count=count, offset=self.pos)
                self.pos += count
                return [bool(x) for x in arr]
            if item == GGUFValueType.ARRAY:
                self.need(12 * count, what)
                return [self.value(GGUFValueType.ARRAY, what, depth + 1) for _ in range(count)]
            raise ValueError(f"{what}: unknown array item type {item}")
        raise ValueError(f"{what}: unknown value type {vtype}")


def _short_float(x: float) -> float:
    """A float32 as the shortest decimal that rounds to it (1e-05 rather than 9.999999747378752e-06)."""
    return float(str(np.float32(x))) if math.isfinite(x) else x


def resolve(path: str | os.PathLike) -> Path:
    """The .gguf file that `path` names: the file itself, or the single .gguf in a directory."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        return path
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if not files:
        raise CheckpointError(f"{path}: directory holds no .gguf file")
    if len(files) > 1:
        names = ", ".join(p.name for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise CheckpointError(f"{path}: directory holds {len(files)} .gguf files ({names}); pass one file")
    return files[0]


def detect(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.is_dir():
        return any(p.suffix.lower() == ".gguf" and p.is_file() for p in path.iterdir())
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate the header of a GGUF file (cached while the file is unchanged)."""
    file = resolve(path)
    st = file.stat()
    return _read_header_cached(str(file.resolve()), st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=4)
def _read_header_cached(path: str, _mtime: int, size: int, _ino: int) -> GGUFHeader:
    file = Path(path)
    if size < 24:
        raise CheckpointError(f"{file}: not a GGUF file (only {size} bytes, shorter than a GGUF header)")
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse_header(file, buf)
        except _TruncatedError as exc:
            raise CheckpointError(f"{file}: truncated or corrupt GGUF file: {exc}") from None
        except ValueError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file}: corrupt GGUF file: {exc}") from None


def _parse_header(file: Path, buf: mmap.mmap) -> GGUFHeader:
    cur = _Cursor(buf)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{file}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise CheckpointError(f"{file}: big-endian GGUF files are not supported")
        raise CheckpointError(f"{file}: GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    remaining = cur.size - cur.pos
    # Each metadata entry takes at least 13 bytes (key length, type, 1-byte value), each tensor entry 32.
    if n_kv * 13 > remaining:
        raise CheckpointError(
            f"{file}: truncated or corrupt GGUF file: {n_kv} metadata entries cannot fit in {cur.size} bytes"
        )
    if n_tensors * 32 > remaining:
        raise CheckpointError(
            f"{file}: truncated or corrupt GGUF file: {n_tensors} tensors cannot fit in {cur.size} bytes"
        )

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of metadata key {key!r}")
        if key in metadata:
            raise CheckpointError(f"{file}: metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, f"metadata key {key!r}")

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{file}: general.alignment must be a power of two, got {alignment!r}")

    raw: list[tuple[str, Q, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{file}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        ne = [cur.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        type_id = cur.u32(f"type of tensor {name!r}")
        rel_offset = cur.u64(f"offset of tensor {name!r}")
        try:
            qtype = Q(type_id)
        except ValueError:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown ggml type id {type_id}") from None
        n_elements = math.prod(ne)
        if min(ne) == 0 or n_elements > 1 << 48:
            raise CheckpointError(f"{file}: tensor {name!r} has absurd dimensions {ne}")
        block, type_size = BLOCK_SIZES[qtype]
        if ne[0] % block:
            raise CheckpointError(
                f"{file}: tensor {name!r} ({qtype.name}) has rows of {ne[0]} values, not a multiple of {block}"
            )
        raw.append((name, qtype, tuple(reversed(ne)), rel_offset, n_elements // block * type_size))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, qtype, shape, rel_offset, nbytes in raw:
        if name in tensors:
            raise CheckpointError(f"{file}: tensor {name!r} appears twice")
        if rel_offset % alignment:
            raise CheckpointError(f"{file}: tensor {name!r} offset {rel_offset} is not aligned to {alignment} bytes")
        start = data_offset + rel_offset
        if start + nbytes > cur.size:
            raise CheckpointError(
                f"{file}: tensor {name!r} data (bytes {start}..{start + nbytes}) extends past the end of the file "
                f"({cur.size} bytes); the file is truncated or its tensor table is corrupt"
            )
        tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in itertools.pairwise(by_offset):
        if a.offset + a.nbytes > b.offset:
            raise CheckpointError(f"{file}: tensors {a.name!r} and {b.name!r} overlap in the file")
    return GGUFHeader(file, version, metadata, tensors, alignment, data_offset, cur.size)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata of a GGUF file as Python values (tensor data is not read)."""
    return dict(read_header(path).metadata)


# Config -----------------------------------------------------------------------------------------
def _get(file: Path, md: dict[str, Any], key: str, kind: type, default: Any = ..., positive: bool = True) -> Any:
    if key not in md:
        if default is ...:
            raise CheckpointError(f"{file}: missing metadata key {key!r}")
        return default
    value = md[key]
    if isinstance(value, list) and value and all(v == value[0] for v in value):
        value = value[0]  # a per-layer list with one value throughout
    numeric = (int, float) if kind is float else kind
    if not isinstance(value, numeric) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(f"{file}: metadata key {key!r} should be {kind.__name__}, got {value!r}")
    if positive and kind in (int, float) and not value > 0:
        raise CheckpointError(f"{file}: metadata key {key!r} must be positive, got {value!r}")
    return kind(value)


def read_config(path: str | os.PathLike) -> ModelConfig:
    header = read_header(path)
    file, md = header.path, header.metadata
    if md.get("split.count", 1) not in (0, 1):
        raise CheckpointError(
            f"{file}: split GGUF ({md['split.count']} parts) is not supported; merge the parts first "
            "(llama-gguf-split --merge)"
        )
    arch = _get(file, md, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} is not supported (llamaforge reads "
                              f"{', '.join(repr(a) for a in ARCHITECTURES)})")  # fmt: skip
    a = arch
    dim = _get(file, md, f"{a}.embedding_length", int)
    n_heads = _get(file, md, f"{a}.attention.head_count", int)
    n_kv_heads = _get(file, md, f"{a}.attention.head_count_kv", int, n_heads)
    head_dim = _get(file, md, f"{a}.attention.key_length", int, dim // n_heads)
    value_dim = _get(file, md, f"{a}.attention.value_length", int, head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"{file}: key_length {head_dim} != value_length {value_dim} is not supported")
    rot = _get(file, md, f"{a}.rope.dimension_count", int, head_dim)
    if rot != head_dim:
        raise CheckpointError(
            f"{file}: partial rotary embeddings (rope.dimension_count {rot} < head size {head_dim}) are not supported"
        )
    theta = _get(file, md, f"{a}.rope.freq_base", float, 10000.0)
    vocab = md.get(f"{a}.vocab_size")
    if vocab is None:
        embd = header.tensors.get("token_embd.weight")
        vocab = embd.shape[0] if embd is not None else len(md.get("tokenizer.ggml.tokens", []))
    else:
        vocab = _get(file, md, f"{a}.vocab_size", int)
    if not vocab:
        raise CheckpointError(f"{file}: missing metadata key '{a}.vocab_size' (and no token_embd.weight or tokens)")
    try:
        config = ModelConfig(
            dim=dim,
            n_layers=_get(file, md, f"{a}.block_count", int),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads if n_kv_heads != n_heads else None,
            head_dim=head_dim if head_dim != dim // n_heads or dim % n_heads else None,
            hidden_dim=_get(file, md, f"{a}.feed_forward_length", int),
            vocab_size=vocab,
            norm_eps=_get(file, md, f"{a}.attention.layer_norm_rms_epsilon", float),
            rope_theta=theta,
            max_seq_len=_get(file, md, f"{a}.context_length", int),
            tie_embeddings="output.weight" not in header.tensors,
            name=md.get("general.name", "") if isinstance(md.get("general.name"), str) else "",
        )
        if arch == "llama4":
            config = _llama4_config(file, md, config)
    except CheckpointError:
        raise
    except ValueError as exc:  # ModelConfig's own checks
        raise CheckpointError(f"{file}: inconsistent model metadata: {exc}") from None
    return config.replace(rope_scaling=_read_rope_scaling(header, config))


def _llama4_config(file: Path, md: dict[str, Any], config: ModelConfig) -> ModelConfig:
    """The Llama 4 fields of a ``llama4`` file: llama.cpp's keys, then llamaforge's (see the module docstring)."""
    a = "llama4"
    experts = _get(file, md, f"{a}.expert_count", int, 0, positive=False)
    window = _get(file, md, f"{a}.attention.sliding_window", int, 8192, positive=False)
    nope = _get(file, md, f"{a}.no_rope_layer_step", int, 4, positive=False)
    scale = _get(file, md, f"{a}.attention.temperature_scale", float, 0.1, positive=False)
    return config.replace(
        n_experts=experts,
        n_experts_per_token=_get(file, md, f"{a}.expert_used_count", int, 1) if experts else 1,
        moe_every=_get(file, md, f"{a}.interleave_moe_layer_step", int, 1) if experts else 1,
        moe_hidden_dim=_get(file, md, f"{a}.expert_feed_forward_length", int) if experts else None,
        use_qk_norm=_get(file, md, f"{a}.attention.qk_norm", bool, experts != 128),
        nope_layer_interval=nope or None,
        attn_temperature_tuning=scale != 0,
        attn_scale=scale if scale != 0 else 0.1,
        attn_floor_scale=_get(file, md, f"{a}.attention.temperature_length", float, 8192.0),
        attention_chunk_size=window or None,
    )


def _read_rope_scaling(header: GGUFHeader, config: ModelConfig) -> RopeScaling | None:
    file, md = header.path, header.metadata
    a = md.get("general.architecture", ARCHITECTURE)
    kind = md.get(f"{a}.rope.scaling.type", "none")
    factor = md.get(f"{a}.rope.scaling.factor", md.get(f"{a}.rope.scale_linear", 1.0))
    if kind not in ("none", "linear") or (kind == "linear" and factor != 1.0):
        raise CheckpointError(
            f"{file}: RoPE scaling type {kind!r} (factor {factor}) is not supported; llamaforge implements the "
            "Llama 3.1 scaling stored in rope_freqs.weight"
        )
    info = header.tensors.get(ROPE_FREQS)
    if info is None:
        return None
    n = config.dim_per_head // 2
    if info.qtype != Q.F32 or info.shape != (n,):
        raise CheckpointError(f"{file}: {ROPE_FREQS} should be F32 of shape ({n},), got {info.qtype.name} {info.shape}")
    with open(file, "rb") as f:
        f.seek(info.offset)
        factors = np.frombuffer(f.read(info.nbytes), dtype="<f4").astype(np.float64)
    orig = md.get(f"{a}.rope.scaling.original_context_length", 8192)
    return rope_scaling_from_factors(factors, config.rope_theta, config.dim_per_head, orig, file)


def rope_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for Llama 3.1 scaling: the divisor of each pair's frequency."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    with np.errstate(divide="ignore", invalid="ignore"):  # Llama 4 Scout: low == high, no band between
        smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        band = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, scaling.factor, band))


def rope_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int, orig_ctx: int,
                              file: Path | str = "") -> RopeScaling | None:  # fmt: skip
    """Recover the Llama 3.1 RopeScaling that produced `factors` (only the ratios to `orig_ctx` matter)."""
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = _short_float(float(factors.max()))
    candidates = [(1.0, 4.0), (1.0, 1.0)]  # Llama 3.1's factors; Llama 4 Scout's (a step, no band)
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    if band.sum() >= 2 and factor > 1:
        # Inside the band 1/f = (1 - s)/factor + s with s = orig/(high-low) / wavelen - low/(high-low).
        s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[band], s, 1)
        width = orig_ctx / slope
        low = -intercept * width
        candidates.append((round(low, 4), round(low + width, 4)))
    for low, high in candidates:
        if not 0 < low <= high:
            continue
        scaling = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_seq_len=orig_ctx)
        if np.allclose(rope_factors(scaling, theta, head_dim), factors, rtol=1e-4, atol=0):
            return scaling
    raise CheckpointError(
        f"{file}: {ROPE_FREQS} holds per-frequency factors that do not follow Llama 3.1 RoPE scaling "
        f"(min {factors.min():g}, max {factors.max():g})"
    )


# Tensors ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFTensor:
    """A tensor as stored: ``data`` is uint8 ``[*shape[:-1], bytes_per_row]`` of ggml blocks (memory-mapped)."""

    name: str  # llamaforge name
    gguf_name: str
    qtype: Q
    shape: tuple[int, ...]  # torch order: [out, in] for matrices
    data: Tensor

    @property
    def block_size(self) -> int:
        return BLOCK_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return BLOCK_SIZES[self.qtype][1]

    def dequantize(self) -> Tensor:
        """float32 tensor of ``shape``."""
        if self.qtype not in DEQUANTIZABLE:
            raise CheckpointError(f"tensor {self.gguf_name!r} has type {self.qtype.name}, which llamaforge cannot read")
        return dequantize(self.data, self.qtype, self.shape)


def _open_data(header: GGUFHeader) -> np.memmap:
    # Copy-on-write: tensors handed out are writable (torch wants that) without touching the file.
    return np.memmap(header.path, dtype=np.uint8, mode="c")


def _raw_tensor(header: GGUFHeader, data: np.memmap, info: TensorInfo) -> GGUFTensor:
    name = llamaforge_name(info.name)
    if name is None:
        raise CheckpointError(f"{header.path}: unknown tensor {info.name!r} in a llama GGUF file")
    row_bytes = info.shape[-1] // BLOCK_SIZES[info.qtype][0] * BLOCK_SIZES[info.qtype][1]
    raw = torch.from_numpy(data[info.offset : info.offset + info.nbytes]).view(*info.shape[:-1], row_bytes)
    return GGUFTensor(name, info.name, info.qtype, info.shape, raw)


def into_memory(view: Tensor) -> Tensor:
    """A copy of `view` (a tensor of ``read_raw``, mapped from the file) in the process's own memory, and the file's
    pages it was read from unmapped again, so that its bytes are resident once. Only pages wholly inside the view
    are dropped (they stay in the page cache and would be read again if touched)."""
    copy = view.clone()
    _unmap_pages(view.data_ptr(), view.numel() * view.element_size())
    return copy


def _unmap_pages(address: int, nbytes: int) -> None:
    if sys.platform != "linux":
        return
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(4))  # MADV_DONTNEED


def read_raw(path: str | os.PathLike) -> dict[str, GGUFTensor]:
    """Every model tensor under its llamaforge name, in its GGUF encoding (see the module docstring)."""
    header = read_header(path)
    data = _open_data(header)
    return {t.name: t for t in (_raw_tensor(header, data, i) for i in header.tensors.values() if i.name != ROPE_FREQS)}


def _load_dtype(header: GGUFHeader) -> torch.dtype:
    """One dtype for the whole model: the matrices' float type when they share one, otherwise float32."""
    types = {i.qtype for i in header.tensors.values() if len(i.shape) > 1}
    if types == {Q.F16}:
        return torch.float16
    if types == {Q.BF16}:
        return torch.bfloat16
    return torch.float32


def read_tensors(path: str | os.PathLike, config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Tensors under llamaforge names: float ones as memory-mapped views, quantized ones dequantized.

    Quantized files load as float32; F16 (or BF16) files as float16 (bfloat16), norms included.
    """
    header = read_header(path)
    for info in header.tensors.values():
        if info.qtype not in DEQUANTIZABLE:
            supported = ", ".join(sorted(t.name for t in DEQUANTIZABLE))
            raise CheckpointError(
                f"{header.path}: tensor {info.name!r} has type {info.qtype.name}, which llamaforge cannot read "
                f"(supported: {supported})"
            )
    dtype = _load_dtype(header)
    data = _open_data(header)
    for info in header.tensors.values():
        if info.name == ROPE_FREQS:  # already folded into config.rope_scaling
            continue
        t = _raw_tensor(header, data, info)
        if info.qtype == Q.F32:
            value = t.data.view(torch.float32)
        elif info.qtype == Q.F16:
            value = t.data.view(torch.float16)
        elif info.qtype == Q.BF16:
            value = t.data.view(torch.bfloat16)
        else:
            value = t.dequantize()
        value = value.reshape(info.shape)
        if t.name.endswith(EXPERT_TENSORS):  # GGUF's [E, out, in] -> Meta's [E, in, out] (a view)
            value = value.transpose(1, 2)
        yield t.name, value.to(dtype)


# Writing ----------------------------------------------------------------------------------------
def write_type(dtype: torch.dtype | str | None) -> Q | str | None:
    """What a ``write(dtype=...)`` argument names: None (keep each tensor's float type), a float GGUF type
    (F32, F16, BF16) for every matrix, or the name of a llama.cpp quantization mix (``"q4_k_m"``, see
    ``llamaforge.gguf_mixes``)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_TYPES:
            raise ValueError(f"GGUF cannot store {dtype}; use float32, float16, bfloat16 or a quantization mix")
        return _TORCH_TYPES[dtype]
    key = str(dtype).lower().replace("float32", "f32").replace("float16", "f16").replace("bfloat16", "bf16")
    if key in _FLOAT_TYPES:
        return _FLOAT_TYPES[key]
    if key in MIXES:
        return key
    raise ValueError(f"unknown GGUF type {dtype!r}; choose one of {', '.join([*_FLOAT_TYPES, *MIXES])}")


def _tensor_type(config: ModelConfig, name: str, tensor: Tensor, kind: Q | str | None) -> Q:
    """The GGUF type a tensor is written as: norms F32; matrices the mix's choice for them, or the float
    type `kind` (default: their own float type)."""
    if tensor.dim() == 1:
        return Q.F32
    if isinstance(kind, str) and name.endswith("router.weight"):
        return Q.F32  # llama.cpp's quantizer never quantizes ffn_gate_inp
    if isinstance(kind, str):
        return tensor_type(config, name, tuple(tensor.shape), kind)
    return kind or _TORCH_TYPES.get(tensor.dtype, Q.F32)


def _encode(tensor: Tensor, kind: Q) -> np.ndarray:
    """The bytes of one tensor in GGUF type `kind`, as a numpy array."""
    t = tensor.detach().cpu()
    if kind == Q.F32:
        return t.float().contiguous().numpy()
    if kind == Q.F16:
        return t.half().contiguous().numpy()
    if kind == Q.BF16:
        return t.bfloat16().contiguous().view(torch.int16).numpy()
    return quantize(t, kind).numpy()


def write(path: str | os.PathLike, config: ModelConfig, tensors: dict[str, Tensor], tokenizer: Any = None,
          dtype: torch.dtype | str | None = None) -> None:  # fmt: skip
    """Write a llama GGUF file that llama.cpp runs: full metadata, the tokenizer's vocabulary when given."""
    from tqdm import tqdm

    from . import atomic_output

    path = Path(path)
    kind = write_type(dtype)
    expected = check_tensors(path, config, tensors)
    order = [n for n in expected if n in tensors] + [n for n in tensors if n not in expected]

    with atomic_output(path, is_dir=False) as tmp:
        w = GGUFWriter(tmp, "llama4" if config.is_llama4 else ARCHITECTURE)
        _add_model_metadata(w, config, kind)
        if tokenizer is not None:
            _add_tokenizer_metadata(w, tokenizer, config.vocab_size)
        # Tensor table first, then the data one tensor at a time: never two copies of the model in memory.
        plan: list[tuple[str, Tensor | np.ndarray, Q]] = []
        if config.rope_scaling is not None:
            freqs = rope_factors(config.rope_scaling, config.rope_theta, config.dim_per_head).astype(np.float32)
            w.add_tensor_info(ROPE_FREQS, freqs.shape, freqs.dtype, freqs.nbytes)
            plan.append((ROPE_FREQS, freqs, Q.F32))
        for name in order:
            t = tensors[name]
            if name.endswith(EXPERT_TENSORS):  # Meta's [E, in, out] -> GGUF's [E, out, in]
                t = t.transpose(1, 2)
            qtype = _tensor_type(config, name, t, kind)
            block, type_size = BLOCK_SIZES[qtype]
            # raw_dtype fixes the type; a non-uint8 tensor_dtype makes GGUFWriter take the shape as given.
            w.add_tensor_info(gguf_name(name), tuple(t.shape), np.dtype(np.float32), t.numel() // block * type_size,
                              raw_dtype=qtype)  # fmt: skip
            plan.append((name, t, qtype))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(t.nbytes for _, t, _ in plan)
            desc = f"quantizing {path.name} ({kind})" if isinstance(kind, str) else f"writing {path.name}"
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
                for _, t, qtype in plan:
                    w.write_tensor_data(t if isinstance(t, np.ndarray) else _encode(t, qtype))
                    bar.update(t.nbytes)
        finally:
            w.close()


def _add_model_metadata(w: GGUFWriter, config: ModelConfig, kind: Q | str | None) -> None:
    w.add_name(config.name or "llamaforge model")
    if isinstance(kind, str):  # as llama_model_quantize writes them
        w.add_file_type(MIXES[kind].file_type)
        w.add_quantization_version(GGML_QUANT_VERSION)
    else:
        w.add_file_type(_FILE_TYPES.get(kind or Q.F32, LlamaFileType.ALL_F32))
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.kv_heads)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.norm_eps))
    w.add_rope_dimension_count(config.dim_per_head)
    w.add_vocab_size(config.vocab_size)
    if config.head_dim is not None:
        w.add_key_length(config.dim_per_head)
        w.add_value_length(config.dim_per_head)
    if config.rope_scaling is not None:
        w.add_rope_scaling_orig_ctx_len(config.rope_scaling.original_max_seq_len)
    if config.is_llama4:
        a = "llama4"
        if config.n_experts:
            w.add_expert_count(config.n_experts)
            w.add_expert_used_count(config.n_experts_per_token)
            w.add_expert_feed_forward_length(config.expert_hidden_dim)
            w.add_interleave_moe_layer_step(config.moe_every)
        w.add_sliding_window(config.attention_chunk_size or 0)
        w.add_uint32(f"{a}.no_rope_layer_step", config.nope_layer_interval or 0)
        w.add_float32(f"{a}.attention.temperature_scale", config.attn_scale if config.attn_temperature_tuning else 0.0)
        floor = config.attn_floor_scale
        if float(floor).is_integer():
            w.add_uint32(f"{a}.attention.temperature_length", int(floor))
        else:
            w.add_float32(f"{a}.attention.temperature_length", floor)
        w.add_bool(f"{a}.attention.qk_norm", config.use_qk_norm)


# Value types of the standard tokenizer keys; other keys get a type from their Python value.
_TOKENIZER_TYPES = {
    "tokenizer.ggml.scores": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.merges": (GGUFValueType.ARRAY, GGUFValueType.STRING),
}


def _value_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    if key in _TOKENIZER_TYPES:
        return _TOKENIZER_TYPES[key]
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        if key.endswith("_id") or 0 <= value < 2**32:
            return GGUFValueType.UINT32, None
        return GGUFValueType.INT64, None
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, (list, tuple)) and value:
        sub, _ = _value_type("", value[0])
        if sub == GGUFValueType.UINT32:
            sub = GGUFValueType.INT32
        return GGUFValueType.ARRAY, sub
    raise ValueError(f"tokenizer metadata {key!r}: cannot store {type(value).__name__} value in GGUF")


def _add_tokenizer_metadata(w: GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    get = getattr(tokenizer, "gguf_metadata", None)
    try:
        metadata = dict(get()) if get is not None else None
    except NotImplementedError:
        metadata = None
    if metadata is None:
        raise ValueError(f"cannot write the tokenizer ({type(tokenizer).__name__}) to GGUF: it has no gguf_metadata()")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template and "tokenizer.chat_template" not in metadata:
        metadata["tokenizer.chat_template"] = template
    _pad_vocab(metadata, vocab_size)
    for key, value in metadata.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, (list, tuple)) and not value:
            continue  # GGUF arrays cannot be empty
        vtype, sub = _value_type(key, value)
        w.add_key_value(key, list(value) if vtype == GGUFValueType.ARRAY else value, vtype, sub_type=sub)


def _pad_vocab(metadata: dict[str, Any], vocab_size: int) -> None:
    """llama.cpp needs one token per embedding row: pad a short vocabulary as convert_hf_to_gguf.py does."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embedding rows")
    extra = vocab_size - len(tokens)
    if not extra:
        return
    metadata["tokenizer.ggml.tokens"] = list(tokens) + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    if "tokenizer.ggml.scores" in metadata:
        metadata["tokenizer.ggml.scores"] = list(metadata["tokenizer.ggml.scores"]) + [-1000.0] * extra
    if "tokenizer.ggml.token_type" in metadata:
        unused = int(TokenType.UNUSED)
        metadata["tokenizer.ggml.token_type"] = list(metadata["tokenizer.ggml.token_type"]) + [unused] * extra


__all__ = ["GGUFHeader", "GGUFTensor", "TensorInfo", "detect", "gguf_name", "llamaforge_name", "read_config",
           "read_header", "read_metadata", "read_raw", "read_tensors", "rope_factors", "rope_scaling_from_factors",
           "write", "write_type"]  # fmt: skip
