"""Run the generative tasks on a model: build the prompts, generate through the shared engine, score.

Generation goes through the public API, ``llm.generate([ids, ...], stop=..., seed=...)``, which batches
the prompts continuously (``max_batch`` rows at a time). Sample j of every problem uses seed ``seed + j``,
so runs repeat exactly and each sample of a problem is drawn independently. A prompt longer than the
context leaves room for ``max_new_tokens`` by losing tokens from its left (its few-shot examples first),
as lm-evaluation-harness does; a generation that never stops is cut at ``max_new_tokens`` and scored
as it is. Code runs in ``sandbox.Sandbox``; a program that fails, times out or breaks a limit counts as a
failed sample, and the reason is kept with the item.

Metrics per item (the report averages them, with 95% intervals):

- QA: ``exact_match`` of the greedy answer;
- GSM8K: ``maj@1`` (the first sample's answer), ``maj@k`` with k samples (majority vote), and the
  lm-evaluation-harness filters ``strict_match`` ("The answer is N") and ``flexible_extract`` (last number);
- MATH: ``maj@1`` and ``maj@k`` with Minerva's answer equivalence;
- code: ``pass@k`` for each requested k <= n samples, the unbiased estimator (``metrics.pass_at_k``);
  with one greedy sample, pass@1 is whether it passes.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from tqdm.auto import tqdm

from ..llm import LLM
from .generative_tasks import CODE, MATH, QA, GenerativeTask
from .metrics import pass_at_k
from .normalize import (
    exact_match,
    extract_gsm8k,
    gsm8k_answer,
    is_equiv,
    majority_vote,
    minerva_answer,
    normalize_final_answer,
    same_number,
    symbolic_equivalence_available,
)
from .report import TaskResult
from .sandbox import Sandbox, describe_isolation
from .scoring import text_encoder
from .tasks import load_records

DEFAULT_TEMPERATURE = {MATH: 0.6, CODE: 0.8}  # when sampling: Minerva's maj@k, LLaMA's pass@100 (Codex: 0.8)
DEFAULT_TOP_P = {MATH: 1.0, CODE: 0.95}  # Codex samples with nucleus p = 0.95


def evaluate_generative(llm: LLM, tasks: Sequence[GenerativeTask], *, data_dir: str | os.PathLike | None = None,
                        num_fewshot: int | None = None, limit: int | None = None, seed: int = 1234,
                        num_samples: int = 1, temperature: float | None = None, top_p: float | None = None,
                        max_new_tokens: int | None = None, batch_size: int = 16, sandbox: Sandbox | None = None,
                        pass_k: Sequence[int] = (1, 10, 100), progress: bool = True) -> list[TaskResult]:  # fmt: skip
    """Generate and score `tasks` on `llm`. ``num_samples=1`` decodes greedily unless `temperature` is given;
    more samples are drawn at `temperature` (default: 0.6 for math, 0.8 for code) and `top_p`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(k < 1 for k in pass_k):
        raise ValueError(f"pass@k needs k >= 1, got {list(pass_k)}")
    results = []
    if any(task.kind == CODE for task in tasks):
        sandbox = sandbox or Sandbox()
        sandbox.check()  # before any generation
    for task in tasks:
        results.append(_run_task(llm, task, data_dir=data_dir, num_fewshot=num_fewshot, limit=limit, seed=seed,
                                 num_samples=num_samples, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, sandbox=sandbox,
                                 pass_k=pass_k, progress=progress))  # fmt: skip
    return results


def build_prompts(task: GenerativeTask, docs: list[dict], num_fewshot: int, pool: list[dict],
                  seed: int = 1234) -> tuple[list[str], list[Any]]:  # fmt: skip
    """The prompt and the gold answer of every record (a record in the wrong format raises, naming it)."""
    rng = random.Random(seed)
    prompts, golds = [], []
    for i, doc in enumerate(docs):
        try:
            prompts.append(task.prompt(doc, task.pick_shots(doc, num_fewshot, pool, rng)))
            golds.append(task.gold(doc))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ValueError(f"task {task.name}: record {i} is not in the expected format ({exc!r}): "
                             f"{json.dumps(doc, default=str)[:200]}") from exc  # fmt: skip
    return prompts, golds


