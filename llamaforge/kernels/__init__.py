"""Native CPU kernels for decoding, built from ``kernels.cpp`` on first use.

Batch-1 decoding reads every weight once per token, so its speed is the speed at which the matrix-vector
products stream weights from memory, plus the cost of the ~20 small ops per layer around them. This
package compiles (once, cached in torch's extension directory) a C++ library registering torch ops
``torch.ops.llamaforge.*``:

- ``linear_float / linear_int8 / linear_int4 / linear_q8_0``: ``y = x @ W.T`` for a few rows of ``x``
  (decode steps, small batches), reading the weights in the formats llamaforge keeps (float32/16-bit,
  ``Int8Linear``, ``Int4Linear``, ``BlockInt8Linear``) and accumulating in float32. 4-bit and Q8_0 weights
  multiply activations rounded to int16 per 32 columns (relative error ~1e-5, vs 4e-3 for the bfloat16
  activations of torch's int4/int8 kernels): integer multiply-adds are twice as fast as float conversion.
- ``rms_norm``, ``silu_mul``, ``decode_attention`` (RoPE + KV-cache write + single-query attention): the
  decode step's small ops fused, with model.py's math (tests compare them with model.py's functions).

The ops are threaded with ``at::parallel_for`` (torch's own thread pool). Being registered torch ops,
``torch.compile`` treats them as opaque calls. If the library cannot be built (no compiler), ``available()``
warns once and returns False, and callers keep torch's kernels; ``LLAMAFORGE_NATIVE=0`` disables it.
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

SOURCE = Path(__file__).with_name("kernels.cpp")
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
    digest = hashlib.sha256((SOURCE.read_text() + " ".join(flags) + _cpu_flags()).encode()).hexdigest()[:12]
    name = f"llamaforge_kernels_{digest}"
    if not any(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
        print("llamaforge: compiling the native CPU kernels (once for this CPU and torch, ~20 s)...",
              file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
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
        warnings.warn(f"llamaforge native kernels unavailable, using torch's ({type(exc).__name__}: {exc})",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return False
    return True


def load_seconds() -> float | None:
    """Seconds the first ``available()`` spent building or loading the library (None before)."""
    value = _state.get("load_s")
    return float(value) if value is not None else None  # type: ignore[arg-type]


def usable(x: Tensor) -> bool:
    """Whether a matmul with input ``x`` should take the native kernels: CPU, at most MAX_ROWS rows."""
    return x.device.type == "cpu" and x.numel() <= MAX_ROWS * x.shape[-1] and available()


# Matmuls: y [..., N] = x [..., K] @ W.T in x's dtype (float32 inside) ----------------------------------------
def linear_float(x: Tensor, weight: Tensor) -> Tensor:
    """``weight``: float32 / float16 / bfloat16 [N, K], contiguous."""
    return torch.ops.llamaforge.linear_float(x, weight)


def linear_int8(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """``w[n] = qweight[n] * scales[n]``: qweight int8 [N, K], scales float32 [N]."""
    return torch.ops.llamaforge.linear_int8(x, qweight, scales)


def int4_scale_bias(scales_and_zeros: Tensor) -> Tensor:
    """``Int4Linear.scales_and_zeros`` [K/g, N, 2] -> the kernel's [N, 2, K/g]: scale and ``zero - 8 scale``,
    so that ``w = q * scale + bias`` (each row's numbers contiguous)."""
    s, z = scales_and_zeros.float().unbind(-1)
    return torch.stack((s.t(), (z - 8.0 * s).t()), dim=1).contiguous()


def linear_int4(x: Tensor, qweight: Tensor, scale_bias: Tensor, group: int) -> Tensor:
    """4-bit groups: qweight uint8 [N, K/2] (``Int4Linear``'s nibble order), scale_bias from ``int4_scale_bias``."""
    return torch.ops.llamaforge.linear_int4(x, qweight, scale_bias, group)


def linear_q8_0(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """``BlockInt8Linear``'s layout with GGUF's block of 32: qweight int8 [K/32, N, 32], scales float32 [K/32, N]."""
    return torch.ops.llamaforge.linear_q8_0(x, qweight, scales)


# Fused decode-step ops (float32 results) -----------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``model.RMSNorm`` in float32."""
    return torch.ops.llamaforge.rms_norm(x, weight, eps)


def silu_mul(g: Tensor) -> Tensor:
    """``silu(g[..., :H]) * g[..., H:]`` for g [..., 2H]: SwiGLU after the fused w1/w3 matmul."""
    return torch.ops.llamaforge.silu_mul(g)


def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor,
                     rows: Tensor, n_heads: int, n_kv_heads: int, cache_len: int) -> Tensor:  # fmt: skip
    """One query per sequence b: RoPE on its q/k heads (qkv [B, (H + 2 Hkv) D], cos/sin [B, D/2]), k and v
    written to ``cache[rows[b], :, positions[b]]``, attention over cache slots ``0..positions[b]`` (within
    the first ``cache_len``). Returns [B, H D] float32."""
    return torch.ops.llamaforge.decode_attention(qkv, cos, sin, k_cache, v_cache, positions, rows, n_heads,
                                                 n_kv_heads, cache_len)  # fmt: skip


def _register_fakes() -> None:
    """Shape-only versions of the ops, so that torch.compile can trace through calls to them."""
    lib = "llamaforge::"

    def rows_out(x: Tensor, n: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], n))

    torch.library.register_fake(lib + "linear_float")(lambda x, w: rows_out(x, w.shape[0]))
    torch.library.register_fake(lib + "linear_int8")(lambda x, q, s: rows_out(x, q.shape[0]))
    torch.library.register_fake(lib + "linear_int4")(lambda x, q, sb, group: rows_out(x, q.shape[0]))
    torch.library.register_fake(lib + "linear_q8_0")(lambda x, q, s: rows_out(x, q.shape[1]))
    torch.library.register_fake(lib + "rms_norm")(lambda x, w, eps: x.new_empty(x.shape, dtype=torch.float32))
    torch.library.register_fake(lib + "silu_mul")(
        lambda g: g.new_empty((*g.shape[:-1], g.shape[-1] // 2), dtype=torch.float32)
    )

    @torch.library.register_fake(lib + "decode_attention")
    def _(qkv, cos, sin, k_cache, v_cache, positions, rows, n_heads, n_kv_heads, cache_len):
        return qkv.new_empty((qkv.shape[0], n_heads * k_cache.shape[-1]), dtype=torch.float32)
