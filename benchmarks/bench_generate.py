"""CPU generation speed: llamaforge vs llama.cpp (and transformers) on SmolLM2-135M, and on the same GGUF files
from 135M to 8B parameters.

Without ``--size``: SmolLM2-135M's rows. Every configuration runs in its own Python process (same machine,
same thread count) and reports prefill tokens/s (a 512-token prompt), decode tokens/s (128 greedy tokens
after it), peak resident memory (``ru_maxrss``, which includes loading), perplexity on a fixed text
(docstrings of Python's ``argparse`` module, ``--eval-tokens`` tokens) and the KL divergence of each
configuration's next-token distributions from llamaforge float32's. Configurations: llamaforge float32 /
bfloat16 / float16 / int8 / int4 (group 32) / the GGUF's own blocks (Q4_1 matrices, Q8_0 head) run quantized;
transformers float32 / bfloat16 (``LlamaForCausalLM`` built from the same dequantized weights); llama.cpp
(``llama_cpp``) on GGUF files written from those weights (F32, F16, Q8_0) and on the original Q4_1 file.
Rows whose tool is missing are skipped with a note. Results go to the "## Generation speed (CPU)" section.

With ``--size 135m,1b,8b``: the size axis. The model files (benchmarks/model_files.py: random-weight GGUFs
of Llama-3.2-1B's and Llama-3.1-8B's shapes, quantized by llama.cpp, and SmolLM2's own) are made once and
cached outside the repository. For every size, format (``--formats``) and engine, alternated in rounds
(``--repeat``), a fresh process measures prefill tokens/s (``--prompt`` tokens), decode tokens/s (``--decode``
greedy tokens, 64 by default) and its peak RSS: llamaforge through ``llamaforge.load(path)`` with no options
(plus ``--lf-options`` variants) and the engine every verb uses; llama.cpp through ``llama_cpp.Llama`` (``eval``
of the prompt, then a greedy loop on the last logits). Each round also measures the memory read bandwidth,
which gives each file's decode limit (bandwidth / weight bytes per token). ``--context 4096,16384`` measures
decode after a prompt of that many tokens instead. Results go to the "## Generation speed by model size
(CPU)" section, one subsection per size, with the ratios llamaforge / llama.cpp.

    .venv/bin/python benchmarks/bench_generate.py [--threads 2] [--only lf-f32,lf-int4] [--path fast] [--no-results]
    .venv/bin/python benchmarks/bench_generate.py --size 1b,8b --repeat 3 [--formats q4_0,q4_k_m,q8_0]
    .venv/bin/python benchmarks/bench_generate.py --size 8b --formats q4_k_m --context 4096,16384
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


# Size axis: the same GGUF files in llamaforge and llama.cpp ------------------------------------------------
SIZE_SECTION = "## Generation speed by model size (CPU)"


def _vm_hwm_mb() -> float | None:
    """This process's own resident high-water mark (``ru_maxrss`` can also hold the parent's, inherited)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _size_row(prefill_s: float, n_prompt: int, decode_s: float, n_decode: int, load_s: float,
              tokens: list[int]) -> dict:  # fmt: skip
    # ru_maxrss of a child can be its parent's peak (Linux copies the high-water mark at fork): the table
    # uses VmHWM, the same mark for this process's own memory, where /proc has it.
    hwm = _vm_hwm_mb()
    return {"prefill_tps": n_prompt / prefill_s, "decode_tps": n_decode / decode_s,
            "peak_rss_mb": hwm if hwm is not None else _peak_rss_mb(), "ru_maxrss_mb": _peak_rss_mb(),
            "load_s": load_s, "first_tokens": tokens[:8]}  # fmt: skip