def _run_task(llm: LLM, task: GenerativeTask, *, data_dir: str | os.PathLike | None, num_fewshot: int | None,
              limit: int | None, seed: int, num_samples: int, temperature: float | None, top_p: float | None,
              max_new_tokens: int | None, batch_size: int, sandbox: Sandbox | None, pass_k: Sequence[int],
              progress: bool) -> TaskResult:  # fmt: skip
    shots = task.default_fewshot if num_fewshot is None else num_fewshot
    if shots < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {shots}")
    if task.max_fewshot is not None and shots > task.max_fewshot:
        source = f"the paper's {task.max_fewshot} exemplars" if task.exemplars else "no few-shot examples"
        raise ValueError(f"task {task.name} has {source}: --num-fewshot must be <= {task.max_fewshot}, got {shots}")
    if task.kind == QA and num_samples > 1:
        raise ValueError(f"task {task.name} is scored on its greedy answer: use one sample, not {num_samples}")
    sampled = num_samples > 1 or bool(temperature)
    temp = (temperature if temperature is not None else DEFAULT_TEMPERATURE.get(task.kind, 0.0)) if sampled else 0.0
    nucleus = (top_p if top_p is not None else DEFAULT_TOP_P.get(task.kind, 1.0)) if sampled else 1.0

    docs = load_records(task, task.eval_split, data_dir)
    docs = docs[:limit] if limit is not None else docs
    if not docs:
        raise ValueError(f"task {task.name}: the {task.eval_split} data has no records")
    pool = load_records(task, task.fewshot_split, data_dir) if shots and task.fewshot_split else []
    prompts, golds = build_prompts(task, docs, shots, pool, seed)

    start = time.perf_counter()
    max_new = max_new_tokens or task.max_new_tokens
    ids, truncated = _encode(llm, prompts, max_new)
    completions = _generate(llm, task, ids, num_samples=num_samples, seed=seed, max_batch=batch_size,
                            options={"max_new_tokens": max_new, "temperature": temp, "top_p": nucleus,
                                     "stop": list(task.stop)}, progress=progress)  # fmt: skip
    gen_seconds = time.perf_counter() - start
    items = []
    for i, (doc, prompt, gold, samples) in enumerate(zip(docs, prompts, golds, completions)):
        item: dict[str, Any] = {"doc_id": i, "prompt": prompt, "gold": gold,
                                "generations": [c.text for c in samples],
                                "finish_reasons": [c.finish_reason for c in samples],
                                "prompt_tokens": len(ids[i]), "truncated": truncated[i]}  # fmt: skip
        if task.group is not None:
            item["group"] = task.group(doc)
        items.append(item)

    score_start = time.perf_counter()
    metrics = score_generations(task, docs, items, sandbox=sandbox, pass_k=pass_k, progress=progress)
    extra: dict[str, Any] = {"scoring_seconds": round(time.perf_counter() - score_start, 3)}
    if task.name == "math":
        extra["equivalence"] = "sympy" if symbolic_equivalence_available() else "normalized string"
    if task.kind == CODE and sandbox is not None:
        extra["sandbox"] = describe_isolation(sandbox.isolation)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for samples in completions for c in samples)
    extra |= {"num_samples": num_samples, "temperature": temp, "top_p": nucleus, "max_new_tokens": max_new,
              "generated_tokens": tokens, "generation_seconds": round(gen_seconds, 3),
              "tokens_per_second": tokens / gen_seconds if gen_seconds > 0 else 0.0,
              "items_per_second": len(docs) / seconds if seconds > 0 else 0.0,
              "truncated_prompts": sum(truncated),
              "cut_at_max_tokens": sum(c.finish_reason == "length" for s in completions for c in s)}  # fmt: skip
    return TaskResult(task.name, task.title, metrics[0], tuple(metrics), shots, items, seconds, extra)


def _encode(llm: LLM, prompts: list[str], max_new: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each prompt, cut from the left so that `max_new` tokens fit in the model's context."""
    context = llm.config.max_seq_len
    room = context - max_new
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new} leaves no room for a prompt in the model's context of {context}")
    encode = text_encoder(llm.require_tokenizer())
    ids, truncated = [], []
    for prompt in prompts:
        tokens = encode(prompt)
        truncated.append(len(tokens) > room)
        ids.append(tokens[-room:])
    return ids, truncated


