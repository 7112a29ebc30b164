"""Verbs `download`, `generate` and `chat`: thin wrappers over llamaforge.hub and llamaforge.generate."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..hub import DEFAULT_MODEL
from .convert import MIXES as GGUF_MIXES

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("download", help="fetch a built-in model or a Hugging Face hub repository into the cache",
                              description="Download NAME (a built-in model such as smollm2-135m-instruct, or a hub "
                              "id owner/name) into the local cache and print where it is.")  # fmt: skip
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"model to fetch (default: {DEFAULT_MODEL})")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--offline", action="store_true", help="only look in the local cache (also: HF_HUB_OFFLINE=1)")
    p.set_defaults(handler=_download)

    p = subparsers.add_parser("generate", help="complete a prompt", description="Print the model's continuation "
                              "of --prompt (or of stdin when --prompt is '-').")  # fmt: skip
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", required=True, help="the text to continue ('-' reads stdin)")
    p.add_argument("--suffix", help="fill in the middle: print the text that goes between --prompt and SUFFIX "
                   "(Code Llama's <PRE> <SUF> <MID> infilling, or the model vocabulary's FIM tokens)")  # fmt: skip
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image for an image model (a file or an http(s) URL; repeatable): each goes where the "
                        "prompt has the model's image token (<|image|>), or, when it has none, in front of the "
                        "prompt")  # fmt: skip
    _sampling_args(p, temperature=0.7)
    p.add_argument("--logprobs", type=int, metavar="N", help="also print each token's logprob and the top N")
    g = p.add_argument_group("output constraints (at most one)")
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON that follows this JSON schema")
    g.add_argument("--json", action="store_true", help="the output is a JSON object")
    g.add_argument("--grammar", metavar="FILE", help="the output follows this grammar (GBNF with a root rule, or Lark)")
    g.add_argument("--regex", help="the output matches this regular expression")
    g.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these (repeatable)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print the text only when done")
    add_speculative_arguments(p)
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="KV-cache file for the prompt: when FILE holds the cache of a prefix of this prompt "
                        "(written by an earlier run with the same model), that part is not computed again; the "
                        "prompt's cache is saved there for the next run")  # fmt: skip
    p.add_argument("--verbose", "-v", action="store_true", help="print token counts and speed to stderr")
    add_tensor_parallel_argument(p)
    p.set_defaults(handler=_generate)

    p = subparsers.add_parser("chat", help="talk with a model in its chat format",
                              description="Interactive chat. Commands: /reset (forget the conversation), /system "
                              "TEXT (set the system prompt and reset), /image PATH (an image model: attach an image "
                              "to your next message), /exit. Ctrl-D or Ctrl-C at the prompt quits; Ctrl-C while the "
                              "model answers stops the answer.")  # fmt: skip
    add_model_arguments(p)
    _sampling_args(p, temperature=0.7, max_new_tokens=512)
    add_speculative_arguments(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(handler=_chat)


def add_model_arguments(p: argparse.ArgumentParser, compile: bool = True) -> None:
    """The options that choose and load a model: shared by every verb that runs one."""
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"path, built-in name or hub id (default: {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES),
                   help="weights dtype (default: the checkpoint's; a quantized GGUF runs its own blocks unless a dtype "
                   "is given, which dequantizes it)")  # fmt: skip
    p.add_argument(
        "--quantize",
        choices=["int8", "int4", "int4-g32", "int4-g64", "int4-g128", "gguf", *GGUF_MIXES, "q3_k", "q4_k", "q5_k"],
        help="weight-only quantization applied on load: int8/int4 (torch's kernels' layouts), one of llama.cpp's "
             "mixes (q4_k_m, q8_0, ...: the GGUF blocks llamaforge runs GGUF files with, each matrix in the type "
             "llama.cpp's quantizer gives it) or one block type for every matrix (q4_k, ...); 'gguf' keeps a GGUF "
             "file's own blocks (the default for a quantized GGUF)",
    )  # fmt: skip
    p.add_argument("--mmap", action="store_true",
                   help="keep a quantized GGUF's blocks memory-mapped from the file (instant start, pages shared "
                        "between processes) instead of reading them into memory (faster decoding)")  # fmt: skip
    if compile:
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the decode step (slow start, faster decode)")  # fmt: skip
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")


def add_tensor_parallel_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="split the model over N processes (tensor parallel; each reads and holds 1/N of the weights "
                        "and of the KV cache): torchrun --nproc-per-node N -m llamaforge ... --tp N")  # fmt: skip


def start_tensor_parallel(args: argparse.Namespace) -> Any:
    """``--tp N``: check the options that do not combine with it and join the torchrun job (None without it)."""
    if getattr(args, "tp", 1) == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from ..inference.tensor_parallel import start

    unsupported = {"--quantize": args.quantize, "--compile": getattr(args, "compile", False),
                   "--draft-model": getattr(args, "draft_model", None),
                   "--speculative-ngram": getattr(args, "speculative_ngram", False),
                   "--prompt-cache": getattr(args, "prompt_cache", None),
                   "--slot-save-path": getattr(args, "slot_save_path", None)}  # fmt: skip
    given = [name for name, value in unsupported.items() if value]
    if given:
        raise UserError(f"--tp {args.tp} does not combine with {', '.join(given)}")
    return start(args.tp, args.device)


def load_sharded_for_cli(args: argparse.Namespace, tp: Any):
    """This rank's part of --model (``--tp``), in --dtype."""
    import torch

    from ..inference.tensor_parallel import load_sharded

    _setup_threads(getattr(args, "threads", None))
    return load_sharded(args.model, tp, getattr(torch, _DTYPES[args.dtype]) if args.dtype else None)


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    """KV-cache and speculative decoding options (generate, chat, serve)."""
    p.add_argument("--cache-type", choices=["float32", "float16", "bfloat16", "q8_0"],
                   help="KV-cache storage: q8_0 takes about half the memory of float16 (default: the model's dtype, "
                        "float16 for float32 models with quantized weights)")  # fmt: skip
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft-model", "--draft", dest="draft_model", metavar="MODEL",
                   help="a smaller model with the same tokenizer proposes tokens that --model verifies")  # fmt: skip
    g.add_argument("--speculative-ngram", action="store_true",
                   help="propose tokens by n-gram lookup in the prompt and output (no second model; pays off "
                        "when the answer copies the input: summaries, edits, code)")  # fmt: skip
    g.add_argument("--num-speculative", type=int, help="draft tokens per step (default 4 with a draft model, 3 "
                   "with --speculative-ngram)")  # fmt: skip


