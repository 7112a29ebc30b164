"""Preference-tune SmolLM2-135M-Instruct with DPO (LoRA, CPU) toward a format it does not prefer at first: short
questions answered with a JSON object, ``{"answer": "Lima"}``, instead of its usual sentence.

Synthetic pairs (fixed seed): a short factual question, the chosen answer as JSON and the rejected one the same fact
in the model's own style ("The capital of Peru is Lima."). Training pairs come from three question types (capitals,
colors, past tenses); the held-out pairs use values of those types never trained on and two types never seen in
training at all (opposites, plurals), so the model must learn the format, not the answers. Reports, before and
after training, on the held-out pairs only:

- held-out preference accuracy: the share of pairs whose chosen response the model itself prefers, by its mean
  log-probability per response token (length-normalised, so that neither side wins by being shorter); also the
  same by summed log-probabilities, and after training DPO's reward accuracy (TRL's ``rewards/accuracies``: the
  log-ratio to the reference, the base, is higher for chosen; 0% before, when policy and reference are one);
- the held-out greedy answers, checked by an exact, content-aware rule: an answer passes when it is a JSON object
  whose only key is "answer" and whose value contains the question's expected fact (word for word, any case);
  the format and the fact are also counted apart. Win rate after vs before, per question: win, tie or loss;

and the training time, tokens/s, peak memory (RSS) and the machine's load average. The run uses
``recipes/dpo-lora.yaml`` with the options below as overrides.

    python benchmarks/bench_dpo.py [--steps 60] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

SECTION = "## Preference tuning (DPO with LoRA on SmolLM2)"
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "dpo-lora.yaml"
COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa",
             "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi", "Spain": "Madrid",
             "Italy": "Rome", "Ghana": "Accra", "Cuba": "Havana", "Nepal": "Kathmandu", "Poland": "Warsaw",
             "Greece": "Athens", "Austria": "Vienna", "Turkey": "Ankara", "Mexico": "Mexico City",
             "Portugal": "Lisbon"}  # fmt: skip
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a carrot": "orange",
          "a strawberry": "red", "a frog": "green", "chocolate": "brown", "a cloud": "white"}  # fmt: skip
PAST = {"go": "went", "eat": "ate", "see": "saw", "run": "ran", "write": "wrote", "swim": "swam", "buy": "bought",
        "think": "thought", "sing": "sang", "drink": "drank", "teach": "taught", "fly": "flew", "speak": "spoke",
        "catch": "caught"}  # fmt: skip
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
             "open": "closed", "up": "down", "young": "old", "full": "empty", "strong": "weak",
             "rich": "poor"}  # fmt: skip
PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
           "city": "cities"}  # fmt: skip
SUMS = [(a, b) for a in range(2, 40) for b in range(2, 40)]
HELD_OUT_VALUES = {"capital": 6, "color": 4, "past": 4}  # per trained type: values kept out of training


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def question_bank() -> dict[str, list[tuple[str, str, str]]]:
    """Per question type: (question, its expected fact, the answer as a plain sentence)."""
    return {
        "capital": [(f"What is the capital of {k}?", v, f"The capital of {k} is {v}.") for k, v in COUNTRIES.items()],
        "color": [(f"What color is {k}?", v, f"{_cap(k)} is {v}.") for k, v in COLORS.items()],
        "past": [(f"What is the past tense of {k}?", v, f"The past tense of {k} is {v}.") for k, v in PAST.items()],
        "sum": [(f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} equals {a + b}.") for a, b in SUMS],
        "opposite": [
            (f"What is the opposite of {k}?", v, f"The opposite of {k} is {v}.") for k, v in OPPOSITES.items()
        ],
        "plural": [(f"What is the plural of {k}?", v, f"The plural of {k} is {v}.") for k, v in PLURALS.items()],
    }


def as_json(fact: str) -> str:
    return json.dumps({"answer": fact})


def make_pairs(seed: int, n_train: int) -> tuple[list[dict], list[dict], list[str]]:
    """(training pairs, held-out pairs, the held-out questions' facts). Training draws a type (capital, color,
    past tense, sum), then a question of it; the held-out questions are the values of those types kept out
    (HELD_OUT_VALUES; the sums are training only: the model cannot add, so they test no fact) and every opposite
    and plural, two types never trained on. No held-out question is ever a training prompt."""
    rng = random.Random(seed)
    bank = question_bank()
    train_q: dict[str, list[tuple[str, str, str]]] = {}
    held_q: list[tuple[str, str, str]] = []
    for kind in ("capital", "color", "past", "sum"):
        items = bank[kind][:]
        rng.shuffle(items)
        k = HELD_OUT_VALUES.get(kind, 0)
        train_q[kind], held = items[k:], items[:k]
        held_q += held
    held_q += bank["opposite"] + bank["plural"]
    kinds = sorted(train_q)
    train = [rng.choice(train_q[rng.choice(kinds)]) for _ in range(n_train)]

    def pair(q: tuple[str, str, str]) -> dict:
        return {"prompt": q[0], "chosen": as_json(q[1]), "rejected": q[2]}

    return [pair(q) for q in train], [pair(q) for q in held_q], [q[1] for q in held_q]


# The exact rule -------------------------------------------------------------------------------------------------
def json_answer(text: str) -> str | None:
    """The answer when ``text`` is exactly a JSON object {"answer": <string>}, else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str):
        return value["answer"]
    return None


