"""Fine-tuning verbs: ``finetune`` (full, LoRA, QLoRA on instruction data) and ``merge-lora``."""

from __future__ import annotations

import argparse
import json
import os

# Short options and the recipe field each sets.
_SHORTCUTS = {"model": "model.from_checkpoint", "data": "finetune.data", "method": "finetune.method",
              "val_data": "finetune.val_data", "template": "finetune.template", "epochs": "finetune.epochs",
              "lora_r": "finetune.lora_r", "lora_alpha": "finetune.lora_alpha",
              "lora_dropout": "finetune.lora_dropout", "lora_targets": "finetune.lora_targets",
              "quant": "finetune.quant", "steps": "train.steps", "lr": "optim.lr", "out": "train.out_dir",
              "loss": "finetune.dpo_loss", "beta": "finetune.dpo_beta",
              "rpo_alpha": "finetune.rpo_alpha"}  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    _register_finetune(sub)
    _register_merge(sub)


def _register_finetune(sub: argparse._SubParsersAction) -> None:
    from ..train.sft import recipe_fields
    from .train import add_recipe_arguments

    p = sub.add_parser("finetune", help="fine-tune on instruction data (full, LoRA or QLoRA) or preferences (DPO)",
                       description="Supervised fine-tuning on Alpaca records (instruction, input, output) or chat "
                       "records (messages), with the loss on response tokens only; or, with --method dpo, preference "
                       "tuning on (prompt, chosen, rejected) records (DPO, IPO or SimPO). Data: JSON, JSONL, Parquet "
                       "or a saved Hugging Face dataset. Uses the pretraining loop: the same optimizer, schedule, "
                       "checkpoints (--resume), logging and torchrun scaling. LoRA/QLoRA runs write the adapter alone "
                       "to <out>/adapter.", allow_abbrev=False)  # fmt: skip
    p.add_argument("--model", help="model to fine-tune: a directory, a .gguf file, a built-in name or a hub id")
    p.add_argument("--data", help="training data: instruction/chat records, or preference pairs for --method dpo")
    p.add_argument("--method", choices=("full", "lora", "qlora", "dpo"),
                   help="full | lora | qlora (default: lora); dpo: preference tuning (finetune.objective dpo) "
                   "of the weights finetune.method says: LoRA unless --finetune.method full|qlora")  # fmt: skip
    p.add_argument("--val-data", help="validation file (default: a split of --data, finetune.val_fraction)")
    p.add_argument("--template", choices=("auto", "chat", "alpaca"), help="prompt format (default: auto)")
    p.add_argument("--epochs", type=float, help="train this many passes over the data (sets train.steps)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    p.add_argument("--lora-r", type=int, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input")
    p.add_argument("--lora-targets", help="comma-separated: wq,wk,wv,wo,w1,w2,w3,output (or all, attention, mlp)")
    p.add_argument("--quant", choices=("nf4", "int4", "int4-g32", "int4-g64", "int4-g128"),
                   help="QLoRA base quantization (default: nf4)")  # fmt: skip
    p.add_argument("--loss", choices=("sigmoid", "ipo", "simpo"), help="preference loss (default: sigmoid, DPO)")
    p.add_argument("--beta", type=float, help="preference loss beta (default: 0.1; simpo: 2.0)")
    p.add_argument("--rpo-alpha", type=float, help="RPO: add this weight x the chosen responses' NLL to the "
                   "preference loss (TRL's rpo_alpha; default: off; recipes/dpo-lora.yaml: 1.0)")  # fmt: skip
    p.add_argument("-o", "--out", help="output directory (train.out_dir)")
    add_recipe_arguments(p, recipe_fields(), "recipe YAML (see recipes/finetune-*.yaml)")
    p.set_defaults(handler=_finetune)


def recipe_from_args(args: argparse.Namespace):
    """The recipe from --config, then --section.field options and shortcuts, then --set pairs."""
    from ..train.sft import FinetuneRecipe
    from .train import recipe_overrides

    shortcuts = dict(_SHORTCUTS)
    if args.method == "dpo":  # names the objective; the weights train as finetune.method says
        shortcuts["method"] = "finetune.objective"
    return FinetuneRecipe.load(args.config, recipe_overrides(args, shortcuts))


def _finetune(args: argparse.Namespace) -> int:
    from ..train.sft import finetune

    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    summary = finetune(recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "val_history")}))
    return 0


def _register_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model and save the result",
                       description="Load BASE, add the adapter's B @ A (scaled by alpha / r) to each adapted weight "
                       "and write a complete model (Hugging Face, GGUF or Meta format).")  # fmt: skip
    p.add_argument("--model", required=True, help="base model: a directory, a .gguf file or a built-in name")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory (or .gguf file)")
    p.add_argument("--format", choices=("hf", "gguf", "meta"), default=None,
                   help="output format (default: gguf for a .gguf path, else hf)")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="stored dtype (default: the base's, float32 for a quantized GGUF base)")  # fmt: skip
    p.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import save_model
    from ..llm import load
    from ..train.lora import apply_adapter

    fmt = args.format or ("gguf" if str(args.out).endswith(".gguf") else "hf")
    llm = load(args.model, dtype=torch.float32)
    apply_adapter(llm.model, args.adapter, merge=True)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    save_model(llm.model, args.out, fmt, tokenizer=llm.tokenizer, dtype=dtype)
    print(f"wrote {args.out} ({fmt})")
    return 0
