"""``llamaforge convert SRC DST --to hf|meta|gguf``: rewrite a checkpoint in another format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError

DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face, Meta and GGUF formats",
        description="Load SRC (a Hugging Face or Meta directory, a GGUF file, a hub id or a built-in model name) "
        "and write it to DST in another format. DST is written atomically.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint to read")
    parser.add_argument("dst", metavar="DST", help="directory (hf, meta) or .gguf file to write")
    parser.add_argument("--to", dest="fmt", required=True, choices=("hf", "meta", "gguf"), help="output format")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="store floating-point weights in this dtype (default: as loaded)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import llamaforge
    from llamaforge.checkpoint import save_model

    dst = Path(args.dst)
    if dst.exists() and not args.force and not (dst.is_dir() and not any(dst.iterdir())):
        raise UserError(f"{dst} already exists; pass --force to replace it")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    llm = llamaforge.load(args.src, device="cpu")
    save_model(llm.model, dst, args.fmt, tokenizer=llm.tokenizer, dtype=dtype)
    config = llm.config
    print(f"wrote {dst} ({args.fmt}): {config.n_layers} layers, dim {config.dim}, vocab {config.vocab_size}"
          f"{'' if llm.tokenizer is not None else ', no tokenizer'}", file=sys.stderr)  # fmt: skip
    return 0