def _parse_options(text: str) -> dict:
    """`dtype=float32,quantize=gguf` -> keyword arguments (numbers, booleans and None as such)."""
    import ast

    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"option {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def size_worker_llamaforge(path: str, options: dict, ids: list[int], n_decode: int, threads: int) -> dict:
    """`llamaforge.load(path, **options)` and the engine every verb uses (``LLM.stream_events``): the prompt's
    prefill, then `n_decode` greedy steps. A warm-up request first builds the engine; its tokens differ from
    the prompt's at every position, so the engine's prefix cache cannot shorten the timed prefill."""
    import torch

    import llamaforge

    torch.set_num_threads(threads)
    if isinstance(options.get("dtype"), str):
        options = {**options, "dtype": getattr(torch, options["dtype"])}
    t0 = time.perf_counter()
    llm = llamaforge.load(path, **options)
    load_s = time.perf_counter() - t0

    def greedy(n: int) -> llamaforge.SamplingParams:
        return llamaforge.SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)

    vocab = llm.config.vocab_size
    warm = llm.stream_events([(t + 1) % vocab for t in ids[:64]], greedy(4))
    for _ in warm:
        pass
    t0 = time.perf_counter()
    events = llm.stream_events(ids, greedy(n_decode + 1))  # the prefill samples one token, then n_decode steps
    tokens = list(next(events).token_ids)
    t1 = time.perf_counter()
    for ev in events:
        tokens += ev.token_ids
    t2 = time.perf_counter()
    if len(tokens) != n_decode + 1:
        raise RuntimeError(f"expected {n_decode + 1} tokens, got {len(tokens)}")
    return _size_row(t1 - t0, len(ids), t2 - t1, n_decode, load_s, tokens)


def size_worker_llamacpp(path: str, options: dict, ids: list[int], n_decode: int, threads: int) -> dict:
    """llama.cpp through llama_cpp.Llama: `eval` of the prompt, then a greedy loop reading the last logits."""
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=len(ids) + n_decode + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, logits_all=False, verbose=False, **options)  # fmt: skip
    load_s = time.perf_counter() - t0
    llm.eval(ids[:64])  # warm up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    n_vocab, tokens = llm.n_vocab(), []
    for _ in range(n_decode + 1):
        tokens.append(int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)))))
        if len(tokens) <= n_decode:
            llm.eval([tokens[-1]])
    t2 = time.perf_counter()
    llm.close()
    return _size_row(t1 - t0, len(ids), t2 - t1, n_decode, load_s, tokens)


