"""GPU figures: generation speed (tokens/s and GB/s against the card's measured bandwidth) and pretraining MFU.

Runs on a CUDA machine; models are built from presets with random weights (speed does not depend on the
values, and no checkpoint has to travel to the GPU machine). Sections:

- ceiling: the card's device-to-device copy bandwidth (bytes read + written) and a bf16 matmul's FLOP/s;
- generate: ``llm.generate`` (the engine the CLI and server use) on a 512-token prompt, 128 greedy tokens, batch 1
  and batch 32, for bfloat16 / int8 / int4 weights, eager and ``torch.compile`` (``--modes``). GB/s counts each
  decode step's unavoidable bytes: every weight once plus the KV cache read so far;
- train: ``Trainer`` steps of a ~1B model (``llama-3.2-1b`` preset by default) on random tokens, bf16 autocast,
  ``torch.compile``, reporting tokens/s and MFU against the card's dense bf16 peak (``train.logging.peak_flops``).

    python benchmarks/bench_gpu.py [--sections ceiling,generate,train] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import replace_section

SECTION = "## GPU"


DEVICE = "cuda"  # --device cpu runs a quick smoke test of the script itself


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def ceiling() -> dict:
    """Measured copy bandwidth and bf16 matmul rate of this card."""
    x = torch.randn(1 << 28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    _sync()
    copy_gbs = 2 * x.numel() * 4 * 20 / (start.elapsed_time(end) / 1e3) / 1e9
    del x, y
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync()
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    _sync()
    tflops = 2 * n**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12
    return {"copy_gbs": copy_gbs, "matmul_tflops": tflops, "device": torch.cuda.get_device_name()}


def _llm(preset: str, quant: str | None):
    from llamaforge.config import get_preset
    from llamaforge.llm import LLM
    from llamaforge.model import build_model
    from llamaforge.quantize import quantize_model

    torch.manual_seed(0)
    config = get_preset(preset)
    model = build_model(config, device=DEVICE, dtype=torch.bfloat16, init=False)
    model.init_weights(std=0.02)
    model.eval()
    if quant:
        quantize_model(model, quant)
    return LLM(model=model, tokenizer=None, config=config, source=preset, format="random")


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from weights: every parameter/buffer except the KV caches, the rope
    tables and the embedding table (one row is read per token)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "cache" in name or "rope" in name or "freqs" in name or name.startswith("tok_embeddings"):
            continue
        total += t.numel() * t.element_size()
    head = getattr(model.output, "weight", None)
    if head is model.tok_embeddings.weight:  # a tied float head reads the whole table every step
        total += head.numel() * head.element_size()
    return total


def _kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    return 2 * config.n_layers * config.n_kv_heads * config.dim_per_head * dtype_bytes


def bench_generate(preset: str, quant: str | None, mode: str, prompt_len: int, new: int, batch: int) -> dict:
    from llamaforge import generate as gen

    torch._dynamo.reset()  # compiled code of the previous model must not count against this one's recompile limit
    llm = _llm(preset, quant)
    compile_ = mode != "eager"
    if compile_ and mode != "default-compile":
        os.environ["LLAMAFORGE_COMPILE_MODE"] = mode
    else:
        os.environ.pop("LLAMAFORGE_COMPILE_MODE", None)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, llm.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    arg = prompts if batch > 1 else prompts[0]
    opts = dict(temperature=0.0, ignore_eos=True, compile=compile_, max_batch=batch)
    t0 = time.perf_counter()
    gen.generate(llm, arg, max_new_tokens=new + 1, **opts)  # warm-up: compiles every cache bucket used
    _sync()
    warm_s = time.perf_counter() - t0

    def timed(n: int) -> float:
        _sync()
        t = time.perf_counter()
        gen.generate(llm, arg, max_new_tokens=n, **opts)
        _sync()
        return time.perf_counter() - t

    first = min(timed(1) for _ in range(3))
    full = min(timed(new + 1) for _ in range(3))
    step_s = (full - first) / new
    config = llm.config
    kv = _kv_bytes_per_token(config) * batch * (prompt_len + new / 2)
    wbytes = _weight_bytes(llm.model)
    row = {"preset": preset, "quant": quant or "bf16", "mode": mode, "batch": batch,
           "prefill_tps": batch * prompt_len / first, "decode_tps": batch / step_s, "step_ms": step_s * 1e3,
           "weight_gb": wbytes / 1e9, "gbs": (wbytes + kv) / step_s / 1e9, "warmup_s": warm_s}  # fmt: skip
    return row


class RandomTokens:
    """Random token windows shaped like PackedLoader's batches (speed only)."""

    def __init__(self, vocab: int, seq_len: int, micro: int, accum: int) -> None:
        self.vocab, self.seq_len, self.micro, self.accum = vocab, seq_len, micro, accum
        self.g = torch.Generator().manual_seed(0)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.accum):
            seq = torch.randint(0, self.vocab, (self.micro, self.seq_len + 1), generator=self.g).to(DEVICE)
            out.append({"tokens": seq[:, :-1], "targets": seq[:, 1:]})
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def bench_train(
    preset: str, seq_len: int, micro: int, accum: int, steps: int, compile_: bool, ac: bool, profile: bool = False
) -> dict:
    from llamaforge.train.recipe import Recipe, Trainer

    recipe = Recipe.from_dict({
        "model": {"preset": preset, "overrides": {"max_seq_len": seq_len}},
        "data": {"seq_len": seq_len, "micro_batch_size": micro, "grad_accum_steps": accum, "val_batches": 0},
        "optim": {"warmup_steps": 10},
        "train": {"steps": steps, "device": DEVICE, "precision": "bf16", "compile": compile_,
                  "activation_checkpointing": ac, "log_interval": 5, "eval_interval": 0, "save": False,
                  "out_dir": "/tmp/lf-gpu-train"},
    })  # fmt: skip
    config = recipe.model_config()
    data = RandomTokens(config.vocab_size, seq_len, micro, accum)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None

    def profile_last_two(done: int, metrics: dict) -> None:
        if prof is not None and done == steps - 2:
            prof.start()
        elif prof is not None and done == steps:
            prof.stop()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)

    trainer = Trainer(recipe, train_data=data, callbacks=[profile_last_two])
    t0 = time.perf_counter()
    trainer.fit()
    total_s = time.perf_counter() - t0
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    logged = [h for h in trainer.history if h.get("tokens_per_s")]
    last = logged[-1]  # the final window: compile and warm-up are behind it
    return {"preset": preset, "seq_len": seq_len, "micro": micro, "accum": accum, "compile": compile_, "ac": ac,
            "tokens_per_s": last["tokens_per_s"], "mfu": last["mfu"], "loss": last["loss"],
            "peak_mem_gb": peak_gb, "total_s": total_s}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="ceiling,generate,train")
    p.add_argument("--presets", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--quants", default="bf16,int8,int4")
    p.add_argument("--modes", default="eager,reduce-overhead", help="eager, default-compile, reduce-overhead, ...")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--train-preset", default="llama-3.2-1b")
    p.add_argument("--train-configs", default="2048x8:compile", help="SEQxMICRO[xACCUM][:compile][:ac],...")
    p.add_argument("--train-steps", type=int, default=15)
    p.add_argument("--train-profile", action="store_true", help="print the CUDA kernels of the last two steps")
    p.add_argument("--json", help="also write every row to this file")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help="write the tables to benchmarks/RESULTS.md")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    sections = args.sections.split(",")
    out: dict = {"ceiling": None, "generate": [], "train": [], "errors": []}
    if "ceiling" in sections:
        out["ceiling"] = ceiling()
        print(json.dumps(out["ceiling"]), flush=True)
    if "generate" in sections:
        for preset in args.presets.split(","):
            for quant in args.quants.split(","):
                for mode in args.modes.split(","):
                    for batch in (int(b) for b in args.batches.split(",")):
                        try:
                            quant_ = None if quant == "bf16" else quant
                            row = bench_generate(preset, quant_, mode, args.prompt, args.new, batch)
                            if DEVICE == "cuda":
                                torch.cuda.empty_cache()
                            out["generate"].append(row)
                            print(json.dumps(row), flush=True)
                        except Exception as exc:  # keep going: one failing configuration is one row
                            out["errors"].append(f"generate {preset} {quant} {mode} b{batch}: {exc!r}")
                            traceback.print_exc()
    if "train" in sections:
        for spec in args.train_configs.split(","):
            shape, *flags = spec.split(":")
            seq, micro, *accum = (int(v) for v in shape.split("x"))
            try:
                row = bench_train(
                    args.train_preset,
                    seq,
                    micro,
                    accum[0] if accum else 1,
                    args.train_steps,
                    "compile" in flags,
                    "ac" in flags,
                )
                out["train"].append(row)
                print(json.dumps(row), flush=True)
            except Exception as exc:
                out["errors"].append(f"train {spec}: {exc!r}")
                traceback.print_exc()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    out["prompt"], out["new"] = args.prompt, args.new
    text = format_tables(out, " ".join(["python", "benchmarks/bench_gpu.py", *sys.argv[1:]]))
    print(text)
    if args.write:
        replace_section(text)


