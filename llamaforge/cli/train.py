"""Training verbs: ``prepare-data``, ``pretrain`` and ``plot`` (fine-tuning verbs register alongside)."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    _register_prepare(sub)
    _register_pretrain(sub)
    _register_plot(sub)


# prepare-data -------------------------------------------------------------------------------------------
def _register_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare-data", help="tokenize text/JSONL/Parquet/HF datasets into packed training shards",
                       description="Tokenize documents into packed uint16/uint32 shards (BOS ... EOS per document) "
                       "with a train/validation split. Rerunning the same command resumes.")  # fmt: skip
    p.add_argument("inputs", nargs="*", help="files, directories or globs (text files are one document each; "
                   "JSONL/Parquet one per record), or hf:<dataset>[:<split>]")  # fmt: skip
    p.add_argument("--mix", help="YAML list of sources {name, paths, weight, text_key, glob} (a data mix)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model / tokenizer.json / model directory / .gguf, "
                   "a built-in model name or a hub id")  # fmt: skip
    p.add_argument("--name", default="default", help="component name for the positional inputs")
    p.add_argument("--weight", type=float, default=1.0, help="mix weight of the positional inputs")
    p.add_argument("--text-key", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--glob", default="**/*", help="files to take from directories (e.g. '**/*.py')")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--hf-shards", type=int, default=None, help="work units per Hugging Face dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from ..train.data import Source, load_mix, prepare_data

    sources = load_mix(args.mix) if args.mix else []
    if args.inputs:
        sources.append(Source(args.name, list(args.inputs), args.weight, args.text_key, args.glob))
    if not sources:
        raise UserError("give input files/directories or --mix")
    meta = prepare_data(sources, args.output, args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
                        workers=args.workers, hf_shards=args.hf_shards, progress=not args.no_progress)  # fmt: skip
    for name, c in meta["components"].items():
        print(f"{name}: {c['documents']:,} documents, {c['train_tokens']:,} train + {c['val_tokens']:,} "
              f"validation tokens (weight {c['weight']:g})")  # fmt: skip
    print(f"wrote {args.output}")
    return 0


# pretrain -----------------------------------------------------------------------------------------------
def _register_pretrain(sub: argparse._SubParsersAction) -> None:
    from ..train.recipe import recipe_fields

    p = sub.add_parser("pretrain", help="pretrain a model with the LLaMA recipe (launch with torchrun to scale)",
                       description="Train from a YAML recipe; every field can be overridden as --section.field "
                       "VALUE or --set section.field=VALUE. Several processes: torchrun --nproc_per_node N "
                       "-m llamaforge pretrain ...", allow_abbrev=False)  # fmt: skip
    add_recipe_arguments(p, recipe_fields(), "recipe YAML (see recipes/)")
    p.set_defaults(handler=_pretrain)


def add_recipe_arguments(p: argparse.ArgumentParser, fields, config_help: str) -> None:
    """--config, --set, --resume, --print-recipe and one --section.field option per recipe field."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in train.out_dir (or the given one)")  # fmt: skip
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    group = p.add_argument_group("recipe fields (override the YAML)")
    for name, _hint, default in fields:
        shown = default if isinstance(default, str) else json.dumps(default)
        group.add_argument(f"--{name}", dest=f"field:{name}", default=argparse.SUPPRESS, metavar="V",
                           help=f"default: {shown}")  # fmt: skip


def recipe_overrides(args: argparse.Namespace, shortcuts: dict[str, str] | None = None) -> dict[str, object]:
    """Recipe overrides from --section.field options, then shortcut options, then --set pairs (later win)."""
    overrides: dict[str, object] = {}
    for key, value in vars(args).items():
        if key.startswith("field:"):
            overrides[key[len("field:") :]] = value
    for short, dotted in (shortcuts or {}).items():
        value = getattr(args, short, None)
        if value is not None:
            overrides[dotted] = value
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
        overrides[key.strip()] = value
    if args.resume is not None:
        overrides["train.resume"] = args.resume if isinstance(args.resume, str) else True
    return overrides


def recipe_from_args(args: argparse.Namespace):
    """The recipe from ``--config``, ``--section.field`` options and ``--set`` pairs (later ones win)."""
    from ..train.recipe import Recipe

    return Recipe.load(args.config, recipe_overrides(args))


def _pretrain(args: argparse.Namespace) -> int:
    from ..train.recipe import train

    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    summary = train(recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


# plot ---------------------------------------------------------------------------------------------------
def _register_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw training/validation loss curves of runs to a PNG")
    p.add_argument("runs", nargs="+", help="run directories (train.out_dir) or metrics.jsonl files")
    p.add_argument("-o", "--output", default="loss.png", help="image file (default: loss.png)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window over training steps")
    p.add_argument("--labels", nargs="*", help="legend names, one per run")
    p.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    p.add_argument("--title", help="plot title")
    p.set_defaults(handler=_plot)


def _plot(args: argparse.Namespace) -> int:
    from ..train.plot import plot_runs

    out = plot_runs(args.runs, args.output, smooth=args.smooth, labels=args.labels, log_y=args.log_y,
                    title=args.title)  # fmt: skip
    print(f"wrote {out}")
    return 0
