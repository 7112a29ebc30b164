"""A small reproduction of the LLaMA architecture's advantage over a GPT-2-style baseline, on CPU.

Corpus: the Python standard library installed on this machine (its source, with docstrings, and its
documentation topics in ``pydoc_data``), the same on every machine with the same Python. A byte-level BPE
tokenizer (4,096 tokens) is trained on it with the ``tokenizers`` library; ``prepare_data`` packs it with a
5% validation split. Two models with the same width, depth, heads, (almost) the same parameter count and the
same token budget, data order, optimizer and schedule (the LLaMA recipe: AdamW β2 0.95, weight decay 0.1,
warm-up + cosine to 10%, clipping 1.0) are trained by llamaforge's Trainer:

- LLaMA: pre-RMSNorm, SwiGLU feed-forward (hidden 8/3 d), rotary position embeddings, no biases;
- GPT-2 style (``GPT2Baseline`` below, not part of the package): pre-LayerNorm, GELU MLP (hidden 4 d),
  learned absolute position embeddings, biases.

Validation loss (nats/token) and training throughput are reported side by side.

    python benchmarks/bench_pretrain.py                  # ~10 minutes on 2 cores; writes RESULTS.md
    python benchmarks/bench_pretrain.py --steps 20 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "Pretraining"


# Results file -------------------------------------------------------------------------------------------
def write_subsection(title: str, body: str) -> None:
    """Replace (or add) ``### title`` inside the ``## Pretraining`` section of RESULTS.md."""
    from results import replace_section

    replace_section(f"### {title}\n\n{body.strip()}\n", parent=f"## {SECTION}", path=RESULTS)


