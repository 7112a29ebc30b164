"""Run multiple-choice tasks on a model: build prompts, score every choice in batches, compute metrics."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from ..llm import LLM
from .report import TaskResult
from .scoring import Scorer, encode_pair, prefix_token, text_encoder
from .tasks import Item, Task, build_items, load_records, unconditional_pairs


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_items(scorer: Scorer, encode: Callable[[str], list[int]], items: Sequence[Item], task: Task,
                empty_context_token: int | None = None, desc: str = "") -> list[dict]:  # fmt: skip
    """Per-item records: log-likelihood of every choice, the predictions and the metrics (0/1)."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        pairs += list(zip(item.contexts, item.continuations))
        if task.unconditional:
            pairs += unconditional_pairs(item)
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for p in pairs:
        if p not in cache:
            cache[p] = encode_pair(encode, p[0], p[1], empty_context_token)
    scores = scorer.score([cache[p] for p in pairs], desc=desc or task.name)
    records, at = [], 0
    for item in items:
        k = len(item.continuations)
        lls = [s.logprob for s in scores[at : at + k]]
        greedy = [s.greedy for s in scores[at : at + k]]
        at += k
        record: dict = {"gold": item.gold, "loglikelihoods": lls, "greedy": greedy}
        if item.group:
            record["group"] = item.group
        preds = {"acc": argmax(lls), "acc_norm": argmax([ll / max(len(c), 1) for ll, c in zip(lls, item.choices)])}
        if task.unconditional:
            uncond = [s.logprob for s in scores[at : at + k]]
            at += k
            record["unconditional"] = uncond
            preds["acc_uncond"] = argmax([a - b for a, b in zip(lls, uncond)])
        for name in task.metrics:
            record[name] = int(preds[name] == item.gold)
        records.append(record)
    return records


def evaluate_tasks(llm: LLM, tasks: Sequence[Task], *, data_dir: str | os.PathLike | None = None,
                   num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 16,
                   prefix_reuse: bool = True, seed: int = 1234, progress: bool = True,
                   max_length: int | None = None) -> list[TaskResult]:  # fmt: skip
    """Score `tasks` on `llm`; ``num_fewshot=None`` uses each task's default (MMLU: 5, others: 0)."""
    tokenizer = llm.require_tokenizer()
    encode = text_encoder(tokenizer)
    empty = prefix_token(tokenizer)
    scorer = Scorer(llm.model, batch_size=batch_size, prefix_reuse=prefix_reuse, progress=progress,
                    max_length=max_length)  # fmt: skip
    results = []
    for task in tasks:
        shots = task.default_fewshot if num_fewshot is None else num_fewshot
        docs = load_records(task, task.eval_split, data_dir)
        if limit is not None:
            docs = docs[:limit]
        pool = load_records(task, task.fewshot_split, data_dir) if shots else None
        items = build_items(task, docs, shots, pool, seed=seed)
        start = time.perf_counter()
        records = score_items(scorer, encode, items, task, empty)
        result = TaskResult(task.name, task.title, task.paper_metric, task.metrics, shots, records,
                            time.perf_counter() - start)  # fmt: skip
        results.append(result)
    return results
