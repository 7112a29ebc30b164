"""Task prompts, data discovery, metrics and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.evaluate.report import TaskResult, markdown_table, mean_stderr, results_json, write_json
from llamaforge.evaluate.runner import score_items
from llamaforge.evaluate.scoring import Score
from llamaforge.evaluate.tasks import (
    TASKS,
    build_items,
    data_files,
    get_task,
    load_records,
    parse_tasks,
)

DATA = Path(__file__).parent / "data"


def test_every_task_builds_items_from_its_public_format() -> None:
    for name in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "openbookqa", "mmlu"):
        task = TASKS[name]
        docs = load_records(task, task.eval_split, DATA)
        shots = load_records(task, task.fewshot_split, DATA) if task.default_fewshot else None
        items = build_items(task, docs, task.default_fewshot, shots)
        assert len(items) == len(docs) > 0
        for item in items:
            assert len(item.contexts) == len(item.continuations) == len(item.choices) >= 2
            assert 0 <= item.gold < len(item.choices)


def test_prompt_formats() -> None:
    hs = get_task("hellaswag").item(load_records(get_task("hellaswag"), "validation", DATA)[1])
    assert hs.contexts[0] == "Home and Garden: How to water a plant. Check the soil. If the soil is dry"
    # "[substeps] pour" loses its markup but keeps its space, as in the harness: two spaces after the delimiter.
    assert hs.continuations[1] == "  pour water slowly around the base of the plant." and hs.gold == 1

    arc = [get_task("arc_easy").item(d) for d in load_records(get_task("arc_easy"), "test", DATA)]
    assert arc[0].contexts[0] == "Question: Which of these is a source of light?\nAnswer:"
    assert arc[1].gold == 1 and arc[1].continuations == [" darkness", " sunlight", " plastic"]  # numeric labels

    boolq = get_task("boolq").item(load_records(get_task("boolq"), "validation", DATA)[1])
    assert boolq.contexts[0].endswith("\nQuestion: do fish live in trees?\nAnswer:")
    assert boolq.continuations == [" no", " yes"] and boolq.gold == 0

    wino = get_task("winogrande").item(load_records(get_task("winogrande"), "validation", DATA)[2])
    assert wino.contexts == [
        "The bag did not fit in the box because the bag",
        "The bag did not fit in the box because the box",
    ]
    assert wino.continuations == [" was too small."] * 2 and wino.gold == 1

    siqa = get_task("siqa").item(load_records(get_task("siqa"), "validation", DATA)[0])
    assert siqa.contexts[0].startswith("Q: Tom forgot") and siqa.contexts[0].endswith("afterwards?\nA:")
    assert siqa.gold == 0


def test_mmlu_five_shot_uses_the_first_dev_questions_of_the_same_subject() -> None:
    task = get_task("mmlu")
    items = build_items(task, load_records(task, "test", DATA), 5, load_records(task, "dev", DATA))
    ctx = items[1].contexts[0]  # anatomy
    assert ctx.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert "Which bone is in the upper arm?\nA. humerus\nB. femur\nC. tibia\nD. skull\nAnswer: A\n\n" in ctx
    assert "1 + 1" not in ctx and ctx.endswith("D. the skin\nAnswer:")
    assert items[1].continuations == [" A", " B", " C", " D"] and items[1].group == "anatomy"


def test_random_fewshot_is_seeded_and_excludes_the_question() -> None:
    task = get_task("piqa")
    docs = load_records(task, "validation", DATA)
    a = build_items(task, docs, 2, docs, seed=1)
    assert a[0].contexts == build_items(task, docs, 2, docs, seed=1)[0].contexts
    for doc, item in zip(docs, a):
        assert item.contexts[0].count("Question:") == 3
        assert item.contexts[0].count(doc["goal"]) == 1
    with pytest.raises(ValueError, match="need"):
        build_items(task, docs, 2, None)


def test_hub_layout_and_errors(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(x) for x in (DATA / "piqa.jsonl").read_text().splitlines()]
    (tmp_path / "baber" / "piqa" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "baber/piqa/data/validation-00000-of-00001.parquet")
    assert load_records(get_task("piqa"), "validation", tmp_path) == rows
    (tmp_path / "cais" / "mmlu" / "all").mkdir(parents=True)
    (tmp_path / "cais" / "mmlu" / "anatomy").mkdir(parents=True)
    for sub in ("all", "anatomy"):
        (tmp_path / "cais/mmlu" / sub / "test.jsonl").write_text((DATA / "mmlu/test.jsonl").read_text())
    assert [p.parent.name for p in data_files(get_task("mmlu"), "test", tmp_path)] == ["all"]
    with pytest.raises(FileNotFoundError, match="no test data for task arc_challenge"):
        load_records(get_task("arc_challenge"), "test", tmp_path)
    (tmp_path / "boolq.jsonl").write_text('{"question": "q"}\n{not json\n')
    with pytest.raises(ValueError, match=r"boolq.jsonl:2: invalid JSON"):
        load_records(get_task("boolq"), "validation", tmp_path)
    (tmp_path / "boolq.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="record 0 is not in the expected format"):
        build_items(get_task("boolq"), load_records(get_task("boolq"), "validation", tmp_path))


def test_task_names() -> None:
    assert [t.name for t in parse_tasks("ARC-e, obqa,hellaswag,arc_easy")] == ["arc_easy", "openbookqa", "hellaswag"]
    assert "mmlu" not in [t.name for t in parse_tasks("zeroshot")] and len(parse_tasks("all")) == 9
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_tasks("piqa,nope")


class FixedScorer:
    """Returns preset log-likelihoods for (context, continuation) token pairs, to check the metrics."""

    def __init__(self, table: dict[tuple[str, str], float]) -> None:
        self.table = table

    def score(self, requests, desc: str = "") -> list[Score]:
        decode = lambda ids: "".join(chr(i) for i in ids)
        return [Score(self.table[(decode(c), decode(k))], False, len(k)) for c, k in requests]


def test_metrics_acc_per_char_and_unconditional() -> None:
    task = get_task("openbookqa")
    doc = {"question_stem": "Q", "choices": {"text": ["a", "bbbb"], "label": ["A", "B"]}, "answerKey": "B"}
    (item,) = build_items(task, [doc])
    # acc picks "a" (-2 > -6); per char picks "bbbb" (-1.5/char vs -2/char);
    # against "Answer:" picks "a" (-2 - -5 = 3 vs -6 - -6 = 0).
    table = {("Q", " a"): -2.0, ("Q", " bbbb"): -6.0, ("Answer:", " a"): -5.0, ("Answer:", " bbbb"): -6.0}
    (rec,) = score_items(FixedScorer(table), lambda s: [ord(c) for c in s], [item], task)
    assert (rec["acc"], rec["acc_norm"], rec["acc_uncond"]) == (0, 1, 0)
    assert rec["loglikelihoods"] == [-2.0, -6.0] and rec["unconditional"] == [-5.0, -6.0]


def test_report_table_and_json(tmp_path: Path) -> None:
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx((0.75, (0.25 / 4) ** 0.5))
    items = [{"acc": a, "acc_norm": b, "group": g} for a, b, g in [(1, 1, "x"), (0, 1, "x"), (1, 0, "y"), (0, 0, "y")]]
    r = TaskResult("piqa", "PIQA", "acc_norm", ("acc", "acc_norm"), 0, items)
    table = markdown_table([r])
    assert "| PIQA | 0 | 4 | acc (per char) | 50.0 ± 28.9 | 50.0 ± 28.9 | 50.0 ± 28.9 |" in table
    path = write_json(tmp_path / "out" / "r.json", results_json([r], {"model": "m"}))
    data = json.loads(path.read_text())
    assert data["results"]["piqa"]["acc"] == 0.5 and data["results"]["piqa"]["groups"]["x"]["acc_norm"] == 1.0
    assert data["config"] == {"model": "m"}
