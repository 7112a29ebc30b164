"""The generative benchmarks of the LLaMA papers: what each one asks, how its prompt is built, what is scored.

Records come in the public formats of the datasets' Hugging Face releases (``--data-dir`` holds their
JSONL/Parquet files; see ``tasks.load_records``). Prompts:

- NaturalQuestions (open-domain split; its validation set is the 3,610-question test set) and TriviaQA
  (``rc.nocontext``): the LLaMA paper's format (Touvron et al. 2023, appendix A, "Formatted dataset
  example for Natural Questions & TriviaQA"): "Answer these questions:" then "Q: ...\\nA: ..." lines;
  shots drawn at random from the training set; greedy answers cut at the first line break, period or
  comma; exact match after normalisation (``normalize.exact_match``).
- GSM8K: the eight chain-of-thought exemplars of Wei et al. (2022, table 20) as "Q: ...\\nA: ..."; the
  answer is the number after "The answer is" (``normalize.gsm8k_answer``); maj@k over k samples.
- MATH: the Minerva four-shot prompt (Lewkowycz et al. 2022, appendix D.2) as "Problem:\\n...\\n\\nSolution:";
  answers normalised and compared as in that paper (``normalize.normalize_final_answer``, ``is_equiv``).
- HumanEval (Chen et al. 2021): the function signature and docstring; generation stops at a new top-level
  statement ("\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint", as in the Codex paper); the program is the
  prompt, the completion and the problem's ``check`` function.
- MBPP (Austin et al. 2021): the task description and its three tests, three solved problems (task ids
  2, 3 and 4 of the "prompt" split) before it, each answer between "[BEGIN]" and "[DONE]"; the program is
  the completion followed by the problem's asserts.

The whitespace between the parts follows lm-evaluation-harness's definitions of the same tasks
(``nq_open``, ``triviaqa``, ``gsm8k_cot``, ``minerva_math``, ``humaneval``, ``mbpp``), so that prompts can be
compared; ``tests/evaluate/test_generative_agreement.py`` lists where they differ and why.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .normalize import gsm8k_gold, math_gold

QA, MATH, CODE = "qa", "math", "code"


@dataclass(frozen=True)
class GenerativeTask:
    """One generative benchmark. ``question(doc)`` is the part of the prompt for a record, ``answer(doc)``
    a solved example's answer; ``gold(doc)`` what a generation is scored against."""

    name: str
    title: str
    kind: str  # QA, MATH or CODE: how generations are scored
    hub: tuple[str, str | tuple[str, ...] | None]  # dataset id and configuration(s) on the Hugging Face hub
    eval_split: str
    question: Callable[[dict], str]
    answer: Callable[[dict], str]
    gold: Callable[[dict], Any]
    stop: tuple[str, ...]
    max_new_tokens: int
    fewshot_split: str | None = None  # where few-shot examples come from (None: `exemplars` or none)
    exemplars: tuple[dict, ...] = ()  # a paper's fixed few-shot examples
    fewshot_ids: tuple[int, ...] = ()  # MBPP: the task ids used as shots, in order
    default_fewshot: int = 0
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    program: Callable[[dict, str], str] | None = None  # CODE: the program that tests a completion
    group: Callable[[dict], str] | None = None  # MATH: the subject
    dir_names: tuple[str, ...] = field(default=())

    @property
    def max_fewshot(self) -> int | None:
        """The most shots the task can give (None: as many as its few-shot split has)."""
        if self.exemplars:
            return len(self.exemplars)
        return None if self.fewshot_split else 0

    def prompt(self, doc: dict, shots: list[dict]) -> str:
        text = self.description
        for shot in shots:
            text += self.question(shot) + self.target_delimiter + self.answer(shot) + self.fewshot_delimiter
        return text + self.question(doc)

    def pick_shots(self, doc: dict, n: int, pool: list[dict], rng: random.Random) -> list[dict]:
        """`n` solved examples for `doc`: the paper's exemplars, the listed task ids, or a seeded random draw
        from the pool that never includes `doc` itself (as lm-evaluation-harness draws them)."""
        if n == 0:
            return []
        if self.exemplars:
            return list(self.exemplars[:n])
        if self.fewshot_ids:
            by_id = {d.get("task_id"): d for d in pool}
            chosen = [by_id[i] for i in self.fewshot_ids if i in by_id]
            chosen += [d for d in pool if d.get("task_id") not in self.fewshot_ids]
            return [d for d in chosen if d is not doc][:n]
        candidates = rng.sample(pool, min(n + 1, len(pool)))
        return [d for d in candidates if d != doc][:n]


# Closed-book question answering -------------------------------------------------------------------------------
def _qa_question(doc: dict) -> str:
    question = str(doc["question"]).strip()
    return f"Q: {question if question.endswith('?') else question + '?'}\nA:"


def _nq_golds(doc: dict) -> list[str]:
    answers = doc["answer"]
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def _triviaqa_golds(doc: dict) -> list[str]:
    answer = doc["answer"]
    return list(dict.fromkeys([*answer.get("aliases", []), answer["value"]]))


QA_STOPS = ("\n", ".", ",")  # the LLaMA paper: "stopping at the first line break, final dot or comma"

# GSM8K: Wei et al. (2022), "Chain-of-thought prompting elicits reasoning in large language models", table 20.
GSM8K_EXEMPLARS = tuple({"question": q, "target": t} for q, t in [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
])  # fmt: skip

# MATH: Lewkowycz et al. (2022), "Solving quantitative reasoning problems with language models", appendix D.2.
MINERVA_EXEMPLARS = tuple({"problem": p, "solution": s} for p, s in [
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
     "$x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
     "Final Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
     "Final Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
     "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
])  # fmt: skip


