"""The pieces of benchmarks/bench_dpo.py: the synthetic pairs keep every held-out question out of training, the
exact rule needs both the format and the question's fact, and the preference measures count what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_dpo as bd


def test_held_out_questions_are_never_trained_on() -> None:
    train, held, facts = bd.make_pairs(seed=0, n_train=2000)
    trained = {p["prompt"] for p in train}
    assert not trained & {p["prompt"] for p in held}
    assert len(held) == len(facts) == len({p["prompt"] for p in held})
    assert not any("opposite" in q or "plural" in q for q in trained)  # two types never trained on
    kinds = {q.split(" of ")[0] for q in trained if " of " in q}
    assert {"What is the capital", "What is the past tense"} <= kinds
    for p, fact in zip(held, facts):
        assert json.loads(p["chosen"]) == {"answer": fact} and bd.has_fact(p["rejected"], fact)
        assert bd.passes(p["chosen"], fact) and not bd.passes(p["rejected"], fact)
    assert bd.make_pairs(seed=0, n_train=50) == bd.make_pairs(seed=0, n_train=50)


def test_rule_needs_the_format_and_the_fact() -> None:
    assert bd.passes('{"answer": "Lima"}', "Lima")
    assert bd.passes('{"answer": "It is New Delhi."}', "new delhi")
    assert not bd.passes('{"answer": "Quito"}', "Lima")  # the format, the wrong fact
    assert not bd.passes("The capital of Peru is Lima.", "Lima")  # the fact, not the format
    assert not bd.passes('{"answer": "Lima"} and more', "Lima")  # not a JSON object alone
    assert not bd.passes('{"answer": "Lima", "note": "x"}', "Lima")
    assert not bd.passes('{"answer": ["Lima"]}', "Lima")
    assert not bd.passes('{"answer": "Limassol"}', "Lima")  # whole words
    assert bd.win_tie_loss([True, True, False, False], [False, True, True, False]) == (1, 2, 1)


def test_preference_accuracy_per_token_and_summed() -> None:
    # pair 0: chosen longer and less likely in total but more likely per token; pair 1: rejected wins both ways
    lp = {"chosen": torch.tensor([-4.0, -5.0]), "rejected": torch.tensor([-3.0, -1.0]),
          "n_chosen": torch.tensor([8, 2]), "n_rejected": torch.tensor([2, 2])}  # fmt: skip
    assert bd.preference_accuracy(lp) == 0.5
    assert bd.preference_accuracy(lp, normalise=False) == 0.0
