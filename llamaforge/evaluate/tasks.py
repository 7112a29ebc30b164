"""The zero-shot and few-shot benchmarks of the LLaMA paper as multiple-choice tasks.

Each task turns one record of its dataset (in the dataset's public format on the Hugging Face hub) into
an ``Item``: a context per choice, a continuation per choice, and the gold index. Prompts follow
lm-evaluation-harness's definitions of the same tasks so that scores are comparable; the paper's
normalizations are computed alongside:

- ``acc``: the choice with the highest log-likelihood;
- ``acc_norm``: log-likelihood divided by the choice's length in characters (Gao et al., 2021);
- ``acc_uncond``: log-likelihood minus the continuation's log-likelihood after just "Answer:"
  (Brown et al., 2020), which the paper uses for BoolQ and OpenBookQA.

Records come from ``--data-dir`` (JSONL, JSON or Parquet, as published on the hub) or, when the
``datasets`` library is installed and the hub is reachable, from the hub itself.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generative_tasks import GenerativeTask

UNCONDITIONAL_CONTEXT = "Answer:"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_ALIASES = {"validation": ("validation", "valid", "val"), "test": ("test",), "train": ("train",),
                 "dev": ("dev",)}  # fmt: skip


@dataclass
class Item:
    """One question: choice i is scored as log P(continuations[i] | contexts[i])."""

    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # the answer texts, whose lengths normalize acc_norm
    gold: int
    group: str = ""  # e.g. the MMLU subject


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    hub: tuple[str, str | None]  # dataset id and configuration on the Hugging Face hub
    eval_split: str
    fewshot_split: str
    question: Callable[[dict], str]  # the prompt for a record
    choices: Callable[[dict], list[str]]
    gold: Callable[[dict], int]
    paper_metric: str = "acc_norm"  # the metric the LLaMA paper reports for this task
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    fewshot_sampler: str = "random"  # "random" (seeded) or "first" (MMLU's first five dev questions)
    default_fewshot: int = 0
    description: Callable[[dict], str] | None = None
    partial: bool = False  # WinoGrande: each choice fills the blank and the rest of the sentence is scored
    dir_names: tuple[str, ...] = field(default=())

    @property
    def unconditional(self) -> bool:
        return "acc_uncond" in self.metrics

    # Prompts -------------------------------------------------------------------------------------
    def example(self, doc: dict) -> str:
        """A solved example for a few-shot prompt: question and gold answer."""
        if self.partial:
            contexts, continuation = _winogrande_parts(doc)
            return contexts[self.gold(doc)] + continuation
        return self.question(doc) + " " + self.choices(doc)[self.gold(doc)]

    def item(self, doc: dict, shots: list[dict] | None = None) -> Item:
        prefix = self.description(doc) if self.description else ""
        for shot in shots or []:
            prefix += self.example(shot) + "\n\n"
        choices = self.choices(doc)
        if self.partial:
            contexts, continuation = _winogrande_parts(doc)
            return Item([prefix + c for c in contexts], [continuation] * len(contexts), contexts, self.gold(doc))
        context = prefix + self.question(doc)
        return Item([context] * len(choices), [" " + c for c in choices], choices, self.gold(doc),
                    group=str(doc.get("subject", "")))  # fmt: skip


# Record formats ------------------------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    # WikiHow contexts carry bracketed markup such as "[title]"; drop it as the harness does.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_question(doc: dict) -> str:
    if "ctx_a" in doc:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    else:
        ctx = doc["ctx"]
    return _hellaswag_clean(doc["activity_label"] + ": " + ctx)


def _winogrande_parts(doc: dict) -> tuple[list[str], str]:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    return [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]], " " + sentence[blank + 1 :].strip()


def _choice_texts(doc: dict) -> list[str]:
    return list(doc["choices"]["text"])


def _choice_index(doc: dict) -> int:
    labels = [str(label).strip() for label in doc["choices"]["label"]]
    key = str(doc["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _boolq_gold(doc: dict) -> int:
    value = doc["answer"] if "answer" in doc else doc["label"]
    if isinstance(value, str):
        return int(value.strip().lower() in ("true", "yes", "1"))
    return int(bool(value))


def _mmlu_question(doc: dict) -> str:
    letters = "ABCD"
    lines = [doc["question"].strip()] + [f"{letters[i]}. {c}" for i, c in enumerate(doc["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_gold(doc: dict) -> int:
    answer = doc["answer"]
    return "ABCD".index(answer.strip()) if isinstance(answer, str) and not answer.strip().isdigit() else int(answer)


def _mmlu_description(doc: dict) -> str:
    subject = str(doc.get("subject", "")).replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("boolq", "BoolQ", ("google/boolq", None), "validation", "train",
             lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", lambda d: ["no", "yes"], _boolq_gold,
             paper_metric="acc_uncond", metrics=("acc", "acc_uncond"), dir_names=("google/boolq", "super_glue/boolq")),
        Task("piqa", "PIQA", ("baber/piqa", None), "validation", "train",
             lambda d: f"Question: {d['goal']}\nAnswer:", lambda d: [d["sol1"], d["sol2"]], lambda d: int(d["label"]),
             dir_names=("baber/piqa", "ybisk/piqa")),
        Task("siqa", "SIQA", ("lighteval/siqa", None), "validation", "train",
             lambda d: f"Q: {d['context']} {d['question']}\nA:", lambda d: [d["answerA"], d["answerB"], d["answerC"]],
             lambda d: int(d["label"]) - 1, dir_names=("social_iqa", "social_i_qa", "allenai/social_i_qa",
                                                       "lighteval/siqa")),
        Task("hellaswag", "HellaSwag", ("Rowan/hellaswag", None), "validation", "train", _hellaswag_question,
             lambda d: [_hellaswag_clean(e) for e in d["endings"]], lambda d: int(d["label"]),
             dir_names=("Rowan/hellaswag",)),
        Task("winogrande", "WinoGrande", ("allenai/winogrande", "winogrande_xl"), "validation", "train",
             lambda d: d["sentence"], lambda d: [d["option1"], d["option2"]], lambda d: int(d["answer"]) - 1,
             paper_metric="acc", metrics=("acc",), partial=True,
             dir_names=("winogrande_xl", "allenai/winogrande/winogrande_xl", "allenai/winogrande")),
        Task("arc_easy", "ARC-e", ("allenai/ai2_arc", "ARC-Easy"), "test", "train",
             lambda d: f"Question: {d['question']}\nAnswer:", _choice_texts, _choice_index,
             dir_names=("ARC-Easy", "ai2_arc/ARC-Easy", "allenai/ai2_arc/ARC-Easy")),
        Task("arc_challenge", "ARC-c", ("allenai/ai2_arc", "ARC-Challenge"), "test", "train",
             lambda d: f"Question: {d['question']}\nAnswer:", _choice_texts, _choice_index,
             dir_names=("ARC-Challenge", "ai2_arc/ARC-Challenge", "allenai/ai2_arc/ARC-Challenge")),
        Task("openbookqa", "OBQA", ("allenai/openbookqa", "main"), "test", "train", lambda d: d["question_stem"],
             _choice_texts, _choice_index, paper_metric="acc_uncond", metrics=("acc", "acc_norm", "acc_uncond"),
             dir_names=("openbookqa/main", "allenai/openbookqa/main", "allenai/openbookqa")),
        Task("mmlu", "MMLU", ("cais/mmlu", "all"), "test", "dev", _mmlu_question, lambda d: ["A", "B", "C", "D"],
             _mmlu_gold, paper_metric="acc", metrics=("acc",), fewshot_sampler="first", default_fewshot=5,
             description=_mmlu_description, dir_names=("cais/mmlu/all", "cais/mmlu")),
    ]
}  # fmt: skip
ALIASES = {"arc-e": "arc_easy", "arc_e": "arc_easy", "arc-c": "arc_challenge", "arc_c": "arc_challenge",
           "obqa": "openbookqa", "social_iqa": "siqa"}  # fmt: skip


def get_task(name: str) -> Task:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(spec: str) -> list[Task]:
    """Tasks from a comma-separated list; "all" means every task, "zeroshot" the paper's Table 3 tasks."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in ("all", "zeroshot"):
            names += [n for n in TASKS if part == "all" or n != "mmlu"]
        else:
            names.append(part)
    if not names:
        raise ValueError("no tasks given")
    return list({get_task(n).name: get_task(n) for n in names}.values())


