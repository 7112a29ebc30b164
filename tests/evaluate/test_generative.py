"""Generative tasks: prompts as the papers write them, scoring of known answers, and runs on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llamaforge
from llamaforge.evaluate import (
    GENERATIVE_TASKS,
    Sandbox,
    SandboxLimits,
    SandboxUnavailableError,
    evaluate_generative,
    get_generative_task,
    load_records,
    score_generations,
    split_tasks,
)
from llamaforge.evaluate.generative import build_prompts

DATA = Path(__file__).parent / "data"


def docs(name: str, split: str | None = None) -> list[dict]:
    task = GENERATIVE_TASKS[name]
    return load_records(task, split or task.eval_split, DATA)


def prompts(name: str, shots: int, seed: int = 1234) -> list[str]:
    task = GENERATIVE_TASKS[name]
    pool = docs(name, task.fewshot_split) if task.fewshot_split and shots else []
    return build_prompts(task, docs(name), shots, pool, seed)[0]


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    box = Sandbox(SandboxLimits(timeout=5, cpu_seconds=5))
    try:
        box.run("pass")
    except SandboxUnavailableError as exc:
        pytest.skip(f"this system cannot isolate programs: {exc}")
    return box


# Prompts ----------------------------------------------------------------------------------------------------------
def test_qa_prompts_follow_the_llama_paper() -> None:
    assert prompts("nq_open", 0)[0] == "Answer these questions:\nQ: what is the capital city of france?\nA:"
    two = prompts("nq_open", 2)
    train = {f"Q: {d['question']}?\nA: {d['answer'][0]}" for d in docs("nq_open", "train")}
    for p in two:
        head, *shots, _question = p.split("\nQ: ")
        assert head == "Answer these questions:" and len(shots) == 2
        assert all(f"Q: {s}" in train for s in shots)
    assert two == prompts("nq_open", 2) and two != prompts("nq_open", 2, seed=7)  # seeded draws
    # TriviaQA questions keep their own question mark; others get one.
    trivia = prompts("triviaqa", 0)
    assert trivia[0].endswith("Q: Which metal is liquid at room temperature?\nA:")
    assert trivia[3].endswith("Q: Which instrument has 88 keys?\nA:")


def test_gsm8k_prompt_is_the_eight_chain_of_thought_exemplars() -> None:
    p = prompts("gsm8k", 8)[0]
    assert p.startswith("Q: There are 15 trees in the grove.")
    assert "The answer is 6.\n\nQ: If there are 3 cars" in p
    assert p.count("\nA: ") == 8 and p.endswith("Q: Mia has 4 boxes with 6 pencils in each box. She gives away 5 "
                                                "pencils. How many pencils does she have left?\nA:")  # fmt: skip
    assert prompts("gsm8k", 2)[0].count("The answer is") == 2


def test_math_prompt_is_minervas_four_shots() -> None:
    p = prompts("math", 4)[0]
    first = "Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.\n\nSolution: "
    assert p.startswith(first)
    assert p.count("Final Answer: The final answer is") == 4 and p.count("Problem:\n") == 5
    assert p.endswith("Problem:\nWhat is $3 \\cdot 4 + 5$?\n\nSolution:")


def test_code_prompts() -> None:
    he = docs("humaneval")
    assert prompts("humaneval", 0) == [d["prompt"] for d in he]
    mbpp = prompts("mbpp", 3)[0]
    order = [mbpp.index(s) for s in ("count the vowels", "perfect square", "product of a list", "square of a")]
    assert order == sorted(order)  # shots are task ids 2, 3, 4, then the question
    assert mbpp.count("[DONE]\n\n") == 3 and mbpp.endswith("assert square(0) == 0\n[BEGIN]\n")
    assert "def count_vowels(s):\r\n" in mbpp  # the dataset's code as it is


def test_fewshot_limits_and_bad_records(tiny_llm) -> None:
    with pytest.raises(ValueError, match="the paper's 8 exemplars: --num-fewshot must be <= 8, got 9"):
        evaluate_generative(tiny_llm, [GENERATIVE_TASKS["gsm8k"]], data_dir=DATA, num_fewshot=9, progress=False)
    with pytest.raises(ValueError, match="humaneval has no few-shot examples"):
        evaluate_generative(tiny_llm, [GENERATIVE_TASKS["humaneval"]], data_dir=DATA, num_fewshot=1, progress=False)
    with pytest.raises(ValueError, match="nq_open is scored on its greedy answer"):
        evaluate_generative(tiny_llm, [GENERATIVE_TASKS["nq_open"]], data_dir=DATA, num_samples=2, progress=False)
    with pytest.raises(ValueError, match="record 1 is not in the expected format"):
        build_prompts(GENERATIVE_TASKS["gsm8k"], [{"question": "q", "answer": "#### 1"}, {"q": 1}], 0, [])
    with pytest.raises(ValueError, match=r"record 0 is not in the expected format .*'#### <number>'"):
        build_prompts(GENERATIVE_TASKS["gsm8k"], [{"question": "q", "answer": "no final number"}], 0, [])


def test_missing_data_names_the_files_and_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_records(GENERATIVE_TASKS["gsm8k"], "test", tmp_path)
    text = str(err.value)
    assert "no test data for task gsm8k" in text and "openai/gsm8k/main" in text
    assert "https://huggingface.co/datasets/openai/gsm8k, configuration main" in text
    with pytest.raises(FileNotFoundError, match="configurations algebra, counting_and_probability"):
        load_records(GENERATIVE_TASKS["math"], "test", tmp_path)


def test_hub_layout_parquet_files(tmp_path: Path) -> None:
    """The files as the hub publishes them: configuration directories of sharded Parquet files."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    shard = "-00000-of-00001.parquet"
    for rel, src in ((f"openai/gsm8k/main/test{shard}", "gsm8k/test.jsonl"),
                     (f"EleutherAI/hendrycks_math/algebra/test{shard}", "math/test.jsonl"),
                     (f"EleutherAI/hendrycks_math/geometry/test{shard}", "math/test.jsonl"),
                     (f"google-research-datasets/mbpp/full/prompt{shard}", "mbpp/prompt.jsonl")):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in (DATA / src).read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / rel)
    assert len(load_records(GENERATIVE_TASKS["gsm8k"], "test", tmp_path)) == 4
    assert len(load_records(GENERATIVE_TASKS["math"], "test", tmp_path)) == 8  # every subject's file
    assert [d["task_id"] for d in load_records(GENERATIVE_TASKS["mbpp"], "prompt", tmp_path)] == [1, 2, 3, 4]


