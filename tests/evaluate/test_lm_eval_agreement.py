"""Agreement with lm-evaluation-harness's Hugging Face backend on the same tiny model.

lm-eval runs its own task definitions (HellaSwag's and PIQA's YAML, pointed at our small files in the
public formats) with ``HFLM``; llamaforge must produce the same prompts, the same log-likelihood for every
choice (to 1e-4) and the same accuracies, both through ``llamaforge eval``'s code path and through the
``llamaforge`` lm-eval backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

import llamaforge  # noqa: E402
from llamaforge.evaluate import evaluate_tasks, get_task  # noqa: E402

pytestmark = pytest.mark.conformance
DATA = Path(__file__).parent / "data"
YAMLS = {"hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml"}


def _task_config(name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / YAMLS[name])
    cfg.pop("tag", None)
    split = cfg["validation_split"]
    cfg.update(task=f"{name}_local", dataset_path="json", dataset_name=None, training_split=None, test_split=None,
               dataset_kwargs={"data_files": {split: str(DATA / f"{name}.jsonl")}})  # fmt: skip
    return cfg


def _run_lm_eval(lm, name: str) -> list[dict]:
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    out = lm_eval.simple_evaluate(model=lm, tasks=[_task_config(name)], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False))  # fmt: skip
    return sorted(out["samples"][f"{name}_local"], key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def hf_lm(tiny_hf_dir: Path):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_hf_dir), device="cpu", batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def hf_samples(hf_lm) -> dict[str, list[dict]]:
    """lm-eval's own per-question results with its HF backend, for each task (computed once)."""
    return {name: _run_lm_eval(hf_lm, name) for name in YAMLS}


@pytest.fixture(scope="module")
def tiny_llm(tiny_hf_dir: Path):
    return llamaforge.load(tiny_hf_dir)


@pytest.mark.parametrize("name", ["hellaswag", "piqa"])
def test_eval_matches_lm_eval_hf_backend(name: str, hf_samples, tiny_llm) -> None:
    reference = hf_samples[name]
    for prefix_reuse in (True, False):
        (ours,) = evaluate_tasks(tiny_llm, [get_task(name)], data_dir=DATA, batch_size=5, prefix_reuse=prefix_reuse,
                                 progress=False)  # fmt: skip
        assert len(ours.items) == len(reference) > 0
        for item, ref in zip(ours.items, reference):
            ref_lls = [r[0][0] for r in ref["resps"]]
            assert item["loglikelihoods"] == pytest.approx(ref_lls, abs=1e-4, rel=0)
            assert item["greedy"] == [bool(r[0][1]) for r in ref["resps"]]
            assert item["acc"] == ref["acc"] and item["acc_norm"] == ref["acc_norm"]
    # The same prompts, choice by choice.
    docs = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
    items = [get_task(name).item(d) for d in docs]
    for item, ref in zip(items, reference):
        assert [list(a) for a in ref["arguments"]] == [[c, k] for c, k in zip(item.contexts, item.continuations)]


@pytest.mark.parametrize("name", ["hellaswag", "piqa"])
def test_lm_eval_plugin_matches_hf_backend(name: str, hf_samples, tiny_llm) -> None:
    from llamaforge.evaluate.lm_eval_plugin import LlamaforgeLM

    reference = hf_samples[name]
    ours = _run_lm_eval(LlamaforgeLM(tiny_llm, batch_size=4), name)
    for mine, ref in zip(ours, reference, strict=True):
        assert mine["arguments"] == ref["arguments"]
        assert [r[0][0] for r in mine["resps"]] == pytest.approx([r[0][0] for r in ref["resps"]], abs=1e-4, rel=0)
        assert (mine["acc"], mine["acc_norm"]) == (ref["acc"], ref["acc_norm"])


def test_plugin_is_registered_by_name(tiny_hf_dir: Path) -> None:
    from lm_eval.api.registry import get_model

    import llamaforge.evaluate.lm_eval_plugin  # noqa: F401  (registers the backend)

    cls = get_model("llamaforge")
    lm = cls.create_from_arg_string(f"pretrained={tiny_hf_dir},dtype=float32", {"batch_size": 2, "device": "cpu"})
    assert lm.batch_size == 2 and lm.max_length == 512


def test_rolling_loglikelihood_matches_hf_backend(hf_lm, tiny_llm) -> None:
    from lm_eval.api.instance import Instance

    from llamaforge.evaluate.lm_eval_plugin import LlamaforgeLM

    text = (DATA / "piqa.jsonl").read_text() * 2  # long enough for several windows of the 512-token context
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (text, "A short text.")]
    ref = hf_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = LlamaforgeLM(tiny_llm, batch_size=4).loglikelihood_rolling(requests, disable_tqdm=True)
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-3)


def test_generate_until_matches_hf_backend(hf_lm, tiny_llm) -> None:
    from lm_eval.api.instance import Instance

    from llamaforge.evaluate.lm_eval_plugin import LlamaforgeLM

    kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(kwargs)), 0) for p in ("Question: How do I", "The cup")]
    ref = hf_lm.generate_until(requests, disable_tqdm=True)
    ours = LlamaforgeLM(tiny_llm).generate_until(requests, disable_tqdm=True)
    assert ours == ref
