"""Preference-tune SmolLM2-135M-Instruct with DPO (LoRA, CPU) toward a style it does not prefer at first: answers
written in capital letters.

Synthetic pairs (fixed seed): a question, the chosen answer in capitals ("THE CAPITAL OF PERU IS LIMA.") and the
rejected one, the same answer as usually written. The held-out pairs use question types and values never seen in
training, so the model must learn the style, not the answers. Reports, before and after training:

- held-out preference accuracy: the share of held-out pairs whose chosen response the model finds more likely
  than the rejected one (summed response log-probabilities under the model itself), and after training also DPO's
  reward accuracy on them (TRL's ``rewards/accuracies``: the policy/reference log-ratio is higher for chosen);
- the held-out generations' win rate by an exact rule: a greedy answer wins when it has at least two words and
  every letter in it is a capital; after vs before, per prompt: win, tie or loss;

and the training time, tokens/s, peak memory (RSS) and the machine's load average.

    python benchmarks/bench_dpo.py [--steps 40] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

SECTION = "## Preference tuning (DPO with LoRA on SmolLM2)"
COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa",
             "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi", "Spain": "Madrid",
             "Italy": "Rome", "Ghana": "Accra", "Cuba": "Havana", "Nepal": "Kathmandu", "Poland": "Warsaw",
             "Greece": "Athens", "Austria": "Vienna", "Turkey": "Ankara", "Mexico": "Mexico City",
             "Portugal": "Lisbon"}  # fmt: skip
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a carrot": "orange",
          "a strawberry": "red", "a frog": "green", "chocolate": "brown", "a cloud": "white"}  # fmt: skip
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
             "open": "closed", "up": "down", "young": "old", "full": "empty", "strong": "weak",
             "rich": "poor"}  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ANIMALS = {"a dog": "barks", "a cat": "meows", "a cow": "moos", "a duck": "quacks", "a lion": "roars",
           "a sheep": "bleats", "a horse": "neighs", "a pig": "oinks", "an owl": "hoots",
           "a snake": "hisses"}  # fmt: skip


def _capital(k, v):
    return f"What is the capital of {k}?", f"The capital of {k} is {v}."


def _color(k, v):
    return f"What color is {k}?", f"{k[0].upper() + k[1:]} is usually {v}."


def _sum(a, b):
    return f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."


def _opposite(k, v):
    return f"What is the opposite of {k}?", f"The opposite of {k} is {v}."


def _day(i, _):
    return f"Which day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."


def _animal(k, v):
    return f"What sound does {k} make?", f"{k[0].upper() + k[1:]} {v}."


def make_pairs(seed: int, n_train: int) -> tuple[list[dict], list[dict]]:
    """Training pairs from capitals, colors and sums (their first values); held out: the remaining capitals, colors
    and sums plus three question types never trained on (opposites, days, animal sounds)."""
    rng = random.Random(seed)
    caps, cols = list(COUNTRIES.items()), list(COLORS.items())
    rng.shuffle(caps)
    rng.shuffle(cols)
    sums = [(a, b) for a in range(2, 40) for b in range(2, 40)]
    rng.shuffle(sums)
    train_q = [_capital(*kv) for kv in caps[:14]] + [_color(*kv) for kv in cols[:10]]
    train_q += [_sum(*ab) for ab in sums[:200]]
    held_q = [_capital(*kv) for kv in caps[14:]] + [_color(*kv) for kv in cols[10:]]
    held_q += [_sum(*ab) for ab in sums[200:208]] + [_opposite(*kv) for kv in OPPOSITES.items()]
    held_q += [_day(i, None) for i in range(7)] + [_animal(*kv) for kv in ANIMALS.items()]
    train = [rng.choice(train_q) for _ in range(n_train)]

    def pair(q):
        return {"prompt": q[0], "chosen": q[1].upper(), "rejected": q[1]}

    return [pair(q) for q in train], [pair(q) for q in held_q]


def shouted(text: str) -> bool:
    """The exact rule: at least two words, and no letter that is not a capital."""
    letters = [c for c in text if c.isalpha()]
    return len(text.split()) >= 2 and bool(letters) and all(c.isupper() for c in letters)


@torch.no_grad()
def own_preference(model, pairs, pad_id: int, batch: int = 8) -> float:
    """Share of pairs whose chosen response the model finds more likely than the rejected one."""
    from llamaforge.train.dpo import sequence_logps
    from llamaforge.train.preference import collate_pairs

    model.eval()
    wins = 0
    for lo in range(0, len(pairs), batch):
        b = collate_pairs(pairs[lo : lo + batch], pad_id)
        logps, _ = sequence_logps(model, b["tokens"], b["targets"])
        chosen, rejected = logps.chunk(2)
        wins += int((chosen > rejected).sum())
    return wins / len(pairs)


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
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--train-pairs", type=int, default=400)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, help="update this RESULTS.md's preference-tuning section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import llamaforge
    from llamaforge.train.preference import load_pairs
    from llamaforge.train.sft import FinetuneRecipe, finetune

    started = time.perf_counter()
    train, held = make_pairs(args.seed, args.train_pairs)
    with tempfile.TemporaryDirectory() as tmp:
        train_file, held_file = Path(tmp) / "train.jsonl", Path(tmp) / "held.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in train))
        held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
        # "before" on a model of its own: generating prepares a model's weights for inference (not for training)
        base = llamaforge.load(args.model, dtype=torch.float32)
        held_pairs, _ = load_pairs(held_file, base.tokenizer, 256)
        pad_id = base.tokenizer.eos_id
        t0 = time.perf_counter()
        pref_before = own_preference(base.model, held_pairs, pad_id)
        gen_before = generations(base, held_pairs, args.max_new_tokens)
        eval_s = time.perf_counter() - t0
        print(f"before: preference accuracy {pref_before:.1%}, rule {sum(map(shouted, gen_before))}/{len(held)} "
              f"({eval_s:.0f} s); e.g. {gen_before[0]!r}", flush=True)  # fmt: skip
        del base

        llm = llamaforge.load(args.model, dtype=torch.float32)

        overrides = {"model.from_checkpoint": args.model, "finetune.objective": "dpo", "finetune.method": "lora",
                     "finetune.data": str(train_file), "finetune.val_data": str(held_file),
                     "finetune.dpo_beta": args.beta, "finetune.lora_r": args.rank,
                     "finetune.lora_alpha": 2 * args.rank, "finetune.lora_dropout": 0.0, "data.seq_len": 256,
                     "data.micro_batch_size": args.micro_batch, "train.steps": args.steps, "optim.lr": args.lr,
                     "optim.warmup_steps": max(1, args.steps // 10), "train.out_dir": str(Path(tmp) / "run"),
                     "train.eval_interval": 0, "train.log_interval": 5, "train.save": False,
                     "train.seed": args.seed}  # fmt: skip
        recipe = FinetuneRecipe.load(None, overrides)
        t0 = time.perf_counter()
        summary = finetune(recipe, llm=llm, progress=False)
        train_s = time.perf_counter() - t0
    pref_after = own_preference(llm.model, held_pairs, pad_id)
    gen_after = generations(llm, held_pairs, args.max_new_tokens)
    before_ok, after_ok = [shouted(t) for t in gen_before], [shouted(t) for t in gen_after]
    wins = sum(a and not b for a, b in zip(after_ok, before_ok))
    losses = sum(b and not a for a, b in zip(after_ok, before_ok))
    ties = len(held) - wins - losses
    tokens = sum(h["tokens"] for h in summary["history"])
    load_avg = os.getloadavg()
    result = {"model": args.model, "steps": args.steps, "pairs_seen": round(summary["epochs"] * summary["examples"]),
              "held_out_pairs": len(held), "lora_rank": args.rank, "trainable_params": summary["trainable_params"],
              "n_params": summary["n_params"], "beta": args.beta, "lr": args.lr,
              "preference_accuracy_before": pref_before, "preference_accuracy_after": pref_after,
              "reward_accuracy_after": summary.get("val_rewards/accuracies"),
              "reward_margin_after": summary.get("val_rewards/margins"), "rule_before": sum(before_ok),
              "rule_after": sum(after_ok), "wins": wins, "ties": ties, "losses": losses, "win_rate": wins / len(held),
              "first_loss": summary["history"][0]["loss"], "final_loss": summary["loss"],
              "val_loss": summary["val_loss"], "train_s": train_s, "tokens": tokens,
              "tokens_per_s": tokens / train_s, "peak_rss_mib": peak_rss_mib(),
              "total_s": time.perf_counter() - started, "load_average": load_avg, "threads": args.threads,
              "examples": [[held[i]["prompt"], gen_before[i], gen_after[i]] for i in range(0, len(held), 9)],
              }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.results:
        from results import replace_section

        n, reward_acc, val_loss = len(held), result["reward_accuracy_after"], result["val_loss"]
        samples = "\n".join(f"| {q} | `{b}` | `{a}` |" for q, b, a in result["examples"][:5])
        body = f"""{SECTION}

