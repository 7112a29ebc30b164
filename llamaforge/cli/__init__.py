"""The `llamaforge` command: thin verbs that parse arguments and call the library.

Each module in this package registers the verbs of one area with ``register(subparsers)``; a verb's
handler receives the parsed arguments and returns an exit code. Errors meant for the user are raised
as ``UserError`` (or ValueError/FileNotFoundError/KeyError from the library) and printed without a
traceback; set LLAMAFORGE_DEBUG=1 to see one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from ..errors import UserError

# Modules that contribute verbs, in the order their verbs appear in --help.
_VERB_MODULES = ["convert", "tokenize", "generate", "serve", "train", "finetune", "evaluate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaforge", description="LLaMA-family models: load, chat, "
                                     "quantize, serve, pretrain, fine-tune and evaluate.")  # fmt: skip
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # an area not built yet
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plain_format = warnings.formatwarning
    if not os.environ.get("LLAMAFORGE_DEBUG"):  # a warning reads as the verb's own, without a source line
        warnings.formatwarning = lambda message, *_args, **_kw: f"llamaforge {args.verb}: warning: {message}\n"
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UserError, ValueError, FileNotFoundError, KeyError, NotImplementedError) as exc:
        if os.environ.get("LLAMAFORGE_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"llamaforge {args.verb}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain_format


if __name__ == "__main__":
    sys.exit(main())
