"""Verb `serve`: the OpenAI-compatible HTTP server (llamaforge.serve) under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..inference import PREFILL_BUDGET

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20, "g": 2**30,
          "gb": 10**9, "gib": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from "2GiB", "512MB", "1.5g", "1048576"; a ValueError naming the text otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: give bytes or a number with KiB, MiB, GiB (or KB, MB, GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve --model over HTTP with OpenAI's /v1/completions and "
                              "/v1/chat/completions (streaming, continuous batching), plus /v1/models, /tokenize, "
                              "/detokenize, /health and /metrics (Prometheus), and a chat page for the browser at "
                              "/ (--no-webui turns it off). Binds to 127.0.0.1 unless told otherwise; --api-key (or "
                              "LLAMAFORGE_API_KEY) requires 'Authorization: Bearer KEY' on the API.")  # fmt: skip
    from .generate import add_model_arguments, add_speculative_arguments, add_tensor_parallel_argument

    add_model_arguments(p)
    add_speculative_arguments(p)
    add_tensor_parallel_argument(p)
    p.add_argument("--served-model-name", help="the model id clients use (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("LLAMAFORGE_API_KEY"),
                   help="require this bearer token (default: $LLAMAFORGE_API_KEY; none: no auth)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache rows; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get HTTP 429 (default 64)")  # fmt: skip
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="context per request, prompt + completion (default 2048, at most the model's)")  # fmt: skip
    p.add_argument("--prefill-budget", type=int, default=PREFILL_BUDGET,
                   help="prompt tokens prefilled per engine step, between decode steps: lower keeps running "
                        f"streams smoother while prompts arrive, higher gives new requests their first token "
                        f"sooner (default {PREFILL_BUDGET})")  # fmt: skip
    p.add_argument("--cache-memory", metavar="SIZE",
                   help="KV-cache memory, e.g. 2GiB (default: --max-batch requests of --max-seq-len tokens); "
                        "requests wait while it is full")  # fmt: skip
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not reuse the KV cache of prompt prefixes that earlier requests computed")  # fmt: skip
    p.add_argument("--slot-save-path", metavar="DIR",
                   help="enable POST /slots/{id}?action=save|restore|erase: prompt-cache files in DIR")  # fmt: skip
    p.add_argument("--tool-format", choices=["json", "pythonic"],
                   help="how Llama models without a chat template write tool calls: JSON (Llama 3.1/3.3; the "
                        "Llama 3 default) or Python syntax (Llama 3.2, Llama 4; the Llama 4 default)")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB (default 4)")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="longest prompt in tokens; longer ones get HTTP 400 (default: any that fits --max-seq-len)",
    )
    p.add_argument(
        "--max-request-tokens",
        type=int,
        help="most tokens one request may ask to generate, n x max_tokens (default 65536)",
    )
    p.add_argument(
        "--max-streams-per-key",
        type=int,
        help="streaming responses open at once per API key (per client address without --api-key); "
        "more get HTTP 429 (default 16)",
    )
    p.add_argument(
        "--template-timeout",
        type=float,
        metavar="SECONDS",
        help="time a chat template may take to render before the request gets HTTP 400 (default 2)",
    )
    g = p.add_argument_group("images (image models: image_url parts of chat messages)")
    g.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs (off: only data: URIs; the server then makes requests on a "
                        "client's behalf, to any address it can reach)")  # fmt: skip
    g.add_argument("--max-images", type=int, help="images per request (default 8)")
    g.add_argument("--max-image-mb", type=float,
                   help="largest image in MiB, encoded (default 20); data: URIs count against --max-body-mb "
                        "too")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds running requests get to finish before being cancelled")  # fmt: skip
    p.add_argument("--no-webui", dest="webui", action="store_false",
                   help="do not serve the browser chat page at / (the API is served either way)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=_serve)


def bind_warning(host: str, api_key: str | None) -> str | None:
    """What `serve` prints when it binds beyond this machine (None on loopback)."""
    if _is_loopback(host):
        return None
    auth = "requests need --api-key" if api_key else "without --api-key: anyone who can reach this port can use it"
    return f"warning: serving on {host}, reachable from other machines ({auth})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve import ServerConfig, create_app, server_state
    from .generate import load_for_cli, load_sharded_for_cli, start_tensor_parallel

    for name in ("max_batch", "max_seq_len", "prefill_budget", "port"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}, got {value}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.draft_model and args.speculative_ngram:
        raise UserError("choose one of --draft-model and --speculative-ngram")
    if args.num_speculative is not None and args.num_speculative < 1:
        raise UserError(f"--num-speculative must be >= 1, got {args.num_speculative}")
    cache_memory = None
    if args.cache_memory is not None:
        try:
            cache_memory = parse_size(args.cache_memory)
        except ValueError as exc:
            raise UserError(f"--cache-memory: {exc}") from None
    tp = start_tensor_parallel(args)
    if tp is not None and not tp.is_leader:  # rank 0 serves; the other ranks run its steps on their part
        from ..inference.tensor_parallel import follow

        follow(load_sharded_for_cli(args, tp).model)
        return 0
    if args.slot_save_path is not None:
        Path(args.slot_save_path).mkdir(parents=True, exist_ok=True)
    warning = bind_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr)
    from ..serve.limits import Limits

    names = ("max_prompt_tokens", "max_request_tokens", "max_streams_per_key", "template_timeout")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        limits = Limits(**given)
    except ValueError as exc:
        flag = "--" + str(exc).split(" ", 1)[0].replace("_", "-")
        raise UserError(f"{flag}: {str(exc).split(' ', 1)[1]}") from None
    image_limits = _image_limits(args)
    name = args.served_model_name or (Path(args.model).name if Path(args.model).exists() else args.model)
    config = ServerConfig(model_name=name, api_key=args.api_key or None, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_seq_len=args.max_seq_len,
                          max_body_bytes=int(args.max_body_mb * 1024 * 1024), drain_timeout=args.drain_timeout,
                          compile=args.compile, prefill_budget=args.prefill_budget, cache_memory=cache_memory,
                          prefix_caching=args.prefix_caching, speculative_ngram=args.speculative_ngram,
                          num_speculative=args.num_speculative, slot_save_path=args.slot_save_path,
                          cache_type=args.cache_type, webui=args.webui, tool_format=args.tool_format,
                          limits=limits, image_limits=image_limits)  # fmt: skip
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    draft_loader = (lambda: load_for_cli(args, model=args.draft_model)) if args.draft_model else None
    loader = (lambda: load_for_cli(args)) if tp is None else (lambda: load_sharded_for_cli(args, tp))
    app = create_app(config, loader=loader, draft_loader=draft_loader)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=args.drain_timeout + 10, access_log=False)  # fmt: skip
    server = _make_server(uv_config, server_state(app))
    url = f"http://{args.host}:{args.port}"
    page = f"; chat page at {url}/" if args.webui else ""
    print(f"llamaforge serve: {name} on {url}{page} (loading the model...)", file=sys.stderr)
    server.run()
    return 0


def _image_limits(args: argparse.Namespace) -> Any:
    from ..vision.inputs import ImageLimits

    given: dict[str, Any] = {"allow_files": False, "allow_urls": args.allow_image_urls}  # never a server-side path
    if args.max_images is not None:
        if args.max_images < 1:
            raise UserError(f"--max-images must be >= 1, got {args.max_images}")
        given["max_images"] = args.max_images
    if args.max_image_mb is not None:
        if not args.max_image_mb > 0:
            raise UserError(f"--max-image-mb must be positive, got {args.max_image_mb}")
        given["max_bytes"] = int(args.max_image_mb * 2**20)
    return ImageLimits(**given)


def _make_server(config: Any, state: Any) -> Any:
    """A uvicorn.Server that, on SIGTERM/SIGINT, first stops admissions and starts the drain deadline. After a
    SIGTERM drain the process exits 0 (uvicorn would re-raise the signal once it is done, and a supervisor would
    read the -15 as a crash); Ctrl-C still ends with the usual KeyboardInterrupt status."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            try:  # runs in a signal handler: hand the work to the event loop, take no locks here
                asyncio.get_running_loop().call_soon_threadsafe(state.begin_shutdown)
            except RuntimeError:
                state.shutting_down = True
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in getattr(self, "_captured_signals", ()):
                self._captured_signals.remove(sig)  # drained: not re-raised after the shutdown

    return Server(config)
