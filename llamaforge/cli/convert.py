"""``llamaforge convert SRC DST --to hf|meta|gguf``: rewrite a checkpoint in another format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError

DTYPES = ("float32", "float16", "bfloat16")
# llama.cpp's file types, as ``llama-quantize`` names them (llamaforge.gguf_mixes.MIXES).
MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1", "q5_k_s",
         "q5_k_m", "q6_k", "q8_0")  # fmt: skip


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
    parser.add_argument("--quantize", choices=MIXES, default=None, metavar="MIX",
                        help="with --to gguf: quantize the weights to this llama.cpp mix, tensor by tensor as "
                        "llama.cpp's quantizer does (Q6_K head, more bits for some attn_v/ffn_down layers); "
                        f"one of {', '.join(MIXES)}")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import llamaforge
    from llamaforge.checkpoint import save_model

    if args.quantize and args.fmt != "gguf":
        raise UserError(f"--quantize {args.quantize} writes GGUF blocks; use --to gguf (not --to {args.fmt})")
    if args.quantize and args.dtype:
        raise UserError(f"--quantize {args.quantize} sets the type of every weight; drop --dtype {args.dtype}")
    dst = Path(args.dst)
    if dst.exists() and not args.force and not (dst.is_dir() and not any(dst.iterdir())):
        raise UserError(f"{dst} already exists; pass --force to replace it")
    dtype = args.quantize or (getattr(torch, args.dtype) if args.dtype else None)
    load_dtype = None
    if args.fmt != "gguf":  # Hugging Face and Meta files hold floating-point weights: GGUF blocks are dequantized
        from llamaforge.llm import resolve_source
        from llamaforge.quantize import is_quantized_gguf

        if is_quantized_gguf(resolve_source(args.src)):
            load_dtype = dtype or torch.float32
    llm = llamaforge.load(args.src, device="cpu", dtype=load_dtype)
    save_model(llm.model, dst, args.fmt, tokenizer=llm.tokenizer, dtype=dtype)
    config = llm.config
    print(f"wrote {dst} ({args.fmt}{', ' + args.quantize if args.quantize else ''}): {config.n_layers} layers, "
          f"dim {config.dim}, vocab {config.vocab_size}{'' if llm.tokenizer is not None else ', no tokenizer'}",
          file=sys.stderr)  # fmt: skip
    if llm.vision is not None:  # as llama.cpp does, the vision encoder stays out of the text model's files
        print(f"note: {args.src}'s vision encoder is not written: {dst} holds its language model only",
              file=sys.stderr)  # fmt: skip
    return 0
