"""Training throughput on CPU: llamaforge vs Hugging Face transformers' LlamaForCausalLM.

The model is llama2.c's ``stories15M`` shape (preset "stories15m": dim 288, 6 layers, 6 heads, hidden 768,
32,000-token vocabulary, tied embeddings); batches of 8 x 256 tokens, float32, 2 threads. One training step is
forward + backward + gradient clipping + AdamW, the same for every contender. The contenders run in one
process, interleaved round by round, so that the noise of a shared machine falls on all of them alike;
the reported rate is total tokens / total time over the measured rounds.

    python benchmarks/bench_train_speed.py            # eager and torch.compile, writes RESULTS.md
    python benchmarks/bench_train_speed.py --no-compile --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from llamaforge.config import get_preset
from llamaforge.model import build_model
from llamaforge.train.loss import CausalLMLoss
from llamaforge.train.optim import build_optimizer
from llamaforge.train.parallel import apply_compile

Step = Callable[[], None]


def hf_step(cfg, tokens: torch.Tensor) -> Step:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                         attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> None:
        # HF shifts the labels itself: input_ids = labels = the T + 1 window minus its last token
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def llamaforge_step(cfg, tokens: torch.Tensor, compile: bool) -> Step:
    model = build_model(cfg)
    if compile:
        apply_compile(model)
    module = CausalLMLoss(model).train()
    opt = build_optimizer(module, lr=1e-4)
    params = [p for g in opt.param_groups for p in g["params"]]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        loss, count = module(inputs, targets)
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(steps: dict[str, Step], rounds: int, per_round: int, tokens_per_step: int) -> dict[str, float]:
    elapsed = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            elapsed[name] += time.perf_counter() - start
    return {name: rounds * per_round * tokens_per_step / t for name, t in elapsed.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds (each contender per round)")
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset("stories15m")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    steps = {"HF transformers LlamaForCausalLM": hf_step(cfg, tokens),
             "llamaforge (eager)": llamaforge_step(cfg, tokens, compile=False)}  # fmt: skip
    compile_s = None
    if not args.no_compile:
        steps["llamaforge (torch.compile)"] = llamaforge_step(cfg, tokens, compile=True)
    for name, step in steps.items():  # warm-up (and compilation) outside the measurement
        start = time.perf_counter()
        step()
        step()
        if "compile" in name:
            compile_s = time.perf_counter() - start
    rates = measure(steps, args.rounds, args.steps_per_round, args.batch * args.seq)
    base = rates["HF transformers LlamaForCausalLM"]
    lines = ["| implementation | tokens/s | vs HF |", "|---|---:|---:|"]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if compile_s is not None:
        print(f"torch.compile warm-up (compilation, once per run): {compile_s:.0f} s")
    if args.no_write:
        return 0
    from bench_pretrain import write_subsection

    best = max(rate / base for name, rate in rates.items() if name.startswith("llamaforge"))

    body = (
        f"Training throughput, llama2.c `stories15M` shape (preset `stories15m`), batch {args.batch} x {args.seq}, "
        f"float32, {args.threads} threads; a step is forward + backward + clipping + AdamW. All contenders in one "
        f"process, interleaved over {args.rounds} rounds of {args.steps_per_round} steps; "
        f"`python benchmarks/bench_train_speed.py --rounds {args.rounds}` on {platform.machine()}, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}.\n\n{table}\n\n"
        + (
            f"torch.compile (`train.compile: true`) compiles each block once per run, {compile_s:.0f} s here, "
            "excluded from the rate. "
            if compile_s is not None
            else ""
        )
        + f"Target of issue 6: at least 1.3x HF; best here {best:.2f}x ({'met' if best >= 1.3 else 'NOT met'}). "
        "The machine's 2 cores were shared with other jobs during the measurement, so absolute rates are "
        "noisy (and lower than on an idle machine); the ratios are what the interleaving makes comparable, "
        "though a loaded machine favours the side with fewer (larger) kernels. llamaforge's gain is mostly in "
        "the output layer: projection and cross-entropy in chunks of ~256 tokens through two reused buffers, "
        "one softmax pass per chunk that yields the loss and the logits' gradient at once, no full "
        "[tokens, 32000] logits; in the blocks, eager RoPE is one complex product instead of seven "
        "real-valued kernels.\n"
    )
    write_subsection("Training speed (CPU)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
