"""Speculative decoding speed on a summarisation-style prompt (SmolLM2-135M-Instruct, the built-in GGUF).

The prompt is a chat turn holding about --doc-tokens tokens of Python's argparse documentation and a request to
summarise it, quoting the key sentences; greedy decoding of --new-tokens tokens. Rows, in one process each
round (rounds interleaved, medians reported):

- ``plain``: the float32 model (the GGUF dequantized, llamaforge's default load);
- ``ngram``: the same with prompt-lookup speculation (``speculative="ngram"``, no second model);
- ``draft``: the same with a draft model: the same file run in its own 4-bit blocks (``quantize="gguf"``), about
  2.5x faster per token than the float32 target and nearly always agreeing with it.

Every row must produce exactly the plain row's tokens (greedy); the script fails otherwise. A second table gives
the cost of one step of the engine's native step against the number of query rows it verifies (a decode step is
one row; k drafts make k + 1), for the float32 model and its 4-bit blocks: what a draft token must save.

    .venv/bin/python benchmarks/bench_speculative.py --threads 2 --rounds 3 [--write]
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import sys
import time


def document(tokenizer, n_tokens: int) -> str:
    import argparse as ap

    parts = [inspect.getdoc(ap) or ""]
    for name in ("ArgumentParser", "Action", "Namespace", "FileType", "HelpFormatter"):
        parts.append(inspect.getdoc(getattr(ap, name)) or "")
    for name in ("add_argument", "parse_args", "add_subparsers", "add_mutually_exclusive_group", "parse_known_args"):
        parts.append(inspect.getdoc(getattr(ap.ArgumentParser, name)) or "")
    text = "\n\n".join(p for p in parts if p)
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids)


def step_costs(llm, counts: tuple[int, ...] = (1, 2, 4, 6, 9), reps: int = 9) -> dict[int, float]:
    """Seconds of one native step + head for 1, 2, 4 ... query rows of one sequence at 600 tokens of context."""
    import torch

    from llamaforge.inference import PagedKVCache, select_step
    from llamaforge.quantize import kv_cache_dtype

    step = select_step(llm.model)
    cache = PagedKVCache.for_model(llm.model, 1024, dtype=kv_cache_dtype(llm.model))
    seq = cache.sequence(1024)
    times: dict[int, list[float]] = {n: [] for n in counts}
    with torch.inference_mode():
        pos = torch.arange(600)[None]
        step.hidden(torch.randint(0, 1000, (1, 600)), pos, cache.prepare([seq], pos))
        for _ in range(reps):
            for n in counts:  # interleaved: a busy moment hits every row count alike
                pos = torch.arange(600, 600 + n)[None]
                view = cache.prepare([seq], pos)
                t0 = time.perf_counter()
                step.head(step.hidden(torch.randint(0, 1000, (1, n)), pos, view)[0])
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=400)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--num-speculative", type=int, nargs="+", default=[3], help="ngram draft lengths to try")
    p.add_argument("--write", action="store_true", help="write the '## Speculative decoding' section of RESULTS.md")
    args = p.parse_args(argv)

    import torch

    import llamaforge
    from llamaforge.hub import builtin_model_path

    torch.set_num_threads(args.threads)
    path = builtin_model_path("smollm2-135m-instruct")
    target = llamaforge.load(path)
    draft = llamaforge.load(path, quantize="gguf")
    tok = target.tokenizer
    doc = document(tok, args.doc_tokens)
    messages = [{"role": "user", "content": f"{doc}\n\nSummarize the text above in a few sentences, quoting its "
                 "key sentences word for word."}]  # fmt: skip
    prompt = llamaforge.inference.chat_prompt_ids(tok, messages)
    from llamaforge.inference import DraftModel, Engine, PromptLookup, SamplingParams, select_step

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    step = select_step(target.model)  # one step (fused weights) shared by every engine
    speculators = {"plain": None}
    for k in args.num_speculative:
        speculators[f"ngram k={k}"] = PromptLookup(k)
    speculators["draft k=4 (Q4_1 blocks of the same model)"] = DraftModel(draft, 4, vocab_size=target.config.vocab_size)
    engines = {name: Engine(target, max_batch=1, speculator=spec, step=step) for name, spec in speculators.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[int]] = {}
    for engine in engines.values():  # warm-up
        engine.run([engine.add(prompt[:32], params.replace(max_new_tokens=4))])
    for _ in range(args.rounds):
        for name, engine in engines.items():
            engine.cache.clear()  # every row computes the whole prompt
            if isinstance(engine.speculator, DraftModel):
                engine.speculator.cache.clear()
            t0 = time.perf_counter()
            (out,) = engine.run([engine.add(prompt, params)])
            times[name].append(time.perf_counter() - t0)
            tokens[name] = out.token_ids
    accept = {name: f"{e.stats['accepted']}/{e.stats['drafted']}" for name, e in engines.items() if e.speculator}
    rows = engines
    row_costs = {"float32": step_costs(target), "Q4_1 blocks": step_costs(draft)}
    plain = tokens["plain"]
    bad = [name for name, ids in tokens.items() if ids != plain]
    lines = ["| configuration | seconds (prompt + 128 tokens) | tok/s | speed-up | drafts accepted |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    base = statistics.median(times["plain"])
    for name in rows:
        t = statistics.median(times[name])
        lines.append(f"| {name} | {t:.2f} | {args.new_tokens / t:.1f} | {base / t:.2f}x | {accept.get(name, '-')} |")
    table = "\n".join(lines)
    counts = list(next(iter(row_costs.values())))
    cost_lines = ["| weights | " + " | ".join(f"{n} row{'s' if n > 1 else ''} (ms)" for n in counts) + " |",
                  "|---|" + "---:|" * len(counts)]  # fmt: skip
    for name, costs in row_costs.items():
        cost_lines.append(f"| {name} | " + " | ".join(f"{costs[n] * 1e3:.1f}" for n in counts) + " |")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "## Speculative decoding",
        "",
        f"`.venv/bin/python benchmarks/bench_speculative.py {command}`",
        "",
        f"SmolLM2-135M-Instruct float32 (the built-in GGUF dequantized) as the target; a chat prompt of {len(prompt)} "
        f"tokens (argparse documentation + 'summarize, quoting key sentences'); greedy, {args.new_tokens} new "
        f"tokens; {args.threads} threads; medians of {args.rounds} interleaved rounds, prefill included. Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.",
        "",
        table,
        "",
        "- Every row produced exactly the plain row's tokens." if not bad else f"- DIFFERENT TOKENS: {bad}",
        "",
        "One native step (all layers + head) at 600 tokens of context against the query rows it computes (medians):",
        "",
        *cost_lines,
    ])  # fmt: skip
    print(text)
    if args.write:
        from results import replace_section

        replace_section(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
