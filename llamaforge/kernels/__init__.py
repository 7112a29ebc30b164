"""Native CPU kernels for decoding, built from ``kernels.cpp`` on first use.

Batch-1 decoding reads every weight once per token, so its speed is the speed at which the matrix-vector
products stream weights from memory, plus the cost of the ~20 small ops per layer around them. This
package compiles (once, cached in torch's extension directory) a C++ library registering torch ops
``torch.ops.llamaforge.*``:

- ``linear``: ``y = x @ W.T`` for a few rows of ``x`` (decode steps, small batches), reading the weights
  in the formats llamaforge keeps (float32/16-bit, ``Int8Linear``, ``Int4Linear``, ``BlockInt8Linear``) and
  accumulating in float32. Integer weights multiply activations rounded to int16 per 32 columns (relative
  error ~1e-5, vs 4e-3 for the bfloat16 activations of torch's int4/int8 kernels): integer multiply-adds
  are twice as fast as float conversion.
- ``decode_step``: all layers of a decode step (one token per sequence, or a few when verifying draft tokens)
  in one call, with model.py's math: RMSNorm, the fused projections through ``linear``'s kernels, RoPE +
  write to the paged KV cache + attention through each sequence's block table (split by KV head and context
  slice, so keys and values are read once per KV head), SiLU-gate, residual adds.
  One call per token instead of ~300 small ones, whose Python and dispatch overhead alone would cost a
  third of a 135M-parameter model's step.

The ops are threaded with ``at::parallel_for`` (torch's own thread pool). Being registered torch ops,
``torch.compile`` treats them as opaque calls. If the library cannot be built (no compiler), ``available()``
warns once and returns False (``build_error()`` says why), and callers keep torch's kernels;
``LLAMAFORGE_NATIVE=0`` disables it. Building needs a C++ compiler and ``ninja`` (a dependency); the test
suite fails, rather than skips, when the build fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(n) for n in ("kernels.cpp", "blocks.cpp")]
HEADERS = [Path(__file__).with_name(n) for n in ("blocks.h", "parallel.h")]
MAX_ROWS = 16  # matmuls with up to this many rows of x use the native kernels; more rows: torch's GEMM
_CFLAGS = [
    "-O3",
    "-std=c++20",
    "-fopenmp",
    "-ffp-contract=off",
]  # no implicit FMAs: elementwise math as torch rounds it
_state: dict[str, object] = {}
_lock = threading.Lock()


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native code is only valid on a CPU like the one that built it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _march() -> list[str]:
    return ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else ["-mcpu=native"]


def _build() -> None:
    from torch.utils.cpp_extension import _get_build_directory, load

    flags = _CFLAGS + _march()
    # The sources' location is part of the name: torch's build files record it, so two checkouts of the same
    # sources sharing one build directory would rebuild in turn (and wait on each other's lock).
    text = "".join(str(p.resolve()) + p.read_text() for p in SOURCES + HEADERS)
    digest = hashlib.sha256((text + " ".join(flags) + _cpu_flags()).encode()).hexdigest()[:12]
    name = f"llamaforge_kernels_{digest}"
    if not any(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
        print("llamaforge: compiling the native CPU kernels (once for this CPU and torch, ~20 s)...",
              file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=flags,
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)  # fmt: skip
    _state["load_s"] = time.perf_counter() - t0


def available() -> bool:
    """Whether the native ops are loaded (building them on the first call); False when disabled or failed."""
    if _state.get("off"):
        return False
    ok = _state.get("ok")
    if ok is not None:
        return bool(ok)
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _try_build()
    return bool(_state["ok"])


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block ``available()`` is False, so callers take torch's kernels (tests, A/B timings)."""
    _state["off"] = int(_state.get("off", 0)) + 1  # type: ignore[call-overload]
    try:
        yield
    finally:
        _state["off"] = int(_state["off"]) - 1  # type: ignore[call-overload]


