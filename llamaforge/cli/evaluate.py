"""Verbs `perplexity` and `eval`: thin wrappers over llamaforge.evaluate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    from .generate import add_tensor_parallel_argument

    p = subparsers.add_parser("perplexity", help="sliding-window perplexity, bits per byte and KL divergence",
                              description="Perplexity of --model on each FILE (UTF-8 text) with sliding windows of "
                              "--context tokens every --stride tokens; every token is scored once. With "
                              "--reference-model (same tokenizer), also the KL divergence from the reference's "
                              "distribution and how often both pick the same top token, as llama.cpp reports "
                              "for quantized models.")  # fmt: skip
    _model_args(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="text files ('-' reads stdin)")
    p.add_argument("--reference-model", metavar="MODEL", help="compare against this model (e.g. the unquantized one)")
    p.add_argument("--context", "-c", type=int, help="window length in tokens (default: min(model context, 2048))")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: half the context)")
    p.add_argument("--batch-size", "-b", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--no-bos", dest="bos", action="store_false",
                   help="do not start the text with BOS even if the tokenizer normally does")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(handler=_perplexity)

    p = subparsers.add_parser("eval", help="the LLaMA papers' benchmarks: multiple choice, QA, math and code",
                              description="Score --model on the LLaMA papers' benchmarks. Multiple-choice tasks are "
                              "scored by the log-likelihood of each answer, with the paper's normalizations (per "
                              "character; BoolQ and OpenBookQA against the likelihood after 'Answer:'): boolq, piqa, "
                              "siqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, mmlu ('zeroshot' = "
                              "all but mmlu, 'all'). Generative tasks are answered by the model and scored as their "
                              "papers do: nq_open and triviaqa (exact match), gsm8k (8-shot chain of thought, maj@k), "
                              "math (Minerva 4-shot), humaneval and mbpp (pass@k; the generated code runs in a "
                              "sandbox) ('generative', 'qa', 'code'). Data comes from --data-dir (the datasets' "
                              "JSONL/Parquet files as published on the Hugging Face hub) or the hub itself when "
                              "`datasets` is installed.")  # fmt: skip
    _model_args(p)
    p.add_argument("--tasks", "-t", required=True, help="comma-separated task names")
    p.add_argument(
        "--data-dir", metavar="DIR", help="directory with the task files, e.g. DIR/hellaswag/validation.jsonl"
    )
    p.add_argument("--num-fewshot", type=int, help="solved examples before each question (default: MMLU 5, GSM8K 8, "
                   "MATH 4, MBPP 3, others 0)")  # fmt: skip
    p.add_argument("--limit", type=int, help="score only the first N questions of each task")
    p.add_argument("--batch-size", "-b", type=int, default=16,
                   help="continuations per forward pass; generations decoded together (default 16)")  # fmt: skip
    p.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                   help="score each context+answer separately instead of running each context once")  # fmt: skip
    p.add_argument("--seed", type=int, default=1234, help="seed for choosing few-shot examples and for "
                   "sampling (sample j: seed + j; default 1234)")  # fmt: skip
    p.add_argument("--output", "-o", metavar="PATH", help="write the results as JSON")
    add_tensor_parallel_argument(p)
    p.add_argument("--log-samples", action="store_true", help="include every question's scores in the JSON")
    p.add_argument("--samples-file", metavar="PATH", help="write every question (prompt, generations, answers, "
                   "scores, sandbox outcomes) as a line of JSONL")  # fmt: skip
    g = p.add_argument_group("generative tasks")
    g.add_argument("--num-samples", "-n", type=int, default=1, help="generations per problem: maj@k for math, "
                   "pass@k for code (default 1: greedy)")  # fmt: skip
    g.add_argument("--temperature", type=float, help="sampling temperature (default: 0 with one sample; with more, "
                   "0.6 for math as in Minerva, 0.8 for code as in Codex and LLaMA)")  # fmt: skip
    g.add_argument("--top-p", type=float, help="nucleus sampling (default when sampling: 1 for math, 0.95 for code)")
    g.add_argument("--max-new-tokens", type=int, help="cut each generation here (default: QA 32, GSM8K 256, "
                   "MATH, HumanEval and MBPP 512)")  # fmt: skip
    g.add_argument("--pass-k", default="1,10,100", metavar="K,...",
                   help="pass@k values reported when there are at least k samples (default 1,10,100)")  # fmt: skip
    g.add_argument("--sandbox-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="wall-clock and CPU limit per program (default 10)")  # fmt: skip
    g.add_argument("--sandbox-memory", type=int, default=1024, metavar="MIB",
                   help="address-space limit per program (default 1024)")  # fmt: skip
    g.add_argument("--allow-weak-sandbox", action="store_true", help="run generated code even where the system "
                   "cannot keep it from your files and the network (resource limits only)")  # fmt: skip
    p.set_defaults(handler=_eval)


def _model_args(p: argparse.ArgumentParser) -> None:
    from .generate import add_model_arguments

    add_model_arguments(p, compile=False)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _load(args: argparse.Namespace, model: str | None = None) -> Any:
    from .generate import load_for_cli

    return load_for_cli(args, model)


def _read_text(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {name}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _perplexity(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..evaluate.perplexity import combine, perplexity, sliding_windows
    from ..evaluate.report import write_json

    for name, value in (("--context", args.context), ("--stride", args.stride), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be a positive number of tokens, got {value}")
    texts = [(name, _read_text(name)) for name in args.files]
    llm = _load(args)
    tokenizer = llm.require_tokenizer()
    reference = _load(args, args.reference_model) if args.reference_model else None
    if (
        reference is not None
        and reference.tokenizer is not None
        and reference.tokenizer.vocab_size != tokenizer.vocab_size
    ):
        raise UserError(f"--reference-model {args.reference_model} has a different tokenizer "
                        f"({reference.tokenizer.vocab_size} tokens vs {tokenizer.vocab_size})")  # fmt: skip
    limits = [llm.config.max_seq_len] + ([reference.config.max_seq_len] if reference else [])
    context = min(args.context or 2048, *limits)
    stride = args.stride or max(1, context // 2)
    if stride > context:
        raise UserError(f"--stride {stride} is longer than the context ({context})")
    bos = bool(args.bos and tokenizer.add_bos_default)
    encoded = [(name, tokenizer.encode(text, bos=bos), len(text.encode("utf-8"))) for name, text in texts]
    total_windows = sum(len(sliding_windows(len(ids), context, stride)) for _, ids, _ in encoded if len(ids) > 1)
    results = []
    with tqdm(total=total_windows, desc="perplexity", unit="window", disable=args.quiet) as bar:
        for name, ids, n_bytes in encoded:
            if len(ids) < 2:
                raise UserError(f"{name}: too short to score ({len(ids)} token)")
            results.append(perplexity(llm.model, ids, context=context, stride=stride, batch_size=args.batch_size,
                                      reference=reference.model if reference else None, n_bytes=n_bytes,
                                      progress=bar, name=name))  # fmt: skip
    if len(results) > 1:
        results.append(combine(results))
    print(_perplexity_table(results, context, stride))
    if args.json:
        data = {"model": args.model, "reference_model": args.reference_model, "context": context, "stride": stride,
                "results": [r.to_dict() for r in results]}  # fmt: skip
        write_json(args.json, data)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _perplexity_table(results: list, context: int, stride: int) -> str:
    with_kl = results[0].kl is not None
    header = ["File", "Tokens", "Windows", "PPL", "Bits/byte"]
    if with_kl:
        header += ["Ref PPL", "ln(PPL/Ref)", "Mean KLD", "Median KLD", "99% KLD", "Max KLD", "Same top-1"]
    lines = [
        f"context {context}, stride {stride}",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    for r in results:
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
        cells = [r.name, str(r.n_tokens), str(r.n_windows), f"{r.ppl:.4f} ± {r.ppl_stderr:.4f}", bpb]
        if with_kl:
            k = r.kl
            cells += [f"{k.reference_ppl:.4f}", f"{r.mean_nll - float(k.reference_nll.mean()):+.5f}",
                      f"{k.mean:.6f} ± {k.stderr:.6f}", f"{k.quantile(0.5):.6f}", f"{k.quantile(0.99):.6f}",
                      f"{float(k.kl.max()):.6f}", f"{100 * k.top1:.2f} ± {100 * k.top1_stderr:.2f}%"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from ..evaluate.generative import evaluate_generative
    from ..evaluate.generative_tasks import split_tasks
    from ..evaluate.report import generative_table, markdown_table, results_json, write_json, write_samples
    from ..evaluate.runner import evaluate_tasks
    from ..evaluate.sandbox import REQUIREMENTS, Sandbox, SandboxLimits
    from .generate import load_sharded_for_cli, start_tensor_parallel

    choice, generative = split_tasks(args.tasks)
    for name, value, low in (("--num-fewshot", args.num_fewshot, 0), ("--limit", args.limit, 1),
                             ("--batch-size", args.batch_size, 1), ("--num-samples", args.num_samples, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1)):  # fmt: skip
        if value is not None and value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    try:
        pass_k = [int(k) for k in args.pass_k.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--pass-k must be comma-separated integers, got {args.pass_k!r}") from None
    if not pass_k or min(pass_k) < 1:
        raise UserError(f"--pass-k values must be >= 1, got {args.pass_k!r}")
    if args.sandbox_timeout <= 0 or args.sandbox_memory <= 0:
        raise UserError("--sandbox-timeout and --sandbox-memory must be positive")
    tp = start_tensor_parallel(args)
    if tp is not None and not tp.is_leader:  # rank 0 evaluates; the other ranks run its steps on their part
        from ..inference.tensor_parallel import follow

        follow(load_sharded_for_cli(args, tp).model)
        return 0
    llm = _load(args) if tp is None else load_sharded_for_cli(args, tp)
    results = []
    if choice:
        results += evaluate_tasks(llm, choice, data_dir=args.data_dir, num_fewshot=args.num_fewshot, limit=args.limit,
                                  batch_size=args.batch_size, prefix_reuse=args.prefix_reuse, seed=args.seed,
                                  progress=not args.quiet)  # fmt: skip
        print(markdown_table(results))
    if generative:
        limits = SandboxLimits(timeout=args.sandbox_timeout, cpu_seconds=args.sandbox_timeout,
                               memory_bytes=args.sandbox_memory << 20)  # fmt: skip
        sandbox = Sandbox(limits, require=() if args.allow_weak_sandbox else REQUIREMENTS)
        gen_results = evaluate_generative(llm, generative, data_dir=args.data_dir, num_fewshot=args.num_fewshot,
                                          limit=args.limit, seed=args.seed, num_samples=args.num_samples,
                                          temperature=args.temperature, top_p=args.top_p,
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                          sandbox=sandbox, pass_k=pass_k, progress=not args.quiet)  # fmt: skip
        if choice:
            print()
        print(generative_table(gen_results))
        for r in gen_results:
            if r.extra.get("truncated_prompts"):
                print(f"note: {r.task}: {r.extra['truncated_prompts']} of {r.n} prompts did not fit the context with "
                      f"{r.extra['max_new_tokens']} new tokens and lost their beginning", file=sys.stderr)  # fmt: skip
            if "sandbox" in r.extra:
                print(f"note: {r.task}: generated code ran with {r.extra['sandbox']}", file=sys.stderr)
        results += gen_results
    if args.samples_file:
        write_samples(args.samples_file, results)
        print(f"wrote {args.samples_file}", file=sys.stderr)
    if args.output:
        config = {"model": args.model, "tasks": [t.name for t in [*choice, *generative]],
                  "num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size,
                  "prefix_reuse": args.prefix_reuse, "seed": args.seed, "data_dir": args.data_dir, "dtype": args.dtype,
                  "num_samples": args.num_samples, "temperature": args.temperature, "top_p": args.top_p,
                  "max_new_tokens": args.max_new_tokens, "pass_k": pass_k, "sandbox_timeout": args.sandbox_timeout,
                  "sandbox_memory_mib": args.sandbox_memory, "allow_weak_sandbox": args.allow_weak_sandbox}  # fmt: skip
        write_json(args.output, results_json(results, config, with_items=args.log_samples))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