def test_task_names_and_groups() -> None:
    choice, generative = split_tasks("piqa,gsm8k,nq,code")
    assert [t.name for t in choice] == ["piqa"]
    assert [t.name for t in generative] == ["gsm8k", "nq_open", "humaneval", "mbpp"]
    assert len(split_tasks("generative")[1]) == 6 and len(split_tasks("all")[0]) == 9
    assert get_generative_task("minerva_math").name == "math" and get_generative_task("hellaswag") is None
    with pytest.raises(ValueError, match=r"unknown task 'nope'; choose from .*humaneval"):
        split_tasks("nope")


# Scoring known answers ---------------------------------------------------------------------------------------
def _items(name: str, generations: list[list[str]]) -> tuple[list[dict], list[dict]]:
    task = GENERATIVE_TASKS[name]
    records = docs(name)[: len(generations)]
    golds = build_prompts(task, records, 0, [])[1]
    return records, [{"gold": g, "generations": gen} for g, gen in zip(golds, generations)]


def test_scoring_qa_and_math() -> None:
    records, items = _items("nq_open", [[" Paris"], [" shakespeare."], [" 9"]])
    assert score_generations(GENERATIVE_TASKS["nq_open"], records, items) == ["exact_match"]
    assert [it["exact_match"] for it in items] == [1, 1, 0]

    gens = [["So 19. The answer is 19.", "The answer is 20.", "We get 19 in the end"],
            ["It made $1,080. The answer is 1080.", "The answer is 1,080.00", "The answer is 7."],
            ["The answer is 8.", "The answer is 9.", "The answer is 8."]]  # fmt: skip
    records, items = _items("gsm8k", gens)
    metrics = score_generations(GENERATIVE_TASKS["gsm8k"], records, items)
    assert metrics == ["maj@3", "maj@1", "strict_match", "flexible_extract"]
    assert [it["maj@1"] for it in items] == [1, 1, 0] and [it["maj@3"] for it in items] == [1, 1, 0]
    assert items[1]["voted"] == "1080" and items[0]["answers"] == ["19", "20", "19"]

    final = "Final Answer: The final answer is ${}$. I hope it is correct."
    records, items = _items("math", [[final.format("17")], [final.format("\\frac34")], ["I give up."]])
    assert score_generations(GENERATIVE_TASKS["math"], records, items) == ["maj@1"]
    assert [it["maj@1"] for it in items] == [1, 1, 0] and items[2]["answers"] == [None]


def test_scoring_code_runs_the_tests(sandbox: Sandbox) -> None:
    he = GENERATIVE_TASKS["humaneval"]
    records = docs("humaneval")
    right = [d["canonical_solution"] for d in records]
    wrong = ["    return a - b\n", "    while True:\n        pass\n", "    import os\n    os.fork()\n"]
    items = [{"gold": d["test"], "generations": [r, w]} for d, r, w in zip(records, right, wrong)]
    metrics = score_generations(he, records, items, sandbox=sandbox, pass_k=(1, 2, 10))
    assert metrics == ["pass@1", "pass@2"]
    assert [it["num_passed"] for it in items] == [1, 1, 1]
    assert [it["pass@1"] for it in items] == [0.5] * 3 and [it["pass@2"] for it in items] == [1.0] * 3
    reasons = [it["executions"][1]["reason"] for it in items]
    assert reasons[0].startswith("exit status 1: AssertionError") and reasons[1] == "timed out after 5 s"
    assert "PermissionError" in reasons[2]

    mbpp = GENERATIVE_TASKS["mbpp"]
    records = docs("mbpp")
    items = [{"gold": d["test_list"], "generations": [d["code"]]} for d in records]
    score_generations(mbpp, records, items, sandbox=sandbox)
    assert [it["pass@1"] for it in items] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="same, non-zero number of generations"):
        score_generations(mbpp, records[:2], [{"gold": [], "generations": ["a"]}, {"gold": [], "generations": []}])