# Code ---------------------------------------------------------------------------------------------------------
def _humaneval_program(doc: dict, completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def _mbpp_description(doc: dict) -> str:
    return str(doc["text"] if "text" in doc else doc["prompt"])  # "full" and "sanitized" configurations


def _mbpp_question(doc: dict) -> str:
    tests = "\n".join(doc["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {_mbpp_description(doc)} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")  # fmt: skip


def _mbpp_program(doc: dict, completion: str) -> str:
    setup = doc.get("test_setup_code") or ""
    return f"{completion}\n{setup}\n" + "\n".join(doc["test_list"]) + "\n"


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")  # fmt: skip


def _math_question(doc: dict) -> str:
    return f"Problem:\n{doc['problem']}\n\nSolution:"


def _math_group(doc: dict) -> str:
    return str(doc.get("type") or doc.get("subject") or "")


GENERATIVE_TASKS: dict[str, GenerativeTask] = {
    t.name: t
    for t in [
        GenerativeTask("nq_open", "NaturalQuestions", QA, ("google-research-datasets/nq_open", "nq_open"),
                       "validation", _qa_question, lambda d: _nq_golds(d)[0], _nq_golds, QA_STOPS, 32,
                       fewshot_split="train", description="Answer these questions:\n", fewshot_delimiter="\n",
                       dir_names=("google-research-datasets/nq_open", "nq_open/nq_open", "naturalquestions")),
        GenerativeTask("triviaqa", "TriviaQA", QA, ("mandarjoshi/trivia_qa", "rc.nocontext"), "validation",
                       _qa_question, lambda d: d["answer"]["value"], _triviaqa_golds, QA_STOPS, 32,
                       fewshot_split="train", description="Answer these questions:\n", fewshot_delimiter="\n",
                       dir_names=("mandarjoshi/trivia_qa/rc.nocontext", "trivia_qa/rc.nocontext", "rc.nocontext",
                                  "trivia_qa")),
        GenerativeTask("gsm8k", "GSM8K", MATH, ("openai/gsm8k", "main"), "test",
                       lambda d: f"Q: {d['question']}\nA:", lambda d: d["target"], lambda d: gsm8k_gold(d["answer"]),
                       ("Q:", "</s>", "<|im_end|>"), 256, exemplars=GSM8K_EXEMPLARS, default_fewshot=8,
                       dir_names=("openai/gsm8k/main", "gsm8k/main", "openai/gsm8k")),
        GenerativeTask("math", "MATH", MATH, ("EleutherAI/hendrycks_math", MATH_SUBJECTS), "test", _math_question,
                       lambda d: d["solution"], math_gold, ("Problem:",), 512, exemplars=MINERVA_EXEMPLARS,
                       default_fewshot=4, group=_math_group,
                       dir_names=("EleutherAI/hendrycks_math", "hendrycks_math", "competition_math",
                                  "HuggingFaceH4/MATH-500", "MATH-500", "minerva_math")),
        GenerativeTask("humaneval", "HumanEval", CODE, ("openai/openai_humaneval", None), "test",
                       lambda d: d["prompt"], lambda d: d["canonical_solution"], lambda d: d["test"],
                       ("\nclass", "\ndef", "\n#", "\nif", "\nprint"), 512, program=_humaneval_program,
                       target_delimiter="", dir_names=("openai/openai_humaneval", "openai_humaneval")),
        GenerativeTask("mbpp", "MBPP", CODE, ("google-research-datasets/mbpp", "full"), "test", _mbpp_question,
                       lambda d: f"{d['code']}\n[DONE]", lambda d: d["test_list"], ("[DONE]",), 512,
                       fewshot_split="prompt", fewshot_ids=(2, 3, 4), default_fewshot=3, target_delimiter="",
                       program=_mbpp_program, dir_names=("google-research-datasets/mbpp/full", "mbpp/full",
                                                         "google-research-datasets/mbpp")),
    ]
}  # fmt: skip
GENERATIVE_ALIASES = {"nq": "nq_open", "naturalquestions": "nq_open", "natural_questions": "nq_open",
                      "trivia_qa": "triviaqa", "minerva_math": "math", "hendrycks_math": "math",
                      "human_eval": "humaneval", "openai_humaneval": "humaneval"}  # fmt: skip
GROUPS = {"generative": list(GENERATIVE_TASKS), "qa": ["nq_open", "triviaqa"], "code": ["humaneval", "mbpp"]}


def get_generative_task(name: str) -> GenerativeTask | None:
    """The generative task called `name` (or an alias), else None."""
    key = name.strip().lower()
    return GENERATIVE_TASKS.get(GENERATIVE_ALIASES.get(key, key))


def split_tasks(spec: str) -> tuple[list[Any], list[GenerativeTask]]:
    """The multiple-choice and the generative tasks of a comma-separated list. Groups: "all" (every
    multiple-choice task), "zeroshot" (all but MMLU), "generative", "qa", "code"."""
    from .tasks import TASKS, get_task, parse_tasks

    choice, generative = [], []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.lower() in GROUPS:
            generative += [GENERATIVE_TASKS[n] for n in GROUPS[part.lower()]]
        elif (task := get_generative_task(part)) is not None:
            generative.append(task)
        elif part.lower() in ("all", "zeroshot"):
            choice += parse_tasks(part.lower())
        else:
            try:
                choice.append(get_task(part))
            except ValueError:
                names = [*TASKS, *GENERATIVE_TASKS, "all", "zeroshot", *GROUPS]
                raise ValueError(f"unknown task {part!r}; choose from {', '.join(names)}") from None
    if not choice and not generative:
        raise ValueError("no tasks given")
    return list({t.name: t for t in choice}.values()), list({t.name: t for t in generative}.values())
