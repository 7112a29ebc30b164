"""Constrained decoding cost: decode speed with and without a JSON schema, and grammar compilation latency.

    .venv/bin/python benchmarks/bench_constrain.py                  # batch 1 and 16, 3 rounds, writes RESULTS.md
    .venv/bin/python benchmarks/bench_constrain.py --batch 16 --rounds 1 --no-results

SmolLM2-135M-Instruct (the built-in GGUF, ``llamaforge.load`` defaults) on the shared generation engine. For
each batch size, B copies of a chat prompt decode N tokens greedily (``ignore_eos``: every row runs all N
steps) without a constraint and with a JSON schema (an order of at least 40 items, so the JSON never closes
within N tokens and every step computes a real mask). Decode tokens/s counts the steps after the prefill;
"mask" is the time spent inside the llguidance processors (mask computation and applying it to the logits),
as a share of the constrained run's decode time. Rounds alternate the two runs; medians are reported.

Compilation: building the vocabulary tables once per tokenizer, compiling a new schema (first request with
that schema), and a later request with the same schema (a copy of the cached matcher): what each adds to the
time to first token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import replace_section

SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 40},
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "gift": {"type": "boolean"},
                },
                "required": ["name", "quantity", "gift"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["customer", "items"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Write a long grocery order for a big party as JSON."}]
HEADER = (
    "| batch | tok/s (wall), no constraint | tok/s (wall), JSON schema | tok per CPU-s, no constraint "
    "| tok per CPU-s, JSON schema | CPU cost of the schema | time in masks |\n|---|---|---|---|---|---|---|"
)


CLOCK = [0.0]  # seconds spent applying grammar masks


def _time_masks() -> None:
    """Time the engine's batched mask application (GrammarProcessor.apply_batch), where all of it happens."""
    from llamaforge.constrain import GrammarProcessor

    inner = GrammarProcessor.apply_batch

    def timed(items, logits):
        t = time.perf_counter()
        out = inner(items, logits)
        CLOCK[0] += time.perf_counter() - t
        return out

    GrammarProcessor.apply_batch = staticmethod(timed)


def decode_run(llm, ids: list[int], batch: int, tokens: int, grammar: str | None) -> tuple[float, float, float]:
    """(decode tokens per wall second, per CPU second of this process, share of the wall time in the masks) for
    `batch` rows decoding `tokens` tokens."""
    from llamaforge.constrain import Constrainer
    from llamaforge.inference import Engine, SamplingParams

    engine = Engine(llm, max_batch=batch, max_seq_len=len(ids) + tokens + 8)
    for _ in range(batch):
        procs = []
        if grammar is not None:
            procs = [Constrainer.for_tokenizer(llm.tokenizer, llm.config.vocab_size).processor(grammar)]
        engine.add(ids, SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True, logits_processors=procs))
    engine.step()  # prefill (and the first token)
    CLOCK[0] = 0.0
    start, cpu = time.perf_counter(), time.process_time()
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = batch * (tokens - 1)
    return n / seconds, n / cpu, CLOCK[0] / seconds


def compile_times(llm) -> dict[str, float]:
    from llamaforge.constrain import Constrainer, grammar_from

    start = time.perf_counter()
    constrainer = Constrainer(llm.tokenizer, llm.config.vocab_size)  # not the shared one: measure it cold
    tables = time.perf_counter() - start
    fresh = dict(SCHEMA, description=f"{time.time()}")  # a schema no cache has seen
    grammar = grammar_from(json_schema=fresh)
    start = time.perf_counter()
    constrainer.processor(grammar)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(20):
        constrainer.processor(grammar)
    cached = (time.perf_counter() - start) / 20
    return {"tables": tables, "first": first, "cached": cached}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-results", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import llamaforge
    from llamaforge.constrain import Constrainer, grammar_from
    from llamaforge.hub import builtin_model_path
    from llamaforge.inference import chat_prompt_ids

    _time_masks()
    llm = llamaforge.load(builtin_model_path())
    ids = chat_prompt_ids(llm.tokenizer, PROMPT)
    grammar = grammar_from(json_schema=SCHEMA)
    Constrainer.for_tokenizer(llm.tokenizer, llm.config.vocab_size).compile(grammar)
    decode_run(llm, ids, 1, 8, grammar)  # warm-up: kernels, caches

    rows = []
    for batch in args.batch:
        runs: dict[str, list[tuple[float, float, float]]] = {"plain": [], "schema": []}
        for _ in range(args.rounds):
            runs["plain"].append(decode_run(llm, ids, batch, args.tokens, None))
            runs["schema"].append(decode_run(llm, ids, batch, args.tokens, grammar))
        (p, pc, _), (c, cc, m) = ([statistics.median(x) for x in zip(*runs[k])] for k in ("plain", "schema"))
        rows.append((batch, p, c, pc, cc, m))
        print(
            f"batch {batch:2d}: {p:7.1f} / {c:7.1f} tok/s plain / with the schema (wall), {pc:7.1f} / {cc:7.1f} "
            f"tok per CPU-second ({(1 - cc / pc) * 100:+.1f}%), masks {m * 100:.1f}% of decode time",
            flush=True,
        )
    times = compile_times(llm)
    load = os.getloadavg()[0]
    print(
        f"vocabulary tables {times['tables'] * 1e3:.0f} ms, new schema {times['first'] * 1e3:.1f} ms, "
        f"cached schema {times['cached'] * 1e3:.2f} ms"
    )

    if not args.no_results:
        command = "python benchmarks/bench_constrain.py " + " ".join(sys.argv[1:])
        table = "\n".join(
            f"| {b} | {p:.1f} | {c:.1f} | {pc:.1f} | {cc:.1f} | {(1 - cc / pc) * 100:+.1f}% | {m * 100:.1f}% |"
            for b, p, c, pc, cc, m in rows
        )
        replace_section(f"""## Constrained decoding (llguidance)

`{command.strip()}`: SmolLM2-135M-Instruct (built-in GGUF, `llamaforge.load` defaults), {args.threads} threads,
{args.tokens} greedy tokens per row, medians of {args.rounds} alternating rounds; a JSON schema of an order with
at least 40 items (the JSON never closes within the run, so every step computes a real mask). Load average
{load:.1f} on {os.cpu_count()} cores when the run ended (a CPU shared with other jobs): wall-clock tokens/s
swing with the other jobs; tokens per CPU-second of this process vary less, and the time spent in the masks is
measured directly (a share of the constrained run's decode wall time).

{HEADER}
{table}

Grammar compilation, added to the first token of a request: the vocabulary tables (once per tokenizer, at the
first constrained request) {times["tables"] * 1e3:.0f} ms; a schema not seen before {times["first"] * 1e3:.1f} ms;
the same schema again (cached, a copy of its matcher) {times["cached"] * 1e3:.2f} ms.
""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