# On a tiny model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tiny_hf_dir: Path):
    return llamaforge.load(tiny_hf_dir)


def test_generations_are_the_engines_own(tiny_llm) -> None:
    task = GENERATIVE_TASKS["nq_open"]
    (result,) = evaluate_generative(tiny_llm, [task], data_dir=DATA, max_new_tokens=6, limit=3, batch_size=2,
                                    progress=False)  # fmt: skip
    assert result.n == 3 and result.paper_metric == "exact_match" and result.extra["num_samples"] == 1
    for item in result.items:
        direct = tiny_llm.generate(item["prompt"], max_new_tokens=6, temperature=0, stop=list(task.stop))
        assert item["generations"] == [direct.text] and item["finish_reasons"] == [direct.finish_reason]
        assert item["exact_match"] in (0, 1) and not item["truncated"]
    assert result.extra["generated_tokens"] > 0 and result.extra["items_per_second"] > 0
    # The batch size changes how requests share the engine, not what they generate.
    (one,) = evaluate_generative(tiny_llm, [task], data_dir=DATA, max_new_tokens=6, limit=3, batch_size=1,
                                 progress=False)  # fmt: skip
    assert [it["generations"] for it in one.items] == [it["generations"] for it in result.items]


def test_sampling_is_seeded_and_long_prompts_are_cut(tiny_llm) -> None:
    task = GENERATIVE_TASKS["gsm8k"]
    kwargs = {"data_dir": DATA, "max_new_tokens": 8, "limit": 2, "num_samples": 3, "progress": False}
    (a,) = evaluate_generative(tiny_llm, [task], temperature=1.0, **kwargs)
    (b,) = evaluate_generative(tiny_llm, [task], temperature=1.0, **kwargs)
    (c,) = evaluate_generative(tiny_llm, [task], temperature=1.0, seed=99, **kwargs)
    gens = [it["generations"] for it in a.items]
    assert gens == [it["generations"] for it in b.items] and gens != [it["generations"] for it in c.items]
    assert all(len(set(g)) > 1 for g in gens)  # each sample has its own seed
    assert a.metrics == ("maj@3", "maj@1", "strict_match", "flexible_extract") and a.extra["temperature"] == 1.0
    # 8 exemplars do not fit a 512-token context: the prompt loses its left part, never the question.
    context = tiny_llm.config.max_seq_len
    assert all(it["truncated"] and it["prompt_tokens"] == context - 8 for it in a.items)
    assert a.extra["truncated_prompts"] == 2 and a.extra["cut_at_max_tokens"] == 6


def test_code_task_end_to_end(tiny_llm, sandbox: Sandbox) -> None:
    (result,) = evaluate_generative(tiny_llm, [GENERATIVE_TASKS["humaneval"]], data_dir=DATA, max_new_tokens=8,
                                    sandbox=sandbox, progress=False)  # fmt: skip
    assert result.paper_metric == "pass@1" and result.n == 3
    for item in result.items:  # a random model writes no working code, and each failure says why
        (execution,) = item["executions"]
        assert not execution["passed"] and execution["reason"] and item["pass@1"] == 0.0
    assert "Landlock" in result.extra["sandbox"]


@pytest.mark.slow
def test_builtin_model_solves_easy_problems(smollm2_gguf: Path, sandbox: Sandbox) -> None:
    """SmolLM2-135M-Instruct on the fixtures: its MBPP programs pass their asserts in the sandbox (the prompt, the
    [DONE] stop and the program assembly work with a real model), and it knows an easy fact."""
    llm = llamaforge.load(smollm2_gguf)
    tasks = [GENERATIVE_TASKS["mbpp"], GENERATIVE_TASKS["nq_open"]]
    mbpp, nq = evaluate_generative(llm, tasks, data_dir=DATA, max_new_tokens=48, sandbox=sandbox, progress=False)
    assert mbpp.metric("pass@1")[0] >= 2 / 3, [it["executions"][0]["reason"] for it in mbpp.items]
    assert all(it["finish_reasons"] == ["stop"] for it in mbpp.items)  # each stopped at "[DONE]"
    assert nq.metric("exact_match")[0] >= 1 / 5, [it["answer"] for it in nq.items]