def speculative_options(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM.engine`` options from the speculative arguments (the draft model loaded)."""
    if args.draft_model and args.speculative_ngram:
        raise UserError("choose one of --draft-model and --speculative-ngram")
    if args.num_speculative is not None and args.num_speculative < 1:
        raise UserError(f"--num-speculative must be >= 1, got {args.num_speculative}")
    draft = load_for_cli(args, model=args.draft_model) if args.draft_model else None
    return {"draft": draft, "speculative": "ngram" if args.speculative_ngram else None,
            "num_speculative": args.num_speculative, "cache_type": args.cache_type}  # fmt: skip


def _cli_image_limits() -> Any:
    from ..vision.inputs import ImageLimits

    # A URL typed on the command line is the user's own choice: fetch it (a server's clients need --allow-image-urls).
    return ImageLimits(allow_urls=True)


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=max_new_tokens)
    g.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, help="fixed seed: the same text every run")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")


def _sampling_params(args: argparse.Namespace, **extra: Any):
    from ..sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, **extra)  # fmt: skip


def _setup_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        return
    try:  # containers often allow fewer cores than the machine has: never oversubscribe them
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), allowed)))


def load_for_cli(args: argparse.Namespace, model: str | None = None):
    """Load --model on --device/--dtype, quantize it when asked; used by every verb that runs a model."""
    import torch

    import llamaforge

    _setup_threads(getattr(args, "threads", None))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    return llamaforge.load(
        model or args.model, device=device, dtype=dtype, quantize=args.quantize, mmap=getattr(args, "mmap", False)
    )


# Verbs ----------------------------------------------------------------------------------------------
def _download(args: argparse.Namespace) -> int:
    from .. import hub

    key = args.name.lower()
    if key in hub.BUILTIN_MODELS:
        path = hub.builtin_model_path(key, download=not args.offline)
    elif hub.is_hub_id(args.name):
        offline = args.offline or None
        path = hub.hub_download(args.name, revision=args.revision, offline=offline)
    else:
        known = ", ".join(sorted(hub.BUILTIN_MODELS))
        raise UserError(f"unknown model {args.name!r}: not a built-in model ({known}) nor a hub id (owner/name)")
    print(path)
    return 0


def _constraint(args: argparse.Namespace) -> dict[str, Any]:
    """The output constraint the flags ask for, with the files read (before the model is loaded)."""
    given = {"json_schema": args.json_schema, "json_object": args.json or None, "grammar": args.grammar,
             "regex": args.regex, "choice": args.choice}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        flags = ", ".join("--" + k.replace("_", "-").replace("json-object", "json") for k in given)
        raise UserError(f"give at most one output constraint, got {flags}")
    for key in ("json_schema", "grammar"):
        if key in given:
            path = given[key]
            try:
                given[key] = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise UserError(f"--{key.replace('_', '-')} {path}: {exc.strerror or exc}") from None
            given["_file"] = path
    return given


def _constraint_processor(llm: Any, constraint: dict[str, Any]) -> list:
    from ..constrain import GrammarError, constraint_processor

    if not constraint:
        return []
    source = constraint.pop("_file", None)
    try:
        return [constraint_processor(llm.require_tokenizer(), llm.config.vocab_size, **constraint)]
    except GrammarError as exc:
        raise UserError(f"{source}: {exc}" if source else str(exc)) from None


def _generate(args: argparse.Namespace) -> int:
    from ..inference import (
        PromptCacheError,
        image_prompt,
        infill_prompt_ids,
        load_prompt_cache,
        prompt_ids,
        save_prompt_cache,
        stream_events,
    )

    params = _sampling_params(args, logprobs=args.logprobs)
    constraint = _constraint(args)
    if args.image and (args.suffix is not None or args.prompt_cache):
        other = "--suffix" if args.suffix is not None else "--prompt-cache"
        raise UserError(f"--image does not combine with {other}")
    tp = start_tensor_parallel(args)
    if tp is not None and not tp.is_leader:  # the other ranks run rank 0's steps on their part of the model
        from ..inference.tensor_parallel import follow

        follow(load_sharded_for_cli(args, tp).model)
        return 0
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_for_cli(args) if tp is None else load_sharded_for_cli(args, tp)
    params = params.replace(logits_processors=_constraint_processor(llm, constraint))
    engine = llm.engine(compile=args.compile, **speculative_options(args))
    images: list = []
    if args.suffix is not None:
        ids = infill_prompt_ids(llm.tokenizer, prompt, args.suffix)
    elif args.image:
        ids, images = image_prompt(llm.tokenizer, prompt, llm.vision, args.image, _cli_image_limits())
    else:
        ids = prompt_ids(llm.tokenizer, prompt)
    cache_file = Path(args.prompt_cache) if args.prompt_cache else None
    held: list[int] = []
    if cache_file is not None and cache_file.exists():
        try:
            held = load_prompt_cache(engine, cache_file)
        except PromptCacheError as exc:
            raise UserError(f"--prompt-cache: {exc}") from None
    start = time.perf_counter()
    tokens, logprobs, parts, finish = [], [], [], None
    for ev in stream_events(engine, ids, params, images):
        tokens += ev.token_ids
        logprobs += ev.logprobs or []
        finish = ev.finish_reason or finish
        if args.stream:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        else:
            parts.append(ev.text)
    if not args.stream:
        sys.stdout.write("".join(parts))
    sys.stdout.write("\n")
    if args.logprobs is not None:
        _print_logprobs(logprobs)
    seconds = time.perf_counter() - start
    saved = 0
    whole = len(ids) // engine.cache.block_size * engine.cache.block_size  # what a prompt-cache file can hold
    if cache_file is not None and held != ids[:whole]:
        saved = save_prompt_cache(engine, cache_file, ids)
    if args.verbose:
        stats = engine.stats
        extra = f", {stats['accepted']}/{stats['drafted']} drafts accepted" if engine.speculator else ""
        if cache_file is not None:
            extra += f", {stats['cached_tokens']} prompt tokens from {cache_file.name}" + (
                f", {saved} saved" if saved else "")  # fmt: skip
        print(f"[{len(tokens)} tokens in {seconds:.2f} s, {len(tokens) / seconds:.1f} tok/s, finish: {finish}; "
              f"step {engine.step_name}{extra}]", file=sys.stderr)  # fmt: skip
    return 0


def _print_logprobs(entries: list) -> None:
    print("token\tlogprob\ttop alternatives")
    for e in entries:
        top = "  ".join(f"{t.token!r}:{t.logprob:.3f}" for t in e.top)
        print(f"{e.token!r}\t{e.logprob:.4f}\t{top}")


def _chat(args: argparse.Namespace) -> int:
    from ..inference import chat_prompt, stream_events
    from ..vision.inputs import load_image

    params = _sampling_params(args)
    llm = load_for_cli(args)
    tokenizer = llm.require_tokenizer()
    limits = _cli_image_limits()
    # One engine for the session: each turn's prompt starts with the previous ones, whose cache it reuses.
    engine = llm.engine(compile=args.compile, **speculative_options(args))
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        images = ", /image PATH" if llm.vision is not None else ""
        print(f"Chatting with {args.model}. /reset, /system TEXT{images}, /exit; Ctrl-D to quit.", file=sys.stderr)
    system = args.system
    history: list[dict[str, Any]] = []
    attached: list[Any] = []  # images for the next user message (/image)

    def messages() -> list[dict[str, Any]]:
        return ([{"role": "system", "content": system}] if system else []) + history

    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            attached.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/image" or text.startswith("/image "):
            try:
                if llm.vision is None:
                    raise UserError(f"{args.model} takes no images (it has no vision encoder)")
                path = text[len("/image") :].strip()
                if not path:
                    raise UserError("/image needs a file: /image PATH")
                limits.check_count(len(attached) + 1, "your next message")
                attached.append(load_image(path, limits))
            except (UserError, ValueError) as exc:  # a bad path or image: say so, keep the session
                print(f"error: {exc}", file=sys.stderr)
                continue
            print(f"(image {len(attached)} attached to your next message)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            history.clear()
            print("(system prompt set; conversation cleared)", file=sys.stderr)
            continue
        content: Any = line
        if attached:  # the images first, then the text, as Llama 3.2 Vision's and Llama 4's examples have them
            content = [*({"type": "image", "image": image} for image in attached), {"type": "text", "text": line}]
        history.append({"role": "user", "content": content})
        try:
            ids, images = chat_prompt(tokenizer, messages(), llm.vision, limits)
            events = stream_events(engine, ids, params, images)
        except ValueError as exc:  # e.g. the conversation outgrew the context: say so, keep the session
            history.pop()
            print(f"error: {exc} (use /reset)", file=sys.stderr)
            continue
        attached.clear()
        reply = []
        try:
            for ev in events:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                reply.append(ev.text)
        except KeyboardInterrupt:  # stop this answer, keep the session
            events.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