def format_tables(out: dict, command: str) -> str:
    c = out["ceiling"] or {}
    lines = [SECTION, "", f"    {command}", ""]
    lines.append(f"{c.get('device', DEVICE)}, torch {torch.__version__}, Python "
                 f"{platform.python_version()}. Random-weight models built from the presets (speed does not "
                 f"depend on the values).")  # fmt: skip
    if c:
        lines.append(f"Measured ceilings: device-to-device copy {c['copy_gbs']:.0f} GB/s (read + write), "
                     f"bf16 8192^3 matmul {c['matmul_tflops']:.0f} TFLOP/s.")  # fmt: skip
    if out["generate"]:
        lines += ["", f"### Generation (llm.generate, {out['prompt']}-token prompt, {out['new']} greedy tokens)", "",
                  "| model | weights | decode step | batch | prefill tok/s | decode tok/s | step ms | weights GB | "
                  "GB/s | % of copy bandwidth |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in out["generate"]:
            pct = f"{100 * r['gbs'] / c['copy_gbs']:.0f}%" if c else ""
            lines.append(f"| {r['preset']} | {r['quant']} | {r['mode']} | {r['batch']} | {r['prefill_tps']:.0f} | "
                         f"{r['decode_tps']:.0f} | {r['step_ms']:.2f} | {r['weight_gb']:.2f} | {r['gbs']:.0f} | "
                         f"{pct} |")  # fmt: skip
    if out["train"]:
        lines += ["", "### Pretraining (Trainer, random tokens, bf16 autocast, AdamW)", "",
                  "| model | seq x micro x accum | compile | act. ckpt | tokens/s | MFU | peak memory GiB |",
                  "|---|---|---|---|---:|---:|---:|"]  # fmt: skip
        for r in out["train"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            shape = f"{r['seq_len']} x {r['micro']} x {r['accum']}"
            tps, mem = f"{r['tokens_per_s']:.0f}", f"{r['peak_mem_gb']:.1f}"
            cells = [r["preset"], shape, r["compile"], r["ac"], tps, mfu, mem]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if out["errors"]:
        lines += ["", "Failed configurations:", *[f"- {e}" for e in out["errors"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
