"""Teach SmolLM2-135M-Instruct a skill it lacks with LoRA on CPU: extracting a person's name, age and city from
a sentence as JSON in a fixed schema (``{"name": ..., "age": ..., "city": ...}``, exact string).

Data is synthetic (fixed seed): the held-out set uses names and cities that never appear in training, so the
model must learn the format and the copying, not memorize values. Reports exact-match accuracy on the held-out
set before and after fine-tuning, training tokens/s, peak memory (RSS) and the machine's load average.

    python benchmarks/bench_finetune.py [--steps 60] [--results benchmarks/RESULTS.md]
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

SECTION = "## Fine-tuning (LoRA on SmolLM2)"
NAMES = [
    "Maria",
    "Liam",
    "Olivia",
    "Noah",
    "Emma",
    "Ava",
    "Sophia",
    "Lucas",
    "Mia",
    "Ethan",
    "Amelia",
    "Mason",
    "Harper",
    "Elijah",
    "Evelyn",
    "Logan",
    "Abigail",
    "James",
    "Emily",
    "Benjamin",
    "Ella",
    "Jacob",
    "Chloe",
    "Michael",
    "Grace",
    "Daniel",
    "Zoe",
    "Henry",
    "Nora",
    "Samuel",
    "Lily",
    "Owen",
    "Hannah",
    "Leo",
    "Aria",
    "Jack",
    "Ruby",
    "Levi",
    "Alice",
    "Isaac",
    "Clara",
    "Hugo",
    "Ines",
    "Tomas",
    "Yuki",
    "Omar",
    "Priya",
    "Kofi",
    "Ingrid",
    "Mateo",
    "Leila",
    "Dmitri",
    "Sven",
    "Aiko",
    "Rafael",
    "Nadia",
    "Kenji",
    "Fatima",
    "Pablo",
    "Astrid",
]
CITIES = [
    "Paris",
    "London",
    "Berlin",
    "Madrid",
    "Rome",
    "Vienna",
    "Prague",
    "Lisbon",
    "Dublin",
    "Oslo",
    "Stockholm",
    "Helsinki",
    "Warsaw",
    "Athens",
    "Cairo",
    "Nairobi",
    "Lagos",
    "Tokyo",
    "Seoul",
    "Osaka",
    "Sydney",
    "Perth",
    "Toronto",
    "Denver",
    "Boston",
    "Chicago",
    "Austin",
    "Seattle",
    "Lima",
    "Quito",
    "Bogota",
    "Havana",
    "Mumbai",
    "Delhi",
    "Dhaka",
    "Hanoi",
    "Manila",
    "Jakarta",
    "Auckland",
    "Zurich",
    "Geneva",
    "Munich",
    "Hamburg",
    "Porto",
    "Seville",
    "Naples",
    "Krakow",
    "Riga",
]
TEMPLATES = (
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} just turned {age}.",
    "At {age}, {name} moved to {city} for work.",
    "{name}, aged {age}, calls {city} home.",
    "My neighbor {name} is {age}; she grew up in {city}.",
    "Born {age} years ago, {name} still lives in {city}.",
    "{city} is where {name} ({age}) has lived since childhood.",
    "Last week {name} celebrated turning {age} in {city}.",
)
INSTRUCTION = "Extract the person's name, age and city from the text. Answer with JSON only, with keys name, age, city."


def make_example(rng: random.Random, names: list[str], cities: list[str]) -> dict[str, str]:
    name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 90)
    text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"instruction": INSTRUCTION, "input": f"Text: {text}", "output": answer}


def make_data(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    names, cities = list(NAMES), list(CITIES)
    rng.shuffle(names)
    rng.shuffle(cities)
    k_n, k_c = len(names) * 3 // 4, len(cities) * 3 // 4  # the rest are held out: unseen in training
    train = [make_example(rng, names[:k_n], cities[:k_c]) for _ in range(n_train)]
    test = [make_example(rng, names[k_n:], cities[k_c:]) for _ in range(n_test)]
    return train, test


def accuracy(llm, test: list[dict], max_new_tokens: int = 24) -> tuple[float, list[str]]:
    from llamaforge.inference import chat_prompt_ids

    llm.model.eval()
    prompts = [chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": f"{ex['instruction']}\n\n{ex['input']}"}])
               for ex in test]  # fmt: skip
    outs = llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=0, max_batch=16)
    texts = [o.text.strip() for o in outs]
    hits = sum(t == ex["output"] for t, ex in zip(texts, test))
    llm.clear_cache()  # free the KV cache before training
    return hits / len(test), texts


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(path: Path, body: str) -> None:
    from results import replace_section

    replace_section(body, path=path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--test-examples", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, help="update this RESULTS.md's fine-tuning section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import llamaforge
    from llamaforge.train.lora import merge_lora
    from llamaforge.train.sft import FinetuneRecipe, finetune

    t0 = time.perf_counter()
    llm = llamaforge.load(args.model, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    train, test = make_data(args.seed, args.train_examples, args.test_examples)
    t0 = time.perf_counter()
    before, before_texts = accuracy(llm, test)
    eval_s = time.perf_counter() - t0
    print(f"before: exact match {before:.1%} ({eval_s:.0f} s); e.g. {before_texts[0]!r}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(ex) + "\n" for ex in train))
        overrides = {"model.from_checkpoint": args.model, "finetune.data": str(data), "finetune.method": "lora",
                     "finetune.lora_r": args.rank, "finetune.lora_alpha": 2 * args.rank, "finetune.lora_dropout": 0.0,
                     "finetune.val_fraction": 0.0, "data.seq_len": args.seq_len,
                     "data.micro_batch_size": args.micro_batch, "train.steps": args.steps, "optim.lr": args.lr,
                     "optim.warmup_steps": max(1, args.steps // 10), "train.out_dir": str(Path(tmp) / "run"),
                     "train.ckpt_interval": 0, "train.eval_interval": 0, "train.log_interval": 5,
                     "train.seed": args.seed}  # fmt: skip
        recipe = FinetuneRecipe.load(None, {k: v for k, v in overrides.items()})
        t0 = time.perf_counter()
        summary = finetune(recipe, llm=llm, progress=False)
        train_s = time.perf_counter() - t0
        adapter_bytes = sum(f.stat().st_size for f in Path(summary["export_dir"]).iterdir())
    tokens = sum(h["tokens"] for h in summary["history"])
    after, after_texts = accuracy(llm, test)
    print(f"after: exact match {after:.1%}; e.g. {after_texts[0]!r}", flush=True)

    # The merged model answers the same: one prompt's logits, unmerged vs merged.
    ids = torch.tensor([llm.tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        unmerged = llm.model(ids)
        merge_lora(llm.model)
        merged = llm.model(ids)
    merge_diff = float((unmerged - merged).abs().max())
    load_avg = os.getloadavg()
    seen = round(summary["epochs"] * summary["examples"])
    result = {"model": args.model, "steps": args.steps, "train_examples_seen": seen,
              "lora_rank": args.rank, "trainable_params": summary["trainable_params"], "n_params": summary["n_params"],
              "accuracy_before": before, "accuracy_after": after, "test_examples": len(test), "train_s": train_s,
              "tokens": tokens, "tokens_per_s": tokens / train_s, "final_loss": summary["loss"],
              "first_loss": summary["history"][0]["loss"], "peak_rss_mib": peak_rss_mib(), "load_s": load_s,
              "eval_s": eval_s, "adapter_kib": adapter_bytes / 1024, "merge_max_logit_diff": merge_diff,
              "load_average": load_avg, "threads": args.threads}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.results:
        body = f"""{SECTION}