# Loading records -----------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """Records of a JSONL, JSON (a list, or {"data"/"rows": [...]}) or Parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError as exc:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: invalid JSON ({exc.msg})") from exc
    return records


def _split_files(directory: Path, split: str) -> list[Path]:
    aliases = SPLIT_ALIASES.get(split, (split,))
    found = [p for p in sorted(directory.rglob("*")) if p.suffix in DATA_SUFFIXES and p.is_file()
             and any(a in re.split(r"[-_.]", p.stem.lower()) for a in aliases)]  # fmt: skip
    preferred = [p for p in found if "all" in p.relative_to(directory).parts[:-1]]  # MMLU keeps one copy in all/
    return preferred or found


def data_files(task: Task | GenerativeTask, split: str, data_dir: str | os.PathLike) -> list[Path]:
    """The local files holding `split` of `task` under `data_dir` (empty when there are none)."""
    root = Path(data_dir)
    names = (task.name, *task.dir_names)
    for name in names:
        if (root / name).is_dir():
            files = _split_files(root / name, split)
            if files:
                return files
    for name in names:
        for alias in SPLIT_ALIASES.get(split, (split,)):
            for sep in ("_", "-", "/"):
                for suffix in DATA_SUFFIXES:
                    if (root / f"{name}{sep}{alias}{suffix}").is_file():
                        return [root / f"{name}{sep}{alias}{suffix}"]
    if split == task.eval_split:
        for suffix in DATA_SUFFIXES:
            if (root / f"{task.name}{suffix}").is_file():
                return [root / f"{task.name}{suffix}"]
    return []