# The baseline -------------------------------------------------------------------------------------------
class GPT2Block(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.attn_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.mlp_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2Baseline(nn.Module):
    """GPT-2's architecture with the interface the Trainer uses (``layers``, ``output``, ``config``,
    ``forward(tokens, attn_mask=None, return_hidden=False)``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
        self.layers = nn.ModuleList(GPT2Block(config.dim, config.n_heads) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # GPT-2 ties its embeddings
        std, out_std = 0.02, 0.02 / math.sqrt(2 * config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name or name.startswith("norm"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith("proj.weight") else std)

    def forward(self, tokens: Tensor, attn_mask: Tensor | None = None, return_hidden: bool = False) -> Tensor:
        T = tokens.shape[1]
        x = self.tok_embeddings(tokens) + self.pos_embeddings(torch.arange(T, device=tokens.device))
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.norm(x)
        return x if return_hidden else self.output(x)


# Corpus ---------------------------------------------------------------------------------------------------
def stdlib_files(limit_mb: float) -> list[Path]:
    """Standard-library source and docs, up to ``limit_mb``; tests, third-party packages and the machine's
    build configuration (``_sysconfigdata*``) excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [
        p
        for p in sorted(root.rglob("*.py"))
        if not skip & set(p.relative_to(root).parts) and not p.name.startswith("_sysconfigdata")
    ]  # build settings of this machine: not the same anywhere
    topics = root / "pydoc_data" / "topics.py"  # the documentation (language reference topics) first
    files = ([topics] if topics in files else []) + [p for p in files if p != topics]
    chosen, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > limit_mb * 1e6:
            continue
        chosen.append(p)
        total += size
    return chosen


def build_tokenizer(files: list[Path], folder: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train([str(p) for p in files], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


# Runs -----------------------------------------------------------------------------------------------------
def run(name: str, model: nn.Module, data: Path, out: Path, args: argparse.Namespace) -> dict:
    from llamaforge.train.recipe import Recipe, Trainer

    recipe = Recipe.load(None, {
        "data.path": str(data), "data.seq_len": str(args.seq), "data.micro_batch_size": str(args.batch),
        "data.val_batches": str(args.val_batches), "optim.lr": str(args.lr),
        "optim.warmup_steps": str(max(1, args.steps // 10)), "train.steps": str(args.steps),
        "train.out_dir": str(out / name), "train.eval_interval": "0", "train.save": "false",
        "train.log_interval": str(max(1, args.steps // 8)), "train.seed": "0",
    })  # fmt: skip
    trainer = Trainer(recipe, model=model)
    start = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - start
    tokens = sum(h["tokens"] for h in trainer.history)
    # the median over the logged windows (training only): robust to bursts of load from other jobs
    rates = sorted(h["tokens_per_s"] for h in trainer.history if h.get("tokens_per_s"))
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"name": name, "params": n_params, "tokens": tokens, "val_loss": summary["val_loss"],
            "train_loss": summary["loss"], "tokens_per_s": rates[len(rates) // 2], "wall_s": wall}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=6.0, help="size cap of the stdlib corpus")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="keep the corpus/tokenizer/shards here (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llamaforge.config import ModelConfig
    from llamaforge.model import build_model
    from llamaforge.train.data import Source, prepare_data

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pretrain_"))
    t0 = time.perf_counter()
    files = stdlib_files(args.corpus_mb)
    corpus_mb = sum(p.stat().st_size for p in files) / 1e6
    tok_dir = build_tokenizer(files, work / "tokenizer", args.vocab)
    listing = work / "files"
    listing.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(files):  # a flat copy so that the split is keyed by a stable name
        target = listing / f"{i:05d}_{p.name}"
        if not target.exists():
            target.write_bytes(p.read_bytes())
    meta = prepare_data([Source("stdlib", [str(listing)])], work / "data", str(tok_dir), val_fraction=0.05,
                        seed=0, workers=args.threads, progress=False)  # fmt: skip
    c = meta["components"]["stdlib"]
    prep_s = time.perf_counter() - t0
    if c["val_tokens"] < args.seq * args.batch * 2:
        raise SystemExit(f"only {c['val_tokens']} validation tokens: raise --corpus-mb")
    print(f"corpus: {len(files)} files, {corpus_mb:.1f} MB -> {c['train_tokens']:,} train + {c['val_tokens']:,} "
          f"validation tokens ({prep_s:.0f} s)", file=sys.stderr)  # fmt: skip

    hidden = 8 * ((8 * args.dim // 3 + 7) // 8)  # SwiGLU at 8/3 d: the same FFN parameters as GPT-2's 4 d
    shape = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                        hidden_dim=hidden, max_seq_len=args.seq, tie_embeddings=True, name="bench")  # fmt: skip
    results = []
    torch.manual_seed(0)
    results.append(run("LLaMA (RMSNorm, SwiGLU, RoPE)", build_model(shape), work / "data", work, args))
    torch.manual_seed(0)
    results.append(run("GPT-2 style (LayerNorm, GELU, learned positions)", GPT2Baseline(shape), work / "data",
                       work, args))  # fmt: skip
    lines = ["| model | parameters | training tokens | validation loss | final train loss | tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['tokens']:,} | {r['val_loss']:.3f} | "
                     f"{r['train_loss']:.3f} | {r['tokens_per_s']:,.0f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    total = time.perf_counter() - t0
    print(f"total {total:.0f} s", file=sys.stderr)
    if args.no_write:
        return 0
    d = results[1]["val_loss"] - results[0]["val_loss"]
    body = (
        f"LLaMA vs a GPT-2-style baseline at the same size and token budget, trained by llamaforge's Trainer "
        f"with the LLaMA recipe (AdamW β2 0.95, wd 0.1, warm-up {max(1, args.steps // 10)} steps + cosine to 10% "
        f"of lr {args.lr:g}, clip 1.0). Corpus: this machine's Python {platform.python_version()} standard "
        f"library, source and `pydoc_data` documentation, tests excluded ({len(files)} files, {corpus_mb:.1f} MB; "
        f"{c['train_tokens']:,} train / {c['val_tokens']:,} validation tokens of a 4,096-token BPE trained on "
        f"it). Shape d={args.dim}, {args.layers} layers, {args.heads} heads, context {args.seq}, batch "
        f"{args.batch}, {args.steps} steps; float32 on {args.threads} CPU threads. "
        f"`python benchmarks/bench_pretrain.py --threads {args.threads}` ({total / 60:.1f} min in all).\n\n{table}\n\n"
        f"Validation loss difference (GPT-2 style minus LLaMA): {d:+.3f} nats/token. The machine's 2 cores were "
        "shared with other jobs while this ran, so tokens/s (the median of 8 logged windows per run) are noisy "
        "and the two runs, one after the other, are not timed under identical load.\n"
    )
    write_subsection("LLaMA vs GPT-2-style baseline (CPU reproduction)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
