"""``llamaforge tokenize --model M "text"``: show the token ids and pieces of a text or a chat prompt."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..hub import DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenize",
        help="show the token ids and pieces of a text (to debug prompts)",
        description="Tokenize TEXT (or standard input) with a model's tokenizer and print one row per token: "
        "position, id, piece and the text it stands for.",
    )
    parser.add_argument("text", nargs="?", metavar="TEXT", help="text to tokenize (default: read standard input)")
    parser.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        metavar="PATH_OR_NAME",
        help="model directory, tokenizer.model / tokenizer.json, .gguf file, hub id or built-in name "
        f"(default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--special",
        action="store_true",
        help="parse special-token text such as <|eot_id|> (default: it is ordinary text)",
    )
    parser.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend the BOS token (default: as the model's prompts do)",
    )
    parser.add_argument(
        "--chat",
        metavar="JSON",
        help="tokenize the chat prompt for these messages: a JSON list of {role, content} or a file",
    )
    parser.add_argument("--template", help="with --chat: llama2, llama3, llama4, codellama or a jinja template file")
    parser.add_argument(
        "--no-generation-prompt",
        action="store_true",
        help="with --chat: do not append the header that asks for the assistant's answer",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run)


def _messages(value: str) -> list[dict[str, Any]]:
    path = Path(value)
    text = path.read_text(encoding="utf-8") if not value.lstrip().startswith("[") and path.is_file() else value
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f'--chat: not valid JSON ({exc}); expected a list of {{"role", "content"}} objects') from exc
    if not isinstance(messages, list):
        raise UserError('--chat: expected a JSON list of {"role", "content"} objects')
    return messages


def run(args: argparse.Namespace) -> int:
    from ..llm import resolve_source
    from ..tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_source(args.model))
    prompt: str | None = None
    if args.chat is not None:
        if args.text is not None:
            raise UserError("give either TEXT or --chat, not both")
        template = args.template
        if template and Path(template).is_file():
            template = Path(template).read_text(encoding="utf-8")
        messages = _messages(args.chat)
        generation = not args.no_generation_prompt
        prompt = tokenizer.format_chat(messages, add_generation_prompt=generation, template=template)
        ids = tokenizer.encode_chat(messages, add_generation_prompt=generation, template=template)
    else:
        text = args.text if args.text is not None else sys.stdin.read()
        bos = tokenizer.add_bos_default if args.bos is None else args.bos
        ids = tokenizer.encode(text, bos=bos and tokenizer.bos_id is not None, allow_special=args.special)
    rows = [
        {"index": n, "id": i, "piece": tokenizer.id_to_piece(i), "text": tokenizer.decode([i])}
        for n, i in enumerate(ids)
    ]
    if args.json:
        print(json.dumps({"prompt": prompt, "ids": ids, "tokens": rows}, ensure_ascii=False, indent=2))
        return 0
    if prompt is not None:
        print(f"prompt: {prompt!r}")
    width = max((len(str(i)) for i in ids), default=2)
    for row in rows:
        special = "  (special)" if tokenizer.is_special(row["id"]) else ""
        print(f"{row['index']:>5}  {row['id']:>{width}}  {row['piece']!r:<24} {row['text']!r}{special}")
    print(f"{len(ids)} tokens ({tokenizer.kind} tokenizer, vocabulary {tokenizer.vocab_size})")
    print("ids:", json.dumps(ids))
    return 0