Preference-tuning `smollm2-135m-instruct` (the built-in GGUF Q4_1, dequantized to float32) toward answers in capital
letters, a style it does not prefer at first. Synthetic pairs (seed {args.seed}): a question, the chosen answer in
capitals, the rejected one as usually written. The {len(held)} held-out pairs use values and three question types
(opposites, days, animal sounds) never seen in training. `finetune --method dpo`: sigmoid loss, beta {args.beta:g},
LoRA r={args.rank}, alpha={2 * args.rank} on wq,wk,wv,wo,w1,w2,w3 (the reference is the base with the adapters
off), lr {args.lr:g}, {args.steps} steps of {args.micro_batch} pairs, CPU fp32, {args.threads} torch threads.

| held-out | before | after |
|---|---|---|
| preference accuracy (the model's own log-probabilities: chosen > rejected) | {pref_before:.1%} | {pref_after:.1%} |
| DPO reward accuracy (`rewards/accuracies`: log-ratio to the reference) | 0% (all ties) | {reward_acc:.1%} |
| greedy answers passing the rule (>= 2 words, all letters capitals) | {sum(before_ok)} / {n} | {sum(after_ok)} / {n} |

Win rate of the answers after vs before, by that rule: {wins} wins, {ties} ties, {losses} losses of {len(held)}
({wins / len(held):.1%} wins).

| | value |
|---|---|
| DPO loss: first step, last step, held-out | {result["first_loss"]:.3f}, {result["final_loss"]:.3f}, {val_loss:.3f} |
| pairs seen | {result["pairs_seen"]} |
| trainable parameters | {result["trainable_params"]:,} of {result["n_params"]:,} |
| training time | {train_s:.0f} s ({tokens:,} tokens: chosen and rejected sequences) |
| training throughput | {result["tokens_per_s"]:.0f} tokens/s (the reference forward included) |
| peak memory (process RSS) | {result["peak_rss_mib"]:.0f} MiB |

| held-out question | before | after |
|---|---|---|
{samples}

Measured {time.strftime("%Y-%m-%d")} with `python benchmarks/bench_dpo.py {" ".join(sys.argv[1:])}` (the whole
script took {result["total_s"] / 60:.0f} minutes) on x86_64 Linux, {os.cpu_count()} CPUs shared with other jobs; load
average at the end {load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} (1/5/15 min), so the times are those of
a busy machine.
"""
        replace_section(body, path=args.results)
        print(f"updated {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
