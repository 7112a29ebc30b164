"""CPU generation speed and quality: llamaforge vs llama.cpp vs Hugging Face transformers on SmolLM2-135M.

Every configuration runs in its own Python process (same machine, same thread count) and reports:
prefill tokens/s (a 512-token prompt), decode tokens/s (128 greedy tokens after it), peak resident
memory (``ru_maxrss``, which includes loading), perplexity on a fixed text (docstrings of Python's
``argparse`` module, ``--eval-tokens`` tokens) and the KL divergence of each configuration's next-token
distributions from llamaforge float32's.

Configurations: llamaforge float32 / bfloat16 / float16 / int8 / int4 (group 32) / the GGUF's own blocks (Q4_1
matrices, Q8_0 head) run quantized; transformers float32 / bfloat16 (``LlamaForCausalLM`` built from the
same dequantized weights); llama.cpp (``llama_cpp``) on GGUF files written from those weights (F32,
F16, Q8_0) and on the original Q4_1 file. Rows whose tool is missing are skipped with a note.

Results go to stdout and to the "## Generation speed (CPU)" section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_generate.py [--threads 2] [--only lf-f32,lf-int4] [--path fast] [--no-results]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Generation speed (CPU)"
LF_CONFIGS = ["lf-f32", "lf-bf16", "lf-f16", "lf-int8", "lf-int4", "lf-gguf"]
HF_CONFIGS = ["hf-f32", "hf-bf16"]
CPP_CONFIGS = ["cpp-F32", "cpp-F16", "cpp-Q8_0", "cpp-Q4_1"]
DESCRIPTIONS = {
    "lf-f32": "llamaforge float32",
    "lf-bf16": "llamaforge bfloat16",
    "lf-f16": "llamaforge float16",
    "lf-int8": "llamaforge int8 (per channel)",
    "lf-int4": "llamaforge int4 (group 32)",
    "lf-gguf": "llamaforge GGUF blocks (Q4_1, Q8_0 head)",
    "hf-f32": "transformers float32",
    "hf-bf16": "transformers bfloat16",
    "cpp-F32": "llama.cpp F32",
    "cpp-F16": "llama.cpp F16",
    "cpp-Q8_0": "llama.cpp Q8_0",
    "cpp-Q4_1": "llama.cpp Q4_1 (original file)",
}


def eval_text() -> str:
    """A fixed, few-KB English/code text: the docstrings of the argparse module, in source order."""
    import argparse as mod

    docs = [inspect.getdoc(mod) or ""]
    for _, obj in inspect.getmembers(mod):
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == "argparse":
            docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d)


# Workers (one configuration per process) --------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nll_and_kl(logprobs, tokens, work: Path, config: str) -> tuple[float, float | None]:
    """Perplexity of `tokens` from next-token log-probs [T, V]; KL(float32 || this) per token."""
    import torch

    lp = logprobs[:-1].float()
    nll = -lp.gather(1, tokens[1:, None]).mean().item()
    ref_file = work / "ref_logprobs.pt"
    if config == "lf-f32":
        torch.save(lp, ref_file)
        return nll, 0.0
    if not ref_file.exists():
        return nll, None
    ref = torch.load(ref_file)
    kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    return nll, kl


def _lf_model(config: str, gguf_path: Path):
    import torch

    from llamaforge.quantize import load_gguf_quantized, quantize_model

    if config == "lf-gguf":
        return load_gguf_quantized(gguf_path)
    import llamaforge

    dtype = {"lf-bf16": torch.bfloat16, "lf-f16": torch.float16}.get(config, torch.float32)
    model = llamaforge.load(gguf_path, dtype=dtype).model
    if config in ("lf-int8", "lf-int4"):
        quantize_model(model, config.removeprefix("lf-"))
    return model.eval()


def run_llamaforge(config: str, args, work: Path) -> dict:
    import torch

    from llamaforge.inference import PagedKVCache, select_step
    from llamaforge.quantize import kv_cache_dtype

    torch.set_num_threads(args.threads)
    prompt, _, tokens = _inputs(work)
    t0 = time.perf_counter()
    model = _lf_model(config, Path(args.gguf))
    load_s = time.perf_counter() - t0
    total = len(prompt) + args.decode
    cache = PagedKVCache.for_model(model, total + 64, dtype=kv_cache_dtype(model))  # as generation does
    fn = model
    if args.path != "eager":
        fn = select_step(model, compile=args.path == "compile").forward  # the engine's choice on CPU by default
    seq = cache.sequence(total + 64)

    def forward(tok: torch.Tensor, pos: torch.Tensor, **kw: bool) -> torch.Tensor:
        return fn(tok, pos, cache=cache.prepare([seq], pos), **kw)

    def prefill(ids: list[int], start: int = 0) -> torch.Tensor:
        hidden = forward(torch.tensor([ids]), torch.arange(start, start + len(ids))[None], return_hidden=True)
        return model.output(hidden[:, -1])

    def step(tok: int, pos: int) -> torch.Tensor:
        return forward(torch.tensor([[tok]]), torch.tensor([[pos]]))[:, -1]

    with torch.inference_mode():
        logits = prefill(prompt[:64])  # warm up both paths
        for i in range(3):
            step(int(logits.argmax()), 64 + i)
        t0 = time.perf_counter()
        logits = prefill(prompt)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pos = len(prompt)
        for _ in range(args.decode):
            logits = step(int(logits.argmax()), pos)
            pos += 1
        decode_s = time.perf_counter() - t0
        lp = torch.log_softmax(model(tokens[None])[0].float(), -1)
    nll, kl = _nll_and_kl(lp, tokens, work, config)
    return _row(config, len(prompt) / prefill_s, args.decode / decode_s, nll, kl, load_s)


def run_hf(config: str, args, work: Path) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    prompt, _, tokens = _inputs(work)
    dtype = torch.bfloat16 if config == "hf-bf16" else torch.float32
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(work / "hf", dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        model.generate(torch.tensor([prompt[:64]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm up
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.decode):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
        lp = torch.log_softmax(model(tokens[None]).logits[0].float(), -1)
    nll, kl = _nll_and_kl(lp, tokens, work, config)
    return _row(config, len(prompt) / prefill_s, args.decode / decode_s, nll, kl, load_s)


def run_llamacpp(config: str, args, work: Path) -> dict:
    import numpy as np
    import torch
    from llama_cpp import Llama

    prompt, _, tokens = _inputs(work)
    path = Path(args.gguf) if config == "cpp-Q4_1" else work / f"{config}.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} was not written (see the note above)")
    common = dict(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                  verbose=False)  # fmt: skip
    t0 = time.perf_counter()
    llm = Llama(n_ctx=len(prompt) + args.decode + 16, **common)
    load_s = time.perf_counter() - t0
    llm.eval(prompt[:64])  # warm up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_vocab = llm.n_vocab()
    for _ in range(args.decode):
        # Without logits_all, llama-cpp-python keeps no scores; read the last position's logits directly.
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        llm.eval([int(np.argmax(last))])
    decode_s = time.perf_counter() - t0
    del llm
    scorer = Llama(n_ctx=len(tokens) + 16, logits_all=True, **common)
    scorer.eval(tokens.tolist())
    logits = torch.from_numpy(np.array(scorer.scores[: len(tokens)], dtype=np.float32))
    nll, kl = _nll_and_kl(torch.log_softmax(logits, -1), tokens, work, config)
    return _row(config, len(prompt) / prefill_s, args.decode / decode_s, nll, kl, load_s)


def _row(config: str, prefill: float, decode: float, nll: float, kl: float | None, load_s: float) -> dict:
    import math

    return {"config": config, "prefill_tps": prefill, "decode_tps": decode, "peak_rss_mb": _peak_rss_mb(),
            "ppl": math.exp(nll), "kl": kl, "load_s": load_s}  # fmt: skip


def _inputs(work: Path):
    import torch

    data = torch.load(work / "inputs.pt")
    return data["prompt"], data["decode"], data["tokens"]


def worker(args) -> None:
    work = Path(args.work)
    config = args.worker
    if config.startswith("lf-"):
        row = run_llamaforge(config, args, work)
    elif config.startswith("hf-"):
        row = run_hf(config, args, work)
    else:
        row = run_llamacpp(config, args, work)
    print("RESULT " + json.dumps(row), flush=True)


# Orchestration ------------------------------------------------------------------------------------------
def prepare(args, work: Path, configs: list[str]) -> dict[str, str]:
    """Tokenize the inputs and write the files other tools need; returns notes for skipped rows."""
    import torch

    import llamaforge
    from llamaforge.checkpoint import save_model

    notes: dict[str, str] = {}
    llm = llamaforge.load(args.gguf)
    tok = llm.require_tokenizer()
    ids = tok.encode(eval_text())
    tokens = torch.tensor(ids[: args.eval_tokens])
    prompt = (ids * (args.prompt // max(len(ids), 1) + 1))[: args.prompt]
    torch.save({"prompt": prompt, "decode": args.decode, "tokens": tokens}, work / "inputs.pt")
    if any(c.startswith("hf-") for c in configs):
        try:
            import transformers  # noqa: F401

            save_model(llm.model, work / "hf", "hf", tokenizer=llm.tokenizer)
        except Exception as exc:
            for c in HF_CONFIGS:
                notes[c] = f"skipped: {type(exc).__name__}: {exc}"
    cpp = [c for c in configs if c.startswith("cpp-")]
    if cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            for c in cpp:
                notes[c] = "skipped: llama_cpp (llama-cpp-python) is not installed"
            return notes
        for c in cpp:
            if c == "cpp-Q4_1":
                continue
            try:
                save_model(llm.model, work / f"{c}.gguf", "gguf", tokenizer=llm.tokenizer, dtype=c[4:].lower())
            except Exception as exc:
                notes[c] = f"skipped: could not write the GGUF: {type(exc).__name__}: {exc}"
    return notes


def run_config(config: str, args, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--work", str(work), "--threads", str(args.threads),
           "--gguf", str(args.gguf), "--decode", str(args.decode), "--path", args.path]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return {"config": config, "error": tail or f"exit code {proc.returncode}"}


def format_table(rows: list[dict]) -> str:
    lines = [
        "| configuration | prefill tok/s | decode tok/s | peak RSS MB | perplexity | KL vs lf-f32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = DESCRIPTIONS.get(r["config"], r["config"])
        if "error" in r or "note" in r:
            lines.append(f"| {name} | {r.get('note') or 'failed: ' + r['error'].replace('|', '/')} | | | | |")
            continue
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        lines.append(f"| {name} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['ppl']:.2f} | {kl} |")  # fmt: skip
    return "\n".join(lines)


def write_results(table: str, args, command: str) -> None:
    import torch

    body = (
        f"{SECTION}\n\nSmolLM2-135M-Instruct (the built-in GGUF), {args.threads} threads, prompt {args.prompt} "
        f"tokens, {args.decode} decoded tokens, perplexity/KL on {args.eval_tokens} tokens of argparse "
        f"docstrings. {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}. Each row runs in its own process; speeds are the "
        f"median of {args.repeat} interleaved round(s) (single runs of 128 tokens vary by up to 25% here).\n\n"
        f"    {command}\n\n{table}\n"
    )
    from results import replace_section

    replace_section(body, path=RESULTS)


def _median_row(rows: list[dict]) -> dict:
    """One configuration's runs as one row: median speeds, largest peak memory (quality is the same each run)."""
    ok = [r for r in rows if "note" not in r and "error" not in r]
    if not ok:
        return rows[0]
    row = dict(ok[0])
    for key in ("prefill_tps", "decode_tps"):
        row[key] = statistics.median(r[key] for r in ok)
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens for the prefill measurement")
    p.add_argument("--decode", type=int, default=128, help="tokens to decode")
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens of text for perplexity and KL")
    p.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the built-in SmolLM2)")
    p.add_argument("--path", choices=("fast", "eager", "compile"), default="fast",
                   help="llamaforge forward: fast (fused, the default generation path on CPU), eager (the plain "
                        "model), compile (torch.compile of the fast path)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over the configurations (interleaved); speeds shown are each one's median")  # fmt: skip
    p.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gguf is None:
        from llamaforge.hub import builtin_model_path

        args.gguf = str(builtin_model_path())
    if args.worker:
        worker(args)
        return
    configs = [c for c in args.only.split(",") if c] or LF_CONFIGS + HF_CONFIGS + CPP_CONFIGS
    if configs[0] != "lf-f32" and "lf-f32" in configs:  # the float32 reference runs first for KL
        configs.remove("lf-f32")
        configs.insert(0, "lf-f32")
    command = "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bench_generate.") as tmp:
        work = Path(tmp)
        notes = prepare(args, work, configs)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeat):  # rounds over every configuration, so that a noisy spell hits all of them
            for config in configs:
                if config in notes and notes[config].startswith("skipped"):
                    runs[config] = [{"config": config, "note": notes[config]}]
                    continue
                runs.setdefault(config, []).append(run_config(config, args, work))
                r = runs[config][-1]
                shown = r.get("error") or {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                print(f"{config}: {shown}", file=sys.stderr, flush=True)
        rows = [_median_row(runs[config]) for config in configs]
    table = format_table(rows)
    print(table)
    if not args.no_results:
        write_results(table, args, command.strip())


if __name__ == "__main__":
    main()
