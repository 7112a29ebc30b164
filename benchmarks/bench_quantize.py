"""Speed of llamaforge's GGUF quantizers (``gguf_quants.quantize_weights``) against ggml's C reference.

    python benchmarks/bench_quantize.py [--rows 2048] [--cols 4096] [--repeat 3] [--no-results]

Quantizes one bfloat16 matrix (Gaussian, std 0.02, as trained weights) to every block type, with 1 and 2
threads, and times ggml's own quantizer on the same float32 values (``ggml_quantize_chunk`` from
llama-cpp-python's libggml-base, single-threaded: the ``quantize_row_*_ref`` code ``llama-quantize`` runs
without an importance matrix, whose bytes ours match). Rounds alternate between the contenders; each cell is
the best of --repeat. Prints seconds per 100M weights and the projected time to quantize Llama-3.1-8B to
q4_k_m, and writes the "## GGUF quantization speed" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import replace_section

from llamaforge.config import get_preset
from llamaforge.gguf_mixes import tensor_type
from llamaforge.gguf_quants import QUANTIZABLE, quantize_weights

SECTION = "## GGUF quantization speed"


def ggml_quantizer():
    """``(qtype, float32 array [rows, n]) -> seconds`` through ggml_quantize_chunk, or None without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]  # fmt: skip

    def run(qtype, x: np.ndarray) -> tuple[float, float]:
        out = np.empty(x.size * 2, dtype=np.uint8)
        start, cpu = time.perf_counter(), time.process_time()
        fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return time.perf_counter() - start, time.process_time() - cpu

    return run


def ours(qtype, w: torch.Tensor, threads: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds."""
    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    quantize_weights(w, qtype)
    return time.perf_counter() - start, time.process_time() - cpu


def llama_8b_q4_k_m_weights() -> dict:
    """Weights of Llama-3.1-8B per GGUF type in q4_k_m (llamaforge.gguf_mixes.tensor_type)."""
    config = get_preset("llama-3.1-8b")
    d, kv, ffn, vocab = config.dim, config.kv_heads * config.dim_per_head, config.ffn_hidden_dim, config.vocab_size
    shapes = {"tok_embeddings.weight": (vocab, d), "output.weight": (vocab, d)}
    for i in range(config.n_layers):
        for part, shape in [("attention.wq", (d, d)), ("attention.wk", (kv, d)), ("attention.wv", (kv, d)),
                            ("attention.wo", (d, d)), ("feed_forward.w1", (ffn, d)), ("feed_forward.w3", (ffn, d)),
                            ("feed_forward.w2", (d, ffn))]:  # fmt: skip
            shapes[f"layers.{i}.{part}.weight"] = shape
    counts: dict = {}
    for name, shape in shapes.items():
        qtype = tensor_type(config, name, shape, "q4_k_m")
        counts[qtype] = counts.get(qtype, 0) + shape[0] * shape[1]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-results", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    torch.manual_seed(0)
    w = (torch.randn(args.rows, args.cols) * 0.02).bfloat16()
    x = w.float().numpy()
    n = w.numel()
    ggml = ggml_quantizer()
    types = sorted(QUANTIZABLE, key=lambda q: q.name)
    best: dict = {}
    load_before = os.getloadavg()
    for _ in range(args.repeat):
        for qtype in types:
            for who, run in [("ours-1", lambda q: ours(q, w, 1)), ("ours-2", lambda q: ours(q, w, 2)),
                             ("ggml-1", (lambda q: ggml(q, x)) if ggml else None)]:  # fmt: skip
                if run is not None:
                    wall, cpu = run(qtype)
                    best[qtype, who] = min(best.get((qtype, who), float("inf")), wall)
                    best[qtype, who + "-cpu"] = min(best.get((qtype, who + "-cpu"), float("inf")), cpu)
    load_after = os.getloadavg()

    def per_100m(qtype, who) -> str:
        return f"{best[qtype, who] * 1e8 / n:.1f}" if (qtype, who) in best else "n/a"

    rows = ["| type | llamaforge 1 thread: wall | CPU | llamaforge 2 threads: wall | ggml C, 1 thread: wall | CPU | "
            "llamaforge / ggml (CPU) |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for q in types:
        ratio = f"{best[q, 'ours-1-cpu'] / best[q, 'ggml-1-cpu']:.1f}x" if (q, "ggml-1-cpu") in best else "n/a"
        rows.append(f"| {q.name} | {per_100m(q, 'ours-1')} | {per_100m(q, 'ours-1-cpu')} | {per_100m(q, 'ours-2')} | "
                    f"{per_100m(q, 'ggml-1')} | {per_100m(q, 'ggml-1-cpu')} | {ratio} |")  # fmt: skip
    weights = llama_8b_q4_k_m_weights()
    projected = {who: sum(count * best[q, who] / n for q, count in weights.items())
                 for who in ("ours-1", "ours-2", "ours-1-cpu")}  # fmt: skip
    mix = ", ".join(f"{count / 1e9:.2f}B {q.name}" for q, count in sorted(weights.items(), key=lambda kv: -kv[1]))
    text = "\n".join([
        SECTION,
        "",
        f"`python benchmarks/bench_quantize.py --rows {args.rows} --cols {args.cols} --repeat {args.repeat}` on "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, numpy {np.__version__}: one "
        f"{args.rows}x{args.cols} bfloat16 matrix (std 0.02) per type, best of {args.repeat} alternated rounds, "
        f"seconds per 100M weights. Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after: on a shared "
        "machine wall-clock times grow with the load; the process CPU time of the 1-thread runs is what an idle core "
        "would take.",
        "",
        *rows,
        "",
        f"- Llama-3.1-8B to q4_k_m ({mix}): projected {projected['ours-1'] / 60:.1f} min on 1 thread, "
        f"{projected['ours-2'] / 60:.1f} min on 2 threads at this load; {projected['ours-1-cpu'] / 60:.1f} min of "
        "CPU time (one idle core).",
        "- Same bytes as ggml's reference for every type (tests/conformance/test_gguf_kquant_llamacpp.py).",
    ])  # fmt: skip
    print(text)
    if not args.no_results:
        replace_section(text)


if __name__ == "__main__":
    main()