def _generate(llm: LLM, task: GenerativeTask, ids: list[list[int]], *, num_samples: int, seed: int, max_batch: int,
              options: dict[str, Any], progress: bool) -> list[list[Any]]:  # fmt: skip
    """``num_samples`` completions per prompt. Prompts go to the engine a few batches' worth at a time, so
    the progress bar moves while the engine keeps its batch full."""
    out: list[list[Any]] = [[None] * num_samples for _ in ids]
    chunk = 4 * max_batch
    with tqdm(total=len(ids) * num_samples, desc=f"{task.name}: generate", unit="sample", disable=not progress) as bar:
        for j in range(num_samples):
            for s in range(0, len(ids), chunk):
                completions = llm.generate(ids[s : s + chunk], max_batch=max_batch, seed=seed + j, **options)
                for i, completion in enumerate(completions):
                    out[s + i][j] = completion
                bar.update(len(completions))
    return out


# Scoring ----------------------------------------------------------------------------------------------------------
def score_generations(task: GenerativeTask, docs: Sequence[dict], items: list[dict], *, sandbox: Sandbox | None = None,
                      pass_k: Sequence[int] = (1, 10, 100), progress: bool = False) -> list[str]:  # fmt: skip
    """Score items in place: each needs ``gold`` and ``generations`` (the same number for every item); adds the
    extracted answers (or sandbox outcomes) and one value per metric. Returns the metric names, the paper's first.
    Code runs in `sandbox` (default: ``Sandbox()``)."""
    counts = {len(item["generations"]) for item in items}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every item needs the same, non-zero number of generations, got {sorted(counts)}")
    n = counts.pop()
    if task.kind == QA:
        return _score_qa(items)
    if task.kind == MATH:
        return _score_math(task, items, n)
    return _score_code(task, docs, items, n, pass_k, sandbox or Sandbox(), progress)


def _score_qa(items: list[dict]) -> list[str]:
    for item in items:
        item["answer"] = item["generations"][0].strip()
        item["exact_match"] = int(exact_match(item["answer"], item["gold"]))
    return ["exact_match"]


def _number_key(answer: str | None) -> Any:
    """Votes for "18", "18.0" and "18.00" are one vote."""
    if answer is None:
        return None
    try:
        return Decimal(answer)
    except InvalidOperation:
        return answer


def _score_math(task: GenerativeTask, items: list[dict], n: int) -> list[str]:
    metrics = ([f"maj@{n}"] if n > 1 else []) + ["maj@1"]  # the paper's metric first
    for item in items:
        texts, gold = item["generations"], item["gold"]
        if task.name == "gsm8k":
            answers = [gsm8k_answer(t) for t in texts]
            strict, flexible = extract_gsm8k(texts[0])
            item["strict_match"] = int(same_number(strict, gold))
            item["flexible_extract"] = int(same_number(flexible, gold))
            keys = [_number_key(a) for a in answers]
            voted = majority_vote(keys)
            item["answers"], item["voted"] = answers, None if voted is None else answers[keys.index(voted)]
            item["maj@1"] = int(same_number(answers[0], gold))
            if n > 1:
                item[f"maj@{n}"] = int(same_number(item["voted"], gold))
        else:
            raw = [minerva_answer(t) for t in texts]
            answers = [None if a is None else normalize_final_answer(a) for a in raw]
            item["answers"] = answers
            item["maj@1"] = int(is_equiv(answers[0], gold))
            if n > 1:
                item["voted"] = majority_vote(answers)
                item[f"maj@{n}"] = int(is_equiv(item["voted"], gold))
    if task.name == "gsm8k":
        metrics += ["strict_match", "flexible_extract"]
    return metrics


def _score_code(task: GenerativeTask, docs: list[dict], items: list[dict], n: int, pass_k: Sequence[int],
                sandbox: Sandbox, progress: bool) -> list[str]:  # fmt: skip
    assert task.program is not None
    programs = [task.program(doc, text) for doc, item in zip(docs, items) for text in item["generations"]]
    with tqdm(total=len(programs), desc=f"{task.name}: run tests", unit="program", disable=not progress) as bar:
        outcomes = sandbox.run_many(programs, progress=bar.update)
    ks = sorted({k for k in pass_k if k <= n} | {1})
    for i, item in enumerate(items):
        runs = outcomes[i * n : (i + 1) * n]
        item["executions"] = [r.to_dict() for r in runs]
        passed = sum(r.passed for r in runs)
        item["num_passed"] = passed
        for k in ks:
            item[f"pass@{k}"] = pass_at_k(n, passed, k)
    return [f"pass@{k}" for k in ks]
