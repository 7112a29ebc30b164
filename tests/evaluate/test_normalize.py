"""Answer extraction and normalisation (QA exact match, GSM8K numbers, Minerva's MATH answers) and the estimators."""

from __future__ import annotations

import itertools
import math

import pytest

from llamaforge.evaluate.metrics import confidence_interval, pass_at_k, wilson_interval
from llamaforge.evaluate.normalize import (
    exact_match,
    extract_gsm8k,
    gsm8k_answer,
    gsm8k_gold,
    is_equiv,
    last_boxed,
    majority_vote,
    math_gold,
    minerva_answer,
    normalize_answer,
    normalize_final_answer,
    same_number,
    symbolic_equivalence_available,
)


@pytest.mark.parametrize(("prediction", "golds", "expected"), [
    ("Paris", ["Paris"], True),
    (" The Pacific Ocean", ["pacific ocean", "Pacific"], True),
    ("an Apple!", ["apple"], True),
    ("U.S.A.", ["USA"], True),
    ("New   York", ["new york"], True),
    ("Shakespeare", ["William Shakespeare"], False),
    ("", ["Paris"], False),
    ("theatre", ["atre"], False),  # articles go only as whole words
])  # fmt: skip
def test_exact_match_after_squad_normalisation(prediction: str, golds: list[str], expected: bool) -> None:
    assert exact_match(prediction, golds) is expected


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Beatles, (band)  ") == "beatles band"


@pytest.mark.parametrize(("text", "strict", "flexible"), [
    ("So 24 - 5 = 19. The answer is 19.", "19", "19"),
    ("It made 360 * 3 = 1,080 dollars. The answer is $1,080.", "1080", "1080"),
    ("First 3, then 4 and finally 52.5", None, "52.5"),
    ("The answer is -7. Check: 3 - 10 = -7.", "-7", "-7"),
    ("No numbers here.", None, None),
    ("the answer is 12 and then 13", "12", "13"),
])  # fmt: skip
def test_gsm8k_extraction(text: str, strict: str | None, flexible: str | None) -> None:
    assert extract_gsm8k(text) == (strict, flexible)
    assert gsm8k_answer(text) == (strict if strict is not None else flexible)


def test_gsm8k_gold_and_numbers() -> None:
    assert gsm8k_gold("He spends 2 * 540 = <<2*540=1080>>1080.\n#### 1,080") == "1080"
    with pytest.raises(ValueError, match="ends with '#### <number>'"):
        gsm8k_gold("no final answer")
    assert same_number("18.00", "18") and same_number("1080", "1080.0") and not same_number("18", "19")
    assert not same_number(None, "1")


def test_majority_vote() -> None:
    assert majority_vote(["3", "4", "4", None, "3"]) == "3"  # a tie goes to the answer seen first
    assert majority_vote([None, "5", "6", "6"]) == "6"
    assert majority_vote([None, None]) is None


@pytest.mark.parametrize(("raw", "normalized"), [
    ("$\\frac{3}{4}$", "\\frac{3}{4}"),
    ("\\frac34", "\\frac{3}{4}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("100,000", "100000"),
    ("5 \\text{ cm}", "5"),
    ("x = 7", "7"),
    ("\\boxed{12}", "12"),
    ("10^\\circ", "10"),
    ("\\$18.90", "18.90"),
    ("\\text{(B)}", "(B)"),
    ("\\textbf{9}", "9"),
    ("12 \\text{ students}", "12"),
])  # fmt: skip
def test_minerva_normalisation(raw: str, normalized: str) -> None:
    assert normalize_final_answer(raw) == normalized


def test_minerva_answer_and_boxes() -> None:
    text = "We get $x = 4$.\nFinal Answer: The final answer is $4$. I hope it is correct.\n\n"
    assert minerva_answer(text) == "$4$"
    assert minerva_answer("Final Answer: The final answer is $\\frac{1}{2}$") is None  # cut before the period
    assert minerva_answer("no answer line") is None
    assert last_boxed("so $\\boxed{\\frac{3}{4}}$ and first \\boxed{1}") == "1"
    assert last_boxed("a \\boxed{x^{2}+\\frac{1}{2}} b") == "x^{2}+\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("\\boxed 5$.") == "5" and last_boxed("none") is None
    assert last_boxed("unclosed \\boxed{12") is None
    assert math_gold({"solution": "Thus $x = \\boxed{\\dfrac{1}{2}}$."}) == "\\dfrac{1}{2}"
    assert math_gold({"solution": "no box", "answer": "3"}) == "3"
    with pytest.raises(ValueError, match="no \\\\boxed"):
        math_gold({"solution": "no box"})


def test_equivalence() -> None:
    assert is_equiv("\\frac{3}{4}", "\\frac{3}{4}")
    assert not is_equiv(None, "1") and not is_equiv("1", None)
    assert not is_equiv("2", "3")
    if symbolic_equivalence_available():  # SymPy's LaTeX parser needs antlr4-python3-runtime 4.11
        assert is_equiv("0.75", "\\frac{3}{4}") and is_equiv("2\\cdot3", "6")
    else:
        assert not is_equiv("0.75", "\\frac{3}{4}")


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of all k-subsets of the n samples that contain a passing one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (8, 1, 8), (7, 6, 2)])
def test_pass_at_k_equals_the_subset_count(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least 10 samples"):
        pass_at_k(5, 1, 10)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(5, 6, 1)


def test_wilson_interval_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 10), (3, 10), (10, 10), (37, 120)):
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_confidence_interval() -> None:
    assert confidence_interval([1, 0, 1, 1]) == wilson_interval(3, 4)
    low, high = confidence_interval([0.5, 0.25, 0.75, 1.0])
    mean, sd = 0.625, math.sqrt(sum((v - 0.625) ** 2 for v in [0.5, 0.25, 0.75, 1.0]) / 3)
    assert (low, high) == pytest.approx((mean - 1.959964 * sd / 2, min(1.0, mean + 1.959964 * sd / 2)), abs=1e-5)
    assert all(math.isnan(x) for x in confidence_interval([]))
