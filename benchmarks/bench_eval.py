"""Multiple-choice scoring throughput: llamaforge against lm-evaluation-harness's Hugging Face backend.

The model is SmolLM2-135M-Instruct (the built-in GGUF, dequantized to float32); lm-eval's ``HFLM`` runs the
same weights written as a Hugging Face checkpoint by llamaforge. The task is HellaSwag's format: four
endings per question, built deterministically from a fixed English text (the real validation set is not
needed to measure speed; ``--data-dir`` uses it when available). Every backend scores the same
(context, continuation) pairs, tokenization included; the table reports questions per second and the
largest log-likelihood difference from lm-eval's own numbers.

Results go to stdout and to the "## Evaluation throughput" section of benchmarks/RESULTS.md.

    python benchmarks/bench_eval.py [--items 48] [--batch-size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Evaluation throughput"
TEXT = ROOT / "tests" / "evaluate" / "data" / "ppl_text.txt"


def synthetic_hellaswag(n: int) -> list[dict]:
    """HellaSwag-like records: a sentence and a half and the start of another as context, four endings of similar
    length (the real endings are matched in length adversarially), every context different."""
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", TEXT.read_text()) if len(s.split()) >= 14]
    m = len(sentences)
    records = []
    for i in range(n):
        a, b, c = i % m, (i // m + i + 1) % m, (i + 2) % m
        if c in (a, b):
            c = (c + 1) % m
        ending_of = lambda k: " ".join(sentences[k][3:15])  # twelve words
        endings = [ending_of(c)] + [ending_of((c + d) % m) for d in (3, 5, 7)]
        gold = i % 4
        endings[0], endings[gold] = endings[gold], endings[0]
        ctx_a = " ".join(sentences[a] + sentences[b][:8])
        ctx_b = " ".join(sentences[c][:3]).lower()
        records.append(
            {"activity_label": "Story", "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": str(gold)}
        )
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=48, help="questions to score (default 48)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass, every backend (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--data-dir", help="score real HellaSwag validation records from here instead")
    p.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import logging

    import lm_eval  # noqa: F401
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import llamaforge
    from llamaforge.checkpoint import save_model
    from llamaforge.evaluate.lm_eval_plugin import LlamaforgeLM
    from llamaforge.evaluate.runner import score_items
    from llamaforge.evaluate.scoring import Scorer, encode_pair, prefix_token, text_encoder
    from llamaforge.evaluate.tasks import build_items, get_task, load_records
    from llamaforge.hub import builtin_model_path

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    task = get_task("hellaswag")
    records = load_records(task, "validation", args.data_dir) if args.data_dir else synthetic_hellaswag(args.items)
    items = build_items(task, records[: args.items])
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]

    gguf = builtin_model_path("smollm2-135m-instruct")
    llm = llamaforge.load(gguf, dtype=torch.float32)
    work = Path(tempfile.mkdtemp(prefix="bench_eval."))
    save_model(llm.model, work / "hf", "hf", tokenizer=llm.tokenizer)
    hf = HFLM(pretrained=str(work / "hf"), device="cpu", batch_size=args.batch_size, dtype="float32")

    def instances() -> list:
        return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]

    rows: list[tuple[str, float, float, list[float]]] = []

    def timed(name: str, fn) -> None:
        # CPU time as well as wall time: on a shared machine, wall time mostly measures the neighbours.
        start, cpu = time.perf_counter(), time.process_time()
        lls = fn()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        rows.append((name, seconds, cpu_seconds, lls))
        print(f"{name}: {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU", file=sys.stderr)

    timed("lm-eval HFLM (transformers)", lambda: [ll for ll, _ in hf.loglikelihood(instances(), disable_tqdm=True)])
    encode, empty = text_encoder(llm.tokenizer), prefix_token(llm.tokenizer)
    for reuse in (True, False):
        scorer = Scorer(llm.model, batch_size=args.batch_size, prefix_reuse=reuse, progress=False)
        name = "llamaforge eval, " + ("context once (KV cache)" if reuse else "context+ending per row")
        timed(
            name,
            lambda s=scorer: [ll for r in score_items(s, encode, items, task, empty) for ll in r["loglikelihoods"]],
        )
    plugin = LlamaforgeLM(llm, batch_size=args.batch_size)
    timed("lm-eval --model llamaforge", lambda: [ll for ll, _ in plugin.loglikelihood(instances(), disable_tqdm=True)])

    _, base_wall, base_cpu, base_lls = rows[0]
    n = len(items)
    tok = [encode_pair(encode, c, k) for c, k in pairs]
    ctx_mean, end_mean = sum(len(c) for c, _ in tok[::4]) / n, sum(len(k) for _, k in tok) / len(tok)
    stats = f"contexts of {ctx_mean:.0f} tokens and endings of {end_mean:.0f} tokens on average"
    print(stats)
    header = ("| backend | wall s | questions/s (wall) | speed-up (wall) | CPU s | questions/CPU-s | speed-up (CPU) "
              "| max abs. log-likelihood diff vs HFLM |")  # fmt: skip
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, wall, cpu, lls in rows:
        diff = max(abs(a - b) for a, b in zip(lls, base_lls))
        lines.append(f"| {name} | {wall:.2f} | {n / wall:.2f} | {base_wall / wall:.2f}x | {cpu:.2f} | {n / cpu:.2f} "
                     f"| {base_cpu / cpu:.2f}x | {diff:.1e} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.no_results:
        return
    source = "HellaSwag validation records" if args.data_dir else "synthetic HellaSwag-format questions"
    command = "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])
    body = (
        f"{SECTION}\n\nScoring {n} {source} (4 endings each, {len(pairs)} log-likelihoods, tokenization included; "
        f"{stats}) "
        f"with SmolLM2-135M-Instruct in float32 (the built-in GGUF dequantized; lm-eval's HFLM loads the same "
        f"weights from a Hugging Face checkpoint written by llamaforge). Batch size {args.batch_size}, "
        f"{args.threads} torch thread(s), lm-eval {lm_eval_version()}, transformers {transformers_version()}, "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}. "
        f"The machine was shared with other work, so timings are noisy.\n\n    {command.strip()}\n\n{table}\n"
    )
    from results import replace_section

    replace_section(body, path=RESULTS)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