def has_fact(text: str, fact: str) -> bool:
    """The fact appears in ``text`` as whole words, in any case."""
    return re.search(rf"(?<!\w){re.escape(fact)}(?!\w)", text, re.IGNORECASE) is not None


def passes(text: str, fact: str) -> bool:
    """The rule: the preferred format (a JSON object whose only key is "answer") AND the question's fact in it."""
    answer = json_answer(text)
    return answer is not None and has_fact(answer, fact)


def win_tie_loss(after_ok: list[bool], before_ok: list[bool]) -> tuple[int, int, int]:
    wins = sum(a and not b for a, b in zip(after_ok, before_ok))
    losses = sum(b and not a for a, b in zip(after_ok, before_ok))
    return wins, len(after_ok) - wins - losses, losses


# Measures ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def response_logps(model, pairs, pad_id: int, batch: int = 8) -> dict[str, torch.Tensor]:
    """Each pair's summed response log-probabilities under ``model`` ("chosen", "rejected") and its scored
    response tokens ("n_chosen", "n_rejected")."""
    from llamaforge.train.dpo import sequence_logps
    from llamaforge.train.preference import collate_pairs

    model.eval()
    out: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "n_chosen": [], "n_rejected": []}
    for lo in range(0, len(pairs), batch):
        b = collate_pairs(pairs[lo : lo + batch], pad_id)
        logps, counts = sequence_logps(model, b["tokens"], b["targets"])
        for key, value in zip(("chosen", "rejected"), logps.chunk(2)):
            out[key].append(value)
        for key, value in zip(("n_chosen", "n_rejected"), counts.chunk(2)):
            out[key].append(value)
    return {k: torch.cat(v) for k, v in out.items()}


def preference_accuracy(lp: dict[str, torch.Tensor], normalise: bool = True) -> float:
    """The share of pairs whose chosen response the model prefers: a higher mean log-probability per response
    token (``normalise``), or a higher summed log-probability."""
    c, r = lp["chosen"], lp["rejected"]
    if normalise:
        c, r = c / lp["n_chosen"].clamp(min=1), r / lp["n_rejected"].clamp(min=1)
    return float((c > r).float().mean())


