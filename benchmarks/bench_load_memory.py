"""Peak memory of ``llamaforge.load`` for each checkpoint format, relative to the model's size.

Builds a random model (about 250M parameters by default), saves it as Hugging Face safetensors (float32
and bfloat16) and as a Meta checkpoint (bfloat16), then loads each in a fresh Python process and
reports the growth of the peak resident set (``VmHWM``, the high-water mark ``ru_maxrss`` reports, without
the parent's peak that ``ru_maxrss`` inherits across fork+exec) over the baseline after ``import torch``:

- after ``load``: the checkpoint is memory-mapped, so pages are only counted once they are read;
- after ``load``, a forward pass and a sum over every weight (which faults in every page): the honest
  figure, target <= ~1.2x. "/ model" divides by the loaded model's size in memory.

Results go to stdout and to the "## Checkpoint loading memory" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_load_memory.py [--dim 1024 --layers 16 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Checkpoint loading memory"

# Runs in a fresh interpreter so that nothing from building the model is counted.
PROBE = """
import contextlib, importlib, json, resource, sys, time
import torch
import llamaforge
torch.set_num_threads(1)
for name in ("llamaforge.checkpoint.hf", "llamaforge.checkpoint.meta", "llamaforge.tokenizer"):
    with contextlib.suppress(ImportError):  # imported now so that only the load itself is measured
        importlib.import_module(name)
with torch.device("meta"):  # first use of the meta device imports torch._dynamo: a fixed cost, not the load's
    llamaforge.Transformer(llamaforge.get_preset("tiny"))
def peak():  # bytes
    # ru_maxrss also counts the parent's peak inherited through fork+exec (Linux keeps it in the signal
    # struct), so read the same high-water mark for this process's own memory from /proc when it exists.
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
with contextlib.suppress(OSError):  # reset the high-water mark to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
base = peak()
start = time.perf_counter()
llm = llamaforge.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else None)
seconds = time.perf_counter() - start
after_load = peak()
with torch.inference_mode():
    llm.model(torch.tensor([[1, 2, 3]]))
    for p in llm.model.parameters():  # a forward pass reads only a few embedding rows: read everything
        p.sum()
after_forward = peak()
size = sum(t.numel() * t.element_size() for t in llamaforge.checkpoint.model_tensors(llm.model).values())
print(json.dumps({"base": base, "load": after_load - base, "forward": after_forward - base, "size": size,
                  "seconds": seconds, "dtype": str(llm.model.tok_embeddings.weight.dtype)}))
"""


def build_checkpoints(root: Path, dim: int, layers: int, vocab: int) -> tuple[list[tuple[str, Path, str | None]], int]:
    import torch

    from llamaforge.checkpoint import save_model
    from llamaforge.config import ModelConfig
    from llamaforge.model import build_model, count_parameters

    config = ModelConfig(dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=max(1, dim // 256),
                         vocab_size=vocab, hidden_dim=int(dim * 2.75) // 64 * 64, max_seq_len=2048,
                         name="bench")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config)
    targets = [("hf float32", root / "hf-f32", "hf", torch.float32),
               ("hf bfloat16", root / "hf-bf16", "hf", torch.bfloat16),
               ("meta bfloat16", root / "meta-bf16", "meta", torch.bfloat16)]  # fmt: skip
    out: list[tuple[str, Path, str | None]] = []
    for label, path, fmt, dtype in targets:
        print(f"writing {label} ...", file=sys.stderr, flush=True)
        save_model(model, path, fmt, dtype=dtype)
        out.append((label, path, None))
    # Loading with a dtype conversion: the model is built in float32 from the bfloat16 files.
    out += [("hf bfloat16 loaded as float32", root / "hf-bf16", "float32"),
            ("meta bfloat16 loaded as float32", root / "meta-bf16", "float32")]  # fmt: skip
    return out, count_parameters(config)


def measure(path: Path, dtype: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", PROBE, str(path), *([dtype] if dtype else [])]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise RuntimeError(f"probe failed for {path}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table(rows: list[dict], params: int) -> str:
    lines = [f"Random model of {params / 1e6:.0f}M parameters; peak RSS growth over the baseline after "
             "`import torch` (peak RSS, `VmHWM`), in a fresh process per row.", "",
             "| checkpoint | size on disk | load time | peak RSS after load | / model "
             "| after reading every weight | / model |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['label']} | {r['disk'] / 2**20:.0f} MiB | {r['seconds']:.2f} s | "
                     f"{r['load'] / 2**20:.0f} MiB | {r['load'] / r['size']:.2f}x | "
                     f"{r['forward'] / 2**20:.0f} MiB | {r['forward'] / r['size']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def update_results(body: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, keeping every other section."""
    from results import replace_section

    replace_section(f"{SECTION}\n\n{body}", path=RESULTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llamaforge-bench-") as tmp:
        checkpoints, params = build_checkpoints(Path(tmp), args.dim, args.layers, args.vocab)
        rows = []
        for label, path, dtype in checkpoints:
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            rows.append({"label": label, "disk": disk_size(path), **measure(path, dtype)})
    body = table(rows, params)
    stamp = time.strftime("%Y-%m-%d")
    body += (f"\n\nMeasured {stamp} on {platform.machine()} Linux, {os.cpu_count()} CPUs, torch CPU, with "
             f"`python benchmarks/bench_load_memory.py --dim {args.dim} --layers {args.layers} "
             f"--vocab {args.vocab}`. Checkpoints are memory-mapped: loading in the stored dtype "
             "makes the file's pages the model's weights (counted once read); a conversion holds at most one "
             "source tensor beside the converted model, its source pages being released tensor by tensor.")  # fmt: skip
    print(body)
    if not args.no_results:
        update_results(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
