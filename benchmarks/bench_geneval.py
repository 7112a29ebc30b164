"""Generative evaluation throughput: llamaforge's GSM8K run against lm-evaluation-harness's Hugging Face backend,
and the code sandbox's programs per second.

The model is SmolLM2-135M-Instruct (the built-in GGUF, dequantized to float32); lm-eval's ``HFLM`` runs the
same weights written as a Hugging Face checkpoint by llamaforge. The questions are GSM8K-format word
problems built from templates (the real test set is not needed to measure speed; ``--data-dir`` uses it
when available), each with the eight chain-of-thought exemplars before it, answered greedily up to
``--max-new-tokens`` tokens or the "Q:" stop. Every backend gets the same prompts; the table reports
questions and generated tokens per second and how many generations equal HFLM's.

The sandbox row runs HumanEval-format programs (the test fixtures' problems with their reference
solutions, repeated) through ``Sandbox.run_many``.

Results go to stdout and to the "## Generative evaluation throughput" section of benchmarks/RESULTS.md.

    python benchmarks/bench_geneval.py [--items 24] [--batch-size 16] [--max-new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Generative evaluation throughput"
FIXTURES = ROOT / "tests" / "evaluate" / "data"


def synthetic_gsm8k(n: int) -> list[dict]:
    """GSM8K-format records with varied numbers (question, and a solution ending in "#### answer")."""
    names, items = ["Mia", "Tom", "Ana", "Raj", "Lena", "Omar"], ["pencils", "apples", "stamps", "marbles"]
    records = []
    for i in range(n):
        a, b, c = 3 + i % 7, 4 + (i * 5) % 9, 1 + (i * 3) % 11
        who, what = names[i % len(names)], items[i % len(items)]
        question = (f"{who} has {a} boxes with {b} {what} in each box. {who} gives away {c} {what}. "
                    f"How many {what} does {who} have left?")  # fmt: skip
        records.append({"question": question, "answer": f"{a} * {b} = {a * b}, {a * b} - {c} = {a * b - c}.\n"
                                                        f"#### {a * b - c}"})  # fmt: skip
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=24, help="questions (default 24)")
    p.add_argument("--batch-size", type=int, default=16, help="requests decoded together, every backend (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation limit per question (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--programs", type=int, default=60, help="programs for the sandbox row (default 60)")
    p.add_argument("--data-dir", help="use real GSM8K test records from here instead")
    p.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import logging

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import llamaforge
    from llamaforge.checkpoint import save_model
    from llamaforge.evaluate import GENERATIVE_TASKS, Sandbox, evaluate_generative, load_records
    from llamaforge.evaluate.generative import build_prompts
    from llamaforge.evaluate.lm_eval_plugin import LlamaforgeLM
    from llamaforge.hub import builtin_model_path

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    task = GENERATIVE_TASKS["gsm8k"]
    records = load_records(task, "test", args.data_dir)[: args.items] if args.data_dir else synthetic_gsm8k(args.items)
    data = Path(tempfile.mkdtemp(prefix="bench_geneval."))
    (data / "gsm8k").mkdir()
    (data / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts, _ = build_prompts(task, records, 8, [])

    llm = llamaforge.load(builtin_model_path("smollm2-135m-instruct"), dtype=torch.float32)
    save_model(llm.model, data / "hf", "hf", tokenizer=llm.tokenizer)
    hf = HFLM(pretrained=str(data / "hf"), device="cpu", batch_size=args.batch_size, dtype="float32")
    kwargs = {"until": list(task.stop), "max_gen_toks": args.max_new_tokens, "do_sample": False}

    def instances() -> list:
        return [Instance("generate_until", {}, (prompt, dict(kwargs)), i) for i, prompt in enumerate(prompts)]

    rows: list[tuple[str, float, float, list[str]]] = []

    def timed(name: str, fn) -> None:
        # CPU time as well as wall time: on a shared machine, wall time mostly measures the neighbours.
        start, cpu = time.perf_counter(), time.process_time()
        texts = fn()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        rows.append((name, seconds, cpu_seconds, texts))
        print(f"{name}: {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU", file=sys.stderr)

    llm.generate(prompts[0], max_new_tokens=2)  # native kernels built or loaded before any timing
    timed("lm-eval HFLM (transformers), generate_until", lambda: hf.generate_until(instances(), disable_tqdm=True))
    for batch in sorted({1, args.batch_size}):

        def run(b: int = batch) -> list[str]:
            (result,) = evaluate_generative(llm, [task], data_dir=data, max_new_tokens=args.max_new_tokens,
                                            batch_size=b, progress=False)  # fmt: skip
            return [it["generations"][0] for it in result.items]

        timed(f"llamaforge eval --tasks gsm8k, batch {batch}", run)
    plugin = LlamaforgeLM(llm, batch_size=args.batch_size, max_gen_toks=args.max_new_tokens)
    timed("lm-eval --model llamaforge, generate_until", lambda: plugin.generate_until(instances(), disable_tqdm=True))

    encode = llm.tokenizer.encode
    tokens = {name: sum(len(encode(t)) for t in texts) for name, _, _, texts in rows}
    prompt_tokens = sum(len(encode(p)) for p in prompts) / len(prompts)
    base = rows[0][3]
    n = len(prompts)
    header = ("| backend | wall s | questions/s (wall) | generated tokens/s (wall) | speed-up (wall) | CPU s "
              "| speed-up (CPU) | generations equal to HFLM's |")  # fmt: skip
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, wall, cpu, texts in rows:
        same = sum(a == b for a, b in zip(texts, base))
        lines.append(f"| {name} | {wall:.2f} | {n / wall:.2f} | {tokens[name] / wall:.1f} | {rows[0][1] / wall:.2f}x "
                     f"| {cpu:.2f} | {rows[0][2] / cpu:.2f}x | {same}/{n} |")  # fmt: skip

    sandbox_line = _sandbox_row(Sandbox(), args.programs)
    table = "\n".join(lines)
    print(table)
    print(sandbox_line)
    if args.no_results:
        return
    import lm_eval  # noqa: F401 - for its version

    source = "GSM8K test records" if args.data_dir else "template GSM8K-format word problems"
    command = "python benchmarks/bench_geneval.py " + " ".join(sys.argv[1:])
    body = (
        f"{SECTION}\n\nAnswering {n} {source} with the eight chain-of-thought exemplars (prompts of "
        f"{prompt_tokens:.0f} tokens on average), greedy, at most {args.max_new_tokens} new tokens or the "
        f'"Q:" stop, with SmolLM2-135M-Instruct in float32 (the built-in GGUF dequantized; lm-eval\'s HFLM '
        f"loads the same weights from a Hugging Face checkpoint written by llamaforge). Batch size "
        f"{args.batch_size} (HFLM pads its batches; llamaforge batches continuously), {args.threads} torch "
        f"thread(s), lm-eval {_version('lm_eval')}, transformers {_version('transformers')}, torch "
        f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}. The "
        f'"llamaforge eval" rows include building the prompts, tokenizing and scoring. The machine was shared '
        f"with other work, so timings are noisy.\n\n    {command.strip()}\n\n{table}\n\n{sandbox_line}\n"
    )
    from results import replace_section

    replace_section(body, path=RESULTS)


def _sandbox_row(sandbox, count: int) -> str:
    problems = [json.loads(line) for line in (FIXTURES / "humaneval" / "test.jsonl").read_text().splitlines()]
    programs = [f"{p['prompt']}{p['canonical_solution']}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
                for p in problems] * (count // len(problems) + 1)  # fmt: skip
    programs = programs[:count]
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    results = sandbox.run_many(programs, workers=workers)
    seconds = time.perf_counter() - start
    from llamaforge.evaluate.sandbox import describe_isolation

    passed = sum(r.passed for r in results)
    return (f"Sandbox: {count} HumanEval-format programs (reference solutions and their tests) in {seconds:.2f} s "
            f"with {workers} workers: {count / seconds:.1f} programs/s, {passed}/{count} passed; isolation: "
            f"{describe_isolation(sandbox.isolation)}.")  # fmt: skip


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