def _try_build() -> bool:
    if os.environ.get("LLAMAFORGE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        _build()
        _register_fakes()
    except Exception as exc:  # no compiler, unsupported platform, ...: torch's kernels still work
        _state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"llamaforge native kernels unavailable, using torch's ({_state['error']})",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return False
    return True


def build_error() -> str | None:
    """Why the last build failed (None when it did not, or was not tried)."""
    error = _state.get("error")
    return None if error is None else str(error)


def load_seconds() -> float | None:
    """Seconds the first ``available()`` spent building or loading the library (None before)."""
    value = _state.get("load_s")
    return float(value) if value is not None else None  # type: ignore[arg-type]


def usable(x: Tensor) -> bool:
    """Whether a matmul with input ``x`` should take the native kernels: CPU, at most MAX_ROWS rows."""
    return x.device.type == "cpu" and x.numel() <= MAX_ROWS * x.shape[-1] and available()


# Ops ------------------------------------------------------------------------------------------------------
def linear(x: Tensor, weight: Tensor, scales: Tensor | None = None) -> Tensor:
    """``y [..., N] = x [..., K] @ W.T`` in x's dtype (float32 inside), for the weight formats the modules keep:

    - float32 / float16 / bfloat16 ``weight`` [N, K], no scales;
    - int8 ``weight`` [N, K] with ``scales`` [N] (``Int8Linear``);
    - 4-bit codes uint8 [N, K/2] (``Int4Linear``'s nibble order) with ``scales`` from ``int4_scale_bias``;
    - GGUF Q8_0 blocks int8 [K/32, N, 32] with ``scales`` [K/32, N] (``BlockInt8Linear``);
    - GGUF blocks of any type ``blocks.cpp`` runs, as stored in the file: uint8 [N, bytes per row] with
      ``scales = gguf_info(ggml_type, K)`` (the activations are rounded to 8 bits per 32 columns, as llama.cpp's
      CPU backend does; see blocks.cpp).
    """
    return torch.ops.llamaforge.linear(x, weight, scales)


def gguf_info(qtype: int, k: int) -> Tensor:
    """The ``scales`` argument that marks ``weight`` as GGUF blocks of ggml type ``qtype`` with ``k`` columns."""
    return torch.tensor([int(qtype), int(k)], dtype=torch.int64)


def gguf_linear_reference(x: Tensor, blocks: Tensor, info: Tensor) -> Tensor:
    """``linear`` for GGUF blocks through the portable scalar code (the vector kernels are tested against it)."""
    return torch.ops.llamaforge.gguf_linear_reference(x, blocks, info)


def int4_scale_bias(scales_and_zeros: Tensor) -> Tensor:
    """``Int4Linear.scales_and_zeros`` [K/g, N, 2] -> the kernel's [N, 2, K/g]: scale and ``zero - 8 scale``,
    so that ``w = q * scale + bias`` (each row's numbers contiguous)."""
    s, z = scales_and_zeros.float().unbind(-1)
    return torch.stack((s.t(), (z - 8.0 * s).t()), dim=1).contiguous()


def decode_step(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, block_table: Tensor,
                params: list[Tensor | None], parts: list[int], k_caches: list[Tensor], v_caches: list[Tensor],
                n_heads: int, n_kv_heads: int, eps: float) -> Tensor:  # fmt: skip
    """All layers for R query rows (a token each): x [R, dim] token embeddings, cos/sin [R, D/2] of each row's
    position ``positions[r]``. The KV caches are block pools [n_blocks, Hkv, block_size, D] per layer; row r's
    key and value go to position ``positions[r]`` of its sequence's blocks ``block_table[r]`` [R, blocks], and
    it attends over positions ``0..positions[r]`` there (rows of one sequence see each other causally).

    ``params`` per layer: the attention_norm and ffn_norm weights, then (weight, scales) as for
    ``linear`` for each part of the qkv, wo, w13 (w1 and w3 rows) and w2 projections, ``parts[4 l + i]``
    parts in projection i of layer l (one, unless a model stores e.g. q, k and v in different formats);
    last, the final norm's weight. Returns the final normalized hidden state [R, dim] in float32."""
    return torch.ops.llamaforge.decode_step(x, cos, sin, positions, block_table, params, parts, k_caches, v_caches,
                                            n_heads, n_kv_heads, eps)  # fmt: skip


def _register_fakes() -> None:
    """Shape-only versions of the ops, so that torch.compile can trace through calls to them."""

    @torch.library.register_fake("llamaforge::linear")
    def _(x, w, scales=None):
        n = w.shape[1] if w.dim() == 3 else w.shape[0]
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("llamaforge::gguf_linear_reference")
    def _(x, w, info):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("llamaforge::decode_step")
    def _(x, cos, sin, positions, block_table, params, parts, k_caches, v_caches, n_heads, n_kv_heads, eps):
        return x.new_empty(x.shape, dtype=torch.float32)