def bandwidth_worker(threads: int, gib: float = 1.0, reps: int = 8) -> dict:
    """Memory read bandwidth: a float32 sum over a buffer far larger than the last-level cache, `threads`
    threads; the best of `reps` passes (the machine's capability, not its average)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()  # touch every page
    speeds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        speeds.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"gbps": max(speeds), "median_gbps": statistics.median(speeds), "peak_rss_mb": _peak_rss_mb()}


def size_worker(args) -> None:
    if args.worker == "bandwidth":
        row = bandwidth_worker(args.threads)
    else:
        ids = json.loads(Path(args.work, "inputs.json").read_text())["ids"][: args.prompt]
        fn = size_worker_llamaforge if args.worker == "size-lf" else size_worker_llamacpp
        row = fn(args.file, json.loads(args.options), ids, args.decode, args.threads)
    print("RESULT " + json.dumps(row), flush=True)


def _status_kib(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc status file, in KiB (None when absent or unreadable)."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def run_guarded(cmd: list[str], env: dict, max_rss_gb: float, timeout_s: float) -> dict:
    """Run a worker; kill it when its resident memory passes `max_rss_gb`, when the machine runs low on
    memory (under 1 GiB available: the machine is shared) or after `timeout_s`. Returns its RESULT or an error."""
    killed = None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        start = time.monotonic()
        try:
            while proc.poll() is None and killed is None:
                rss = _status_kib(f"/proc/{proc.pid}/status", "VmRSS") or 0
                avail = _status_kib("/proc/meminfo", "MemAvailable")
                if rss > max_rss_gb * (1 << 20):
                    killed = f"killed: resident memory passed {max_rss_gb:g} GiB (--max-rss-gb)"
                elif avail is not None and avail < 1 << 20:
                    gib = avail / (1 << 20)
                    killed = f"killed: the machine had {gib:.2f} GiB available (the run held {rss / (1 << 20):.1f})"
                elif time.monotonic() - start > timeout_s:
                    killed = f"killed: took over {timeout_s:g} s (--timeout)"
                else:
                    time.sleep(0.1)
        finally:  # killed, or this process interrupted: never leave the worker running
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        return {"error": killed}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((stderr or stdout).strip().splitlines()[-3:])
    return {"error": tail or f"exit code {proc.returncode}"}


def _gguf_facts(path: Path) -> dict:
    """File size, weight bytes per decoded token, and the KV-cache bytes per context token (F16 K and V)."""
    from gguf import GGUFReader
    from model_files import weight_bytes_per_token

    fields = GGUFReader(path).fields

    def get(key: str) -> int:
        return int(fields[f"llama.{key}"].contents())

    head_dim = get("embedding_length") // get("attention.head_count")
    kv = get("block_count") * 2 * get("attention.head_count_kv") * head_dim * 2
    return {"file_gib": path.stat().st_size / (1 << 30), "weight_bytes": weight_bytes_per_token(path), "kv_bytes": kv}


def make_model_files(args, sizes: list[str], formats: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """benchmarks/model_files.py in a child process: it imports torch, which this process stays without
    (a worker's ``ru_maxrss`` can inherit its parent's peak)."""
    paths: dict[str, dict[str, str]] = {}
    for size in sizes:
        cmd = [sys.executable, str(Path(__file__).with_name("model_files.py")), "--size", size, "--formats",
               ",".join(formats[size]), "--threads", str(args.threads), "--json"]  # fmt: skip
        if args.cache_dir:
            cmd += ["--cache-dir", str(args.cache_dir)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # progress bars go to the terminal
        if proc.returncode != 0:
            sys.exit(f"could not make the {size} model files (see above)")
        paths.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return paths


def _tokens(args, work: Path, n: int) -> None:
    """`n` prompt tokens (argparse's docstrings, repeated) in SmolLM2's tokenizer, which every file carries."""
    code = (
        "import json, sys\n"
        "from llamaforge.tokenizer import load_tokenizer\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from bench_generate import eval_text\n"
        "from model_files import builtin_gguf\n"
        "ids = load_tokenizer(builtin_gguf()).encode(eval_text())\n"
        "n = int(sys.argv[2])\n"
        "json.dump({'ids': (ids * (n // len(ids) + 1))[:n]}, open(sys.argv[1], 'w'))\n"
    )
    here = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-c", code, str(work / "inputs.json"), str(n), here], check=True)


def _contenders(args) -> list[tuple[str, str, dict]]:
    """(engine, label, options): llamaforge's default load, its --lf-options variants, llama.cpp (+ variants)."""
    out = [("lf", "llamaforge `load(path)`", {})]
    for text in args.lf_options or []:
        out.append(("lf", f"llamaforge `{text}`", _parse_options(text)))
    out.append(("cpp", "llama.cpp", {}))
    for text in args.cpp_options or []:
        out.append(("cpp", f"llama.cpp `{text}`", _parse_options(text)))
    return out


def size_main(args, command: str) -> None:
    from model_files import DEFAULT_FORMATS, SIZES, check_names

    sizes = [s for s in args.size.split(",") if s]
    explicit = [f for f in (args.formats or "").split(",") if f]
    check_names(sizes, explicit)
    # 135m's default set starts with the built-in file as shipped (Q4_1 matrices, Q8_0 embedding).
    formats = {s: explicit or ([*(["q4_1"] if s == "135m" else []), *DEFAULT_FORMATS]) for s in sizes}
    sizes = [s for s in SIZES if s in sizes]
    contexts = [int(c) for c in args.context.split(",")] if args.context else [args.prompt]
    contenders = _contenders(args)
    paths = make_model_files(args, sizes, formats)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load_before = os.getloadavg()
    runs: dict[tuple, list[dict]] = {}
    bandwidth: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_generate.") as tmp:
        work = Path(tmp)
        _tokens(args, work, max(contexts))
        base = [sys.executable, __file__, "--work", str(work), "--threads", str(args.threads)]
        for r in range(args.repeat):  # rounds over every file and engine, so that a noisy spell hits all of them
            bw = run_guarded([*base, "--worker", "bandwidth"], env, args.max_rss_gb, 300)
            bandwidth.append(bw)
            print(f"round {r + 1}: bandwidth {bw}", file=sys.stderr, flush=True)
            for size in sizes:
                for fmt in formats[size]:
                    for ctx in contexts:
                        order = list(enumerate(contenders))  # engines alternate which goes first
                        for i, (engine, label, options) in order if r % 2 == 0 else order[::-1]:
                            cmd = [*base, "--worker", f"size-{engine}", "--file", paths[size][fmt], "--prompt",
                                   str(ctx), "--decode", str(args.decode), "--options",
                                   json.dumps(options)]  # fmt: skip
                            row = run_guarded(cmd, env, args.max_rss_gb, args.timeout)
                            runs.setdefault((size, fmt, ctx, i), []).append(row)
                            shown = row.get("error") or {k: round(v, 2) if isinstance(v, float) else v
                                                         for k, v in row.items()}  # fmt: skip
                            print(f"{size} {fmt} ctx={ctx} {label}: {shown}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    # After the runs: reading the headers (a 49K-token vocabulary each) raises this process's peak RSS, which
    # workers started later would inherit in their ru_maxrss.
    facts = {(s, f): _gguf_facts(Path(paths[s][f])) for s in sizes for f in formats[s]}
    ok_bw = [b["gbps"] for b in bandwidth if "gbps" in b]
    gbps = max(ok_bw) if ok_bw else None
    rows = {key: _median_size_row(v) for key, v in runs.items()}
    header = _size_header(args, gbps, ok_bw, load_before, load_after, command)
    long = args.context is not None
    for size in sizes:
        table = format_size_table(size, formats[size], contexts, contenders, rows, facts, gbps, long)
        title = _size_title(size, args, contexts, long)
        print(f"{title}\n\n{table}\n")
        if not args.no_results:
            from results import replace_section

            replace_section(f"{title}\n\n{header}\n\n{table}\n", parent=SIZE_SECTION, path=RESULTS)


def _median_size_row(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[-1]
    out = dict(ok[0])
    for key in ("prefill_tps", "decode_tps", "load_s"):
        out[key] = statistics.median(r[key] for r in ok)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    out["runs"], out["failed"] = len(ok), len(rows) - len(ok)
    return out


def _size_title(size: str, args, contexts: list[int], long: bool) -> str:
    from model_files import SHAPES

    if size == "135m":
        shape = "SmolLM2-135M-Instruct (the built-in file and llama.cpp quantizations of its F16 weights)"
    else:
        s = SHAPES[size]
        shape = (f"{s.description} (dim {s.dim}, {s.n_layers} layers, {s.n_heads}/{s.n_kv_heads} heads, FFN {s.ffn}, "
                 f"vocab {s.vocab}, tied), random weights")  # fmt: skip
    if long:
        return f"### Long context, {size}: {shape}"
    return f"### {size}: {shape}"


def _size_header(args, gbps, ok_bw, load_before, load_after, command: str) -> str:
    bw = (f"{gbps:.1f} GB/s (best of {len(ok_bw)} rounds; median {statistics.median(ok_bw):.1f})" if gbps
          else "not measured")  # fmt: skip
    what = (f"a {args.context}-token prompt, then {args.decode} greedy tokens" if args.context
            else f"{args.prompt}-token prompt, {args.decode} greedy tokens")  # fmt: skip
    return (
        f"{what}; {args.threads} threads; the same files in both engines; each run in a fresh process, "
        f"engines alternated, speeds the median of {args.repeat} round(s), peak RSS (`ru_maxrss`, includes "
        f"loading) the largest. Memory read bandwidth ({args.threads} threads, sum over 1 GiB): {bw}; "
        f'"limit" = bandwidth / bytes read per decoded token (weights; the embedding table once, as the tied '
        f"head{'; plus the F16 KV cache at that context' if args.context else ''}). "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after, {time.strftime('%Y-%m-%d')}, llamaforge "
        f"{_commit()}, llama-cpp-python {_version('llama-cpp-python')}.\n\n    {command}"
    )


def _commit() -> str:
    """The llamaforge source measured: the git commit of the imported package ("+changes" when uncommitted)."""
    import llamaforge

    root = Path(llamaforge.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return f"commit {head}{' +changes' if dirty else ''}"


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def format_size_table(size: str, formats: list[str], contexts: list[int], contenders: list, rows: dict,
                      facts: dict, gbps: float | None, long: bool) -> str:  # fmt: skip
    cols = ["file", "GiB"] + (["context"] if long else []) + [
        "engine", "prefill tok/s", "decode tok/s", "peak RSS GiB", "prefill ×cpp", "decode ×cpp", "RSS ×cpp",
        "decode limit tok/s", "decode / limit"]  # fmt: skip
    align = ["---" if c in ("file", "engine") else "---:" for c in cols]  # text left, numbers right
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    cpp_index = next(i for i, (engine, _, _) in enumerate(contenders) if engine == "cpp")
    for fmt in formats:
        f = facts[(size, fmt)]
        for ctx in contexts:
            per_token = f["weight_bytes"] + (f["kv_bytes"] * ctx if long else 0)
            limit = gbps * 1e9 / per_token if gbps else None
            ref = rows.get((size, fmt, ctx, cpp_index), {})
            for i, (engine, label, _) in enumerate(contenders):
                r = rows.get((size, fmt, ctx, i), {"error": "not run"})
                lead = [fmt.upper(), f"{f['file_gib']:.2f}"] + ([str(ctx)] if long else []) + [label]
                if "error" in r:
                    msg = "failed: " + r["error"].replace("|", "/").replace("\n", " ")
                    lines.append("| " + " | ".join([*lead, msg] + [""] * (len(cols) - len(lead) - 1)) + " |")
                    continue

                vs_cpp = engine != "cpp" and "error" not in ref
                keys = ("prefill_tps", "decode_tps", "peak_rss_mb")
                ratios = [f"{r[k] / ref[k]:.2f}x" if vs_cpp else "-" for k in keys]
                cells = [f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.2f}", f"{r['peak_rss_mb'] / 1024:.2f}", *ratios,
                         f"{limit:.1f}" if limit else "-",
                         f"{r['decode_tps'] / limit:.0%}" if limit else "-"]  # fmt: skip
                lines.append("| " + " | ".join(lead + cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens for the prefill measurement")
    p.add_argument("--decode", type=int, default=None, help="tokens to decode (default 128; 64 with --size)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens of text for perplexity and KL")
    p.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the built-in SmolLM2)")
    p.add_argument("--path", choices=("fast", "eager", "compile"), default="fast",
                   help="llamaforge forward: fast (fused, the default generation path on CPU), eager (the plain "
                        "model), compile (torch.compile of the fast path)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over the configurations (interleaved); speeds shown are each one's median")  # fmt: skip
    p.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    size = p.add_argument_group("size axis (llamaforge and llama.cpp on the same GGUF files)")
    size.add_argument("--size", default=None, help="comma-separated model sizes: 135m, 1b, 8b")
    size.add_argument("--formats", default=None,
                      help="comma-separated: q4_0, q4_k_m, q8_0, q5_k_m, q6_k, f16, q4_1 (default: all but q4_1; "
                           "135m adds q4_1, the built-in file as shipped)")  # fmt: skip
    size.add_argument(
        "--lf-options",
        action="append",
        metavar="K=V,...",
        help="an extra llamaforge row: load(path, K=V, ...), e.g. dtype=float32 (repeatable)",
    )
    size.add_argument(
        "--cpp-options",
        action="append",
        metavar="K=V,...",
        help="an extra llama.cpp row: Llama(..., K=V), e.g. flash_attn=True (repeatable)",
    )
    size.add_argument(
        "--context",
        default=None,
        metavar="N,...",
        help="long context: prefill N tokens, then decode (instead of the --prompt measurement)",
    )
    size.add_argument("--cache-dir", default=None, help="model files (default: $LLAMAFORGE_BENCH_HOME or "
                      "~/.cache/llamaforge-bench)")  # fmt: skip
    size.add_argument(
        "--max-rss-gb",
        type=float,
        default=20.0,
        help="kill a run whose resident memory passes this many GiB (default 20)",
    )
    size.add_argument("--timeout", type=float, default=3600.0, help="kill a run after this many seconds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker in ("size-lf", "size-cpp", "bandwidth"):
        size_worker(args)
        return
    command = "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])
    if args.size:
        args.decode = args.decode or 64
        try:
            for text in (args.lf_options or []) + (args.cpp_options or []):
                _parse_options(text)
            size_main(args, command.strip())
        except ValueError as exc:
            sys.exit(f"error: {exc}")
        return
    args.decode = args.decode or 128
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