def load_records(task: Task | GenerativeTask, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The records of one split: from `data_dir` when it has them, else from the hub via ``datasets``."""
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {data_dir}: no such directory")
        files = data_files(task, split, data_dir)
        if not files:
            names = ", ".join([task.name, *task.dir_names])
            raise FileNotFoundError(f"no {split} data for task {task.name} in {data_dir}: expected JSONL, JSON or "
                                    f"Parquet files named after the split ({split}) in a directory named one of "
                                    f"{names}, or {task.name}_{split}.jsonl; the dataset's files are at "
                                    f"{hub_files(task)}")  # fmt: skip
        return [r for f in files for r in read_records(f)]
    try:
        import datasets
    except ModuleNotFoundError:
        raise FileNotFoundError(f"task {task.name}: pass --data-dir with the dataset's files ({hub_files(task)}), "
                                f"or install `datasets` to fetch them from the Hugging Face hub") from None  # fmt: skip
    configs = task.hub[1] if isinstance(task.hub[1], tuple) else (task.hub[1],)
    try:
        return [r for config in configs for r in datasets.load_dataset(task.hub[0], config, split=split)]
    except Exception as exc:
        raise FileNotFoundError(f"task {task.name}: no local {split} data and the hub failed ({exc})") from exc


def hub_files(task: Task | GenerativeTask) -> str:
    """Where a task's files come from, for error messages."""
    name, config = task.hub
    configs = "" if config is None else f", configuration {config}" if isinstance(config, str) else (
        f", configurations {', '.join(config)}")  # fmt: skip
    return f"https://huggingface.co/datasets/{name}{configs}"


def build_items(task: Task, docs: list[dict], num_fewshot: int = 0, fewshot_docs: list[dict] | None = None,
                seed: int = 1234) -> list[Item]:  # fmt: skip
    """Items for `docs`, each with `num_fewshot` solved examples from `fewshot_docs` before it."""
    if num_fewshot and not fewshot_docs:
        raise ValueError(f"task {task.name}: {num_fewshot}-shot prompts need {task.fewshot_split} data")
    rng = random.Random(seed)
    items = []
    for i, doc in enumerate(docs):
        try:
            shots = _pick_shots(task, doc, num_fewshot, fewshot_docs or [], rng) if num_fewshot else []
            items.append(task.item(doc, shots))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"task {task.name}: record {i} is not in the expected format ({exc!r}): "
                             f"{json.dumps(doc, default=str)[:200]}") from exc  # fmt: skip
    return items


def _pick_shots(task: Task, doc: dict, n: int, pool: list[dict], rng: random.Random) -> list[dict]:
    if task.fewshot_sampler == "first":  # the first n of the same subject, as MMLU's 5-shot protocol does
        subject = doc.get("subject")
        same = [d for d in pool if d.get("subject") == subject] or pool
        return [d for d in same if d is not doc][:n]
    candidates = rng.sample(pool, min(n + 1, len(pool)))
    return [d for d in candidates if d != doc][:n]


def unconditional_pairs(item: Item) -> list[tuple[str, str]]:
    return [(UNCONDITIONAL_CONTEXT, c) for c in item.continuations]


def describe(task: Task) -> dict[str, Any]:
    return {"task": task.name, "title": task.title, "hub": "/".join(x for x in task.hub if x),
            "split": task.eval_split, "metrics": list(task.metrics), "paper_metric": task.paper_metric}  # fmt: skip