Teaching `smollm2-135m-instruct` (the built-in GGUF Q4_1, dequantized to float32) to extract a person's name, age and
city from a sentence as JSON in a fixed schema (`{{"name": ..., "age": ..., "city": ...}}`, compared as an exact
string). Synthetic data (seed {args.seed}); the {len(test)} held-out examples use names and cities never seen in
training. LoRA r={args.rank}, alpha={2 * args.rank} on wq,wk,wv,wo,w1,w2,w3, lr {args.lr:g}, {args.steps} steps of
{args.micro_batch} packed rows of up to {args.seq_len} tokens, loss on response tokens only, CPU fp32.

| | value |
|---|---|
| held-out exact match before | {before:.1%} |
| held-out exact match after | {after:.1%} |
| training examples seen | {result["train_examples_seen"]} |
| trainable parameters | {result["trainable_params"]:,} of {result["n_params"]:,} |
| loss (first step -> last) | {result["first_loss"]:.3f} -> {result["final_loss"]:.3f} |
| training time | {train_s:.0f} s |
| training throughput | {result["tokens_per_s"]:.0f} tokens/s |
| peak memory (process RSS) | {result["peak_rss_mib"]:.0f} MiB |
| adapter on disk | {result["adapter_kib"]:.0f} KiB |
| merged vs unmerged max logit difference | {merge_diff:.1e} |

Measured {time.strftime("%Y-%m-%d")} with `python benchmarks/bench_finetune.py {" ".join(sys.argv[1:])}`
on x86_64 Linux, {os.cpu_count()} CPUs shared with other jobs, {args.threads} torch threads;
load average during the run {load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} (1/5/15 min), so throughput
is lower than on an idle machine. Example answer after training: `{after_texts[0]}`.
"""
        write_results(args.results, body)
        print(f"updated {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
