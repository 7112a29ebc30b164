"""Answer extraction and normalisation for the generative tasks, as the papers define them.

- Closed-book QA (NaturalQuestions, TriviaQA): exact match after the normalisation of the open-domain QA
  literature (SQuAD's ``normalize_answer``, used by Lee et al. 2019, GPT-3 and the LLaMA paper): lower
  case, punctuation removed, the articles a/an/the removed, whitespace collapsed; correct when it equals
  any gold answer.
- GSM8K (Wei et al. 2022, chain of thought): the number after "The answer is", else the last number in
  the text; compared as numbers ("18.00" equals "18", "$1,000" equals "1000").
- MATH (Lewkowycz et al. 2022, "Minerva", appendix D): the text after "Final Answer: The final answer
  is" and before ". I hope it is correct.", put through the paper's ``normalize_final_answer``; the gold
  answer is the solution's last ``\\boxed{...}``, normalised the same way. Equal normalised strings are
  equivalent; otherwise, when SymPy's LaTeX parser is installed (it needs ``antlr4-python3-runtime``
  4.11), the two answers are equivalent when SymPy simplifies their difference to 0, as in the paper.
"""

from __future__ import annotations

import re
import signal
import string
import threading
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

# Closed-book QA ---------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> bool:
    """Whether `prediction` equals any of `golds` after ``normalize_answer``."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in golds)


# GSM8K ------------------------------------------------------------------------------------------------------
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"The answer is:?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K reference solution (after "####")."""
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer ends with '#### <number>', got {answer[-60:]!r}")
    return clean_number(answer.split("####")[-1].strip())


def clean_number(text: str) -> str:
    """A number as written, without "$", thousands commas and a final period."""
    return text.replace("$", "").replace(",", "").strip().rstrip(".")


def extract_gsm8k(text: str) -> tuple[str | None, str | None]:
    """(the number after the first "The answer is", the last number in the text), each None when absent."""
    strict = _ANSWER_IS.search(text)
    numbers = _ANY_NUMBER.findall(text)
    return (clean_number(strict.group(1)) if strict else None), (clean_number(numbers[-1]) if numbers else None)


def gsm8k_answer(text: str) -> str | None:
    """The answer a chain of thought gives: after "The answer is" when it says so, else its last number."""
    strict, flexible = extract_gsm8k(text)
    return strict if strict is not None else flexible


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def majority_vote(answers: Sequence[Hashable | None]) -> Any:
    """The most frequent answer (None ignored); ties go to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


# MATH (Minerva) ---------------------------------------------------------------------------------------------
# The answer line the 4-shot prompt teaches; any one character may stand before " I hope" (as in the paper's code).
_FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")

# Lewkowycz et al. (2022), appendix D, listing "normalize_final_answer".
SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]  # fmt: skip
REMOVED_EXPRESSIONS = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
                       "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
                       "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
                       "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
                       "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
                       "\\dots"]  # fmt: skip


def minerva_answer(text: str) -> str | None:
    """The answer after "Final Answer: The final answer is" (None when the generation does not say it)."""
    match = _FINAL_ANSWER.search(text + "I hope it is correct.")  # a generation cut at the stop may lack it
    return match.group(1).strip() if match else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed x``) in `text`."""
    at = text.rfind("\\boxed")
    if "\\boxed " in text[max(at, 0) :]:
        return text[at + len("\\boxed ") :].split("$")[0].strip()
    if at < 0:
        at = text.rfind("\\fbox")
        if at < 0:
            return None
    start = text.find("{", at)
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    return None


def normalize_final_answer(answer: str) -> str:
    """The Minerva paper's normalisation of a final answer (appendix D), step for step."""
    answer = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        answer = answer.replace(expr, "")
    # The answer inside math mode, bold, a box, an overline or text.
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}.
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 100,000 -> 100000
        answer = answer.replace(",", "")
    return answer


def math_gold(doc: dict) -> str:
    """A MATH record's normalised answer: its solution's last box (or its "answer" field, as MATH-500 has)."""
    boxed = last_boxed(doc.get("solution", ""))
    if boxed is None:
        if doc.get("answer") is None:
            raise ValueError("the solution has no \\boxed{...} answer and the record no 'answer' field")
        boxed = str(doc["answer"])
    return normalize_final_answer(boxed)


@cache
def _latex_parser():  # sympy's parse_latex, or None where its ANTLR runtime is missing
    try:
        with warnings.catch_warnings():  # sympy warns, then raises, when the ANTLR runtime is missing
            warnings.simplefilter("ignore")
            from sympy.parsing.latex import parse_latex

            parse_latex("1")
    except Exception:  # ImportError, or sympy's own check of the antlr4 version
        return None
    return parse_latex


def symbolic_equivalence_available() -> bool:
    """Whether MATH answers that differ as strings are also compared with SymPy."""
    return _latex_parser() is not None


def is_equiv(a: str | None, b: str | None, timeout: float = 5.0) -> bool:
    """Whether two normalised answers are the same: equal strings, or a SymPy difference that simplifies to 0."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    parse = _latex_parser()
    if parse is None:
        return False
    try:
        with _time_limit(timeout):
            return _simplifies_to_zero(parse(a) - parse(b))
    except Exception:  # unparsable or incomparable answers are not equivalent
        return False


def _simplifies_to_zero(diff) -> bool:  # diff: a sympy expression
    import sympy

    return sympy.simplify(diff) == 0


class _time_limit:  # noqa: N801 - used as a context manager
    """Raise TimeoutError after `seconds` (SIGALRM, main thread only; elsewhere no limit)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def __enter__(self) -> None:
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._expire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)

    @staticmethod
    def _expire(signum: int, frame: object) -> None:
        raise TimeoutError("SymPy took too long")