def generations(llm, pairs, max_new_tokens: int) -> list[str]:
    llm.model.eval()
    outs = llm.generate([p.prompt for p in pairs], max_new_tokens=max_new_tokens, temperature=0, max_batch=16)
    llm.clear_cache()
    return [o.text.strip() for o in outs]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-pairs", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument(
        "--rpo-alpha",
        type=float,
        default=None,
        help="add this weight x the chosen responses' NLL (finetune.rpo_alpha; default: the recipe's; 0: plain DPO)",
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: a tenth of the steps)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, help="update this RESULTS.md's preference-tuning section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)

    import llamaforge
    from llamaforge.train.lora import merge_lora
    from llamaforge.train.preference import load_pairs
    from llamaforge.train.sft import FinetuneRecipe, finetune

    started = time.perf_counter()
    train, held, facts = make_pairs(args.seed, args.train_pairs)
    n = len(held)
    with tempfile.TemporaryDirectory() as tmp:
        train_file, held_file = Path(tmp) / "train.jsonl", Path(tmp) / "held.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
        held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
        # "before" on a model of its own: generating prepares a model's weights for inference (not for training)
        base = llamaforge.load(args.model, dtype=torch.float32)
        held_pairs, _ = load_pairs(held_file, base.tokenizer, 256)
        assert len(held_pairs) == n, "every held-out pair must load"
        pad_id = base.tokenizer.eos_id
        before = response_logps(base.model, held_pairs, pad_id)
        gen_before = generations(base, held_pairs, args.max_new_tokens)
        rule = sum(passes(t, f) for t, f in zip(gen_before, facts))
        print(f"before: preference accuracy {preference_accuracy(before):.1%} (per token), "
              f"{preference_accuracy(before, False):.1%} (summed); rule {rule}/{n}; e.g. {gen_before[0]!r}",
              flush=True)  # fmt: skip
        del base

        llm = llamaforge.load(args.model, dtype=torch.float32)
        overrides = {"model.from_checkpoint": args.model, "finetune.data": str(train_file),
                     "finetune.val_data": str(held_file), "finetune.val_fraction": 0.0,
                     "finetune.dpo_loss": "sigmoid", "finetune.dpo_beta": args.beta, "finetune.lora_r": args.rank,
                     "finetune.lora_alpha": 2 * args.rank, "data.seq_len": 256,
                     "data.micro_batch_size": args.micro_batch, "data.grad_accum_steps": args.grad_accum,
                     "train.steps": args.steps, "optim.lr": args.lr, "optim.warmup_steps": warmup,
                     "train.out_dir": str(Path(tmp) / "run"), "train.eval_interval": 0, "train.log_interval": 5,
                     "train.save": False, "train.seed": args.seed}  # fmt: skip
        if args.rpo_alpha is not None:
            overrides["finetune.rpo_alpha"] = args.rpo_alpha
        recipe = FinetuneRecipe.load(RECIPE, overrides)
        t0 = time.perf_counter()
        summary = finetune(recipe, llm=llm, progress=False)
        train_s = time.perf_counter() - t0
    after = response_logps(llm.model, held_pairs, pad_id)
    # DPO's implicit reward margin on the held-out pairs, the base (the "before" model) as the reference
    margins = args.beta * ((after["chosen"] - before["chosen"]) - (after["rejected"] - before["rejected"]))
    # the inference engine runs plain linears: fold the adapters into the weights (merge_lora), as export does,
    # and check that the merged model scores the pairs as the adapted one did
    merge_lora(llm.model)
    merged = response_logps(llm.model, held_pairs, pad_id)
    merge_error = max(float((merged[k] - after[k]).abs().max()) for k in ("chosen", "rejected"))
    gen_after = generations(llm, held_pairs, args.max_new_tokens)

    def rule_counts(texts: list[str]) -> dict[str, int]:
        return {"format": sum(json_answer(t) is not None for t in texts),
                "fact": sum(has_fact(t, f) for t, f in zip(texts, facts)),
                "rule": sum(passes(t, f) for t, f in zip(texts, facts))}  # fmt: skip

    rb, ra = rule_counts(gen_before), rule_counts(gen_after)
    knew = [has_fact(t, f) for t, f in zip(gen_before, facts)]  # the facts the base states in its own style
    kept = sum(k and has_fact(t, f) for k, t, f in zip(knew, gen_after, facts))
    wins, ties, losses = win_tie_loss([passes(t, f) for t, f in zip(gen_after, facts)],
                                      [passes(t, f) for t, f in zip(gen_before, facts)])  # fmt: skip
    tokens = sum(h["tokens"] for h in summary["history"])
    load_avg = os.getloadavg()
    result = {"model": args.model, "steps": args.steps, "pairs_seen": round(summary["epochs"] * summary["examples"]),
              "held_out_pairs": n, "lora_rank": args.rank, "trainable_params": summary["trainable_params"],
              "n_params": summary["n_params"], "beta": args.beta, "rpo_alpha": recipe.finetune.rpo_alpha,
              "lr": args.lr, "warmup": warmup,
              "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
              "preference_accuracy_before": preference_accuracy(before),
              "preference_accuracy_after": preference_accuracy(after),
              "summed_preference_accuracy_before": preference_accuracy(before, False),
              "summed_preference_accuracy_after": preference_accuracy(after, False),
              "reward_accuracy_after": float((margins > 0).float().mean()),
              "reward_margin_after": float(margins.mean()),
              "val_rewards_accuracies": summary.get("val_rewards/accuracies"), "merge_max_logp_error": merge_error,
              "rule_before": rb, "rule_after": ra, "facts_known_before": sum(knew), "facts_kept_after": kept,
              "wins": wins, "ties": ties, "losses": losses, "win_rate": wins / n,
              "first_loss": summary["history"][0]["loss"], "final_loss": summary["loss"],
              "first_nll": summary["history"][0].get("nll_loss"), "final_nll": summary.get("nll_loss"),
              "losses_logged": [round(h["loss"], 4) for h in summary["history"]][:: max(1, args.steps // 12)],
              "train_s": train_s, "tokens": tokens, "tokens_per_s": tokens / train_s, "peak_rss_mib": peak_rss_mib(),
              "total_s": time.perf_counter() - started, "load_average": load_avg, "threads": args.threads,
              "generations": [[p["prompt"], b, a] for p, b, a in zip(held, gen_before, gen_after)],
              }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.results:
        write_results(args, result)
        print(f"updated {args.results}")
    return 0


def _commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


def write_results(args: argparse.Namespace, r: dict) -> None:
    from results import replace_section

    n, rb, ra = r["held_out_pairs"], r["rule_before"], r["rule_after"]
    shown = r["generations"][:: max(1, n // 7)][:7]
    samples = "\n".join(f"| {q} | `{b}` | `{a}` |" for q, b, a in shown)
    load = r["load_average"]
    rpo = f" + rpo_alpha {r['rpo_alpha']:g} x the chosen responses' NLL (RPO)" if r["rpo_alpha"] is not None else ""
    nll = (
        (
            f"\n| NLL of the chosen responses (`nll_loss`): first step, last step | {r['first_nll']:.3f}, "
            f"{r['final_nll']:.3f} |"
        )
        if r["first_nll"] is not None
        else ""
    )
    body = f"""{SECTION}

Preference-tuning `smollm2-135m-instruct` (the built-in GGUF Q4_1, dequantized to float32) toward a format it does
not prefer at first: a short factual question answered with a JSON object, `{{"answer": "Lima"}}`, instead of its usual
sentence ("The capital of Peru is Lima.", the rejected side). Synthetic pairs (seed {args.seed}): training draws
capitals, colors, past tenses and sums; the {n} held-out pairs are capitals, colors and past tenses never trained on
and two question types never seen in training (opposites, plurals). `recipes/dpo-lora.yaml` with these overrides:
sigmoid loss, beta {r["beta"]:g}{rpo}, LoRA r={r["lora_rank"]}, alpha={2 * r["lora_rank"]} on wq,wk,wv,wo,w1,w2,w3 (the
reference is the base with the adapters off), lr {r["lr"]:g} ({r["warmup"]} warm-up steps, cosine to 0),
{r["steps"]} steps of {r["micro_batch"] * r["grad_accum"]} pairs, CPU fp32, torch threads: {r["threads"]}.

| held-out pairs ({n}) | before | after |
|---|---|---|
| **preference accuracy**: the model's mean log-probability per response token is higher for chosen | \
{r["preference_accuracy_before"]:.1%} | **{r["preference_accuracy_after"]:.1%}** |
| the same by summed log-probabilities | {r["summed_preference_accuracy_before"]:.1%} | \
{r["summed_preference_accuracy_after"]:.1%} |
| DPO reward accuracy (`rewards/accuracies`: log-ratio to the base higher for chosen) | 0% (policy = reference) | \
{r["reward_accuracy_after"]:.1%} |
| greedy answers in the format (exactly `{{"answer": "..."}}`) | {rb["format"]} / {n} | {ra["format"]} / {n} |
| greedy answers containing the question's fact | {rb["fact"]} / {n} | {ra["fact"]} / {n} |
| **greedy answers passing the rule** (the format AND the fact in its answer) | {rb["rule"]} / {n} | \
**{ra["rule"]} / {n}** |
| of the {r["facts_known_before"]} questions whose fact the base states: the fact still there after | - | \
{r["facts_kept_after"]} / {r["facts_known_before"]} |

Win rate of the answers after vs before by that rule, per question: {r["wins"]} wins, {r["ties"]} ties,
{r["losses"]} losses of {n} (**{r["win_rate"]:.1%} wins**).

| | value |
|---|---|
| {"loss (DPO + rpo_alpha x NLL)" if nll else "DPO loss"}: first step, last step | {r["first_loss"]:.3f}, \
{r["final_loss"]:.3f} |{nll}
| held-out DPO reward margin after (beta x log-ratio difference) | {r["reward_margin_after"]:.2f} |
| pairs seen | {r["pairs_seen"]} |
| trainable parameters | {r["trainable_params"]:,} of {r["n_params"]:,} |
| training time | {r["train_s"]:.0f} s ({r["tokens"]:,} tokens, chosen and rejected; one held-out evaluation) |
| training throughput | {r["tokens_per_s"]:.0f} tokens/s (the reference forward included) |
| peak memory (process RSS) | {r["peak_rss_mib"]:.0f} MiB |
| merged adapters vs adapted model: largest held-out log-probability difference | {r["merge_max_logp_error"]:.1e} |

| held-out question | before | after |
|---|---|---|
{samples}

Measured {time.strftime("%Y-%m-%d")} at commit {_commit()} with
`python benchmarks/bench_dpo.py {" ".join(sys.argv[1:])}` (the whole script took {r["total_s"] / 60:.0f} minutes) on
x86_64 Linux, {os.cpu_count()} CPUs shared with other jobs; load average at the end {load[0]:.1f} / {load[1]:.1f} /
{load[2]:.1f} (1/5/15 min). The generations after training run on the model with the adapters merged into the
weights (the inference engine runs plain linears).
"""
    replace_section(body, path=args.results)


if __name__ == "__main__":
    sys.exit(main())
