"""Tensor-parallel inference: one model split over the processes of a torchrun job, each holding 1/N of it.

    torchrun --nproc-per-node N -m llamaforge generate --tp N --model M --prompt ...
    torchrun --nproc-per-node N -m llamaforge serve --tp N --model M

Each rank cuts its slices from each tensor as the checkpoint is read, one tensor at a time (``load_sharded``;
a quantized GGUF stays in its blocks, ``block_slicer``): the query, key and value projections and the FFN's w1/w3
by output features (whole heads, so the KV cache is split by KV head), wo and w2 by input features, the
embedding by columns and the output projection by vocabulary rows (by columns when it is the tied embedding).
Norms are whole. Forward hooks add the collectives, outside the model: an all-reduce after wo and
w2 (and after a tied output), an all-gather after the embedding and the output. ``model.py`` runs unchanged: its
attention counts heads from its projections.

Rank 0 runs the engine (batching, sampling, the cache's block allocation, the HTTP server) and is the only
rank that tokenizes or prints. Its step (``leader_step``, which ``select_step`` picks for a split model) first
broadcasts what it runs — tokens, positions and block tables, or the rows for the output head — and every other
rank runs the same forward on its shard of the model and of the KV cache (``follow``). The cache's geometry
(blocks, block size, type) travels with each step, so the other ranks mirror its growth. Speculative decoding
and prompt-cache files are not supported with ``--tp``.

The messages' headers travel on a gloo group of their own with a short timeout (``CONTROL_TIMEOUT_S``), and rank 0
sends a heartbeat whenever it has sent nothing for a tenth of it: an idle server keeps its followers (a plain
collective would time out after the job's timeout), and a rank 0 that hangs or whose host vanished is noticed
within the timeout. A rank whose peer crashed notices at once (gloo sees the connection close). Either way the
survivors end with a ``PeerLostError`` that says what happened, instead of a collective's traceback, and rank 0
exits when a follower is gone (its forwards cannot run without it).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import PeerLostError, UserError
from .cache import CACHE_TYPES, PagedKVCache, PagedView

# How each tensor is split over the ranks: 0 = output features (rows), 1 = input features (columns); norms whole.
SPLITS = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "tok_embeddings.weight": 1,
    "output.weight": 0,
}
_FORWARD, _HEAD, _FREE, _STOP, _PING, _COPY = 1, 2, 3, 4, 5, 6
_HEADER = 10  # int64 fields of every message's header
CONTROL_TIMEOUT_S = 10.0  # a follower that hears nothing from rank 0 for this long gives up (as rank 0 on a follower)
_ACTIVATIONS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(eq=False)
class TensorParallel:
    """This process's place in a tensor-parallel model: set on the model as ``model.tensor_parallel``."""

    rank: int
    world: int
    device: torch.device
    group: Any = None  # the process group of the model's collectives (None: the default one)
    control: Any = None  # the gloo group of the messages' headers and heartbeats (short timeout)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one message + its collectives at a time
    _ids: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _next: Any = field(default_factory=lambda: itertools.count(1))
    _freed: list = field(default_factory=list)
    heartbeat_s: float = CONTROL_TIMEOUT_S / 10  # rank 0 sends a heartbeat after this long without a message
    ready: bool = False  # every rank has loaded its part and follows (``handshake``)
    stopped: bool = False
    _last_sent: float = 0.0

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def part(self, size: int) -> slice:
        """This rank's share of a dimension of `size` (divisible by the world size)."""
        n = size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    # Messages from rank 0 ---------------------------------------------------------------------------------
    def _send(self, header: list[int], *tensors: Tensor) -> None:
        head = torch.tensor(header + [0] * (_HEADER - len(header)), dtype=torch.int64)
        dist.broadcast(head, 0, group=self.control)
        self._last_sent = time.monotonic()
        for t in tensors:
            dist.broadcast(t.contiguous(), 0, group=self.group)

    def _recv_header(self) -> list[int]:
        head = torch.empty(_HEADER, dtype=torch.int64)
        dist.broadcast(head, 0, group=self.control)
        return head.tolist()

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(t, 0, group=self.group)
        return t

    def handshake(self) -> None:
        """Every rank, once its part of the model is loaded: wait for the others (with the job's timeout, as
        loading may take long), then rank 0 starts its heartbeat."""
        dist.barrier(group=self.group)
        self.ready = True
        self._last_sent = time.monotonic()
        if self.is_leader:
            threading.Thread(target=self._heartbeat, name="tensor-parallel heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self.stopped:
            time.sleep(self.heartbeat_s / 4)
            with self.lock:
                if self.stopped or time.monotonic() - self._last_sent < self.heartbeat_s:
                    continue
                try:
                    self._send([_PING])
                except RuntimeError as exc:  # a follower is gone: the model cannot run any more
                    if self.stopped:
                        return
                    print(f"llamaforge: error: {self.lost(exc) or exc}", file=sys.stderr, flush=True)
                    os._exit(1)

    def lost(self, exc: BaseException) -> PeerLostError | None:
        """The error that ends this rank when ``exc`` is a collective that failed because another rank crashed or
        hangs (None for other errors)."""
        from ..distributed import peer_lost

        peer = "a follower rank" if self.is_leader else "rank 0"
        return peer_lost(exc, f"tensor-parallel rank {self.rank} of {self.world}", peer)

    def cache_id(self, cache: PagedKVCache) -> int:
        """A number naming `cache` in messages; when the leader drops the cache, the other ranks drop theirs."""
        cid = self._ids.get(cache)
        if cid is None:
            cid = self._ids[cache] = next(self._next)
            weakref.finalize(cache, self._freed.append, cid)
        return cid

    def copy_block(self, cache: PagedKVCache, src: int, dst: int) -> None:
        """Repeat a block copy of rank 0's ``cache`` (``PagedKVCache.on_copy``) on the other ranks' copies of it."""
        with self.lock, _peers_checked(self):
            self._send([_COPY, *_geometry(self, cache), src, dst])

    def flush_freed(self) -> None:
        while self._freed:
            self._send([_FREE, self._freed.pop()])

    def stop(self) -> None:
        """Tell the other ranks to leave ``follow`` (rank 0, once, e.g. at exit). Before the handshake the others
        are still loading (or never got there): rank 0 just leaves, and they notice."""
        if self.is_leader and not self.stopped and dist.is_initialized():
            self.stopped = True
            if not self.ready:
                return
            with self.lock, contextlib.suppress(RuntimeError):  # a follower already gone has nothing to stop
                self._send([_STOP])

    def close(self) -> None:
        """At exit (every rank): rank 0 stops the others, then the process groups go (gloo's threads joined, else
        the process aborts as it exits)."""
        self.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


def check_shape(config: ModelConfig, world: int, where: str = "--tp") -> None:
    """Refuse a model that cannot be split `world` ways, naming the sizes (before any weight is read)."""
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.kv_heads, "the FFN width": config.ffn_hidden_dim,
             "dim": config.dim, "vocab_size": config.vocab_size}  # fmt: skip
    problems = [f"{name} ({value}) is not divisible by {world}" for name, value in sizes.items() if value % world]
    if config.n_experts:
        problems.append("mixture-of-experts layers are not split (expert parallelism is not supported)")
    if problems:
        raise UserError(f"{where} {world}: " + "; ".join(problems))


def _split_dim(config: ModelConfig, name: str) -> int | None:
    """How tensor `name` is split (see ``SPLITS``): 0 by rows, 1 by columns, None whole."""
    key = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if key == "output.weight" and config.tie_embeddings:
        return 1  # the tied output is the embedding matrix, split by columns like it
    return SPLITS.get(key)


def slicer(config: ModelConfig, tp: TensorParallel):
    """(name, tensor) -> this rank's slice of it, a copy: the rank keeps 1/N of each tensor, not the whole."""

    def take(name: str, tensor: Tensor) -> Tensor:
        dim = _split_dim(config, name)
        if dim is None:
            return tensor
        part = tp.part(tensor.shape[dim])
        return (tensor[part] if dim == 0 else tensor[:, part]).clone()

    return take


def block_slicer(path: Any, config: ModelConfig, tp: TensorParallel):
    """GGUFTensor -> this rank's part of it, still in its blocks: whole rows (a view of the memory-mapped file), or
    whole blocks of columns (a copy). A split that would cut a block is refused, naming the tensor and sizes."""
    from dataclasses import replace

    def take(t: Any) -> Any:
        dim = _split_dim(config, t.name)
        if dim is None:
            return t
        rows, cols = t.shape
        if dim == 0:
            part = tp.part(rows)
            return replace(t, shape=(part.stop - part.start, cols), data=t.data[part])
        block, size = t.block_size, t.type_size
        n = cols // tp.world
        if n % block:
            raise UserError(f"{path}: --tp {tp.world} would split tensor {t.gguf_name!r} ({t.qtype.name}, "
                            f"{block} weights per block) into {n} columns per rank, which cuts its blocks; "
                            "load it dequantized (--dtype float32) or use another --tp")  # fmt: skip
        width = n // block * size
        return replace(t, shape=(rows, n), data=t.data[:, tp.rank * width : (tp.rank + 1) * width].clone())

    return take


def start(tp: int, device: str | torch.device | None = None, timeout_s: float = CONTROL_TIMEOUT_S) -> TensorParallel:
    """Join the torchrun job of `tp` processes (``--tp``): a UserError if it was not launched that way.

    A rank that hears nothing from the others for ``timeout_s`` (between forwards) takes them for gone."""
    from ..distributed import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1:
        raise UserError(f"--tp must be >= 1, got {tp}")
    if tp == 1 and world > 1:
        raise UserError(f"this is a torchrun job of {world} processes: add --tp {world} to split the model over them")
    if world != tp:
        raise UserError(f"--tp {tp} needs {tp} processes, this job has {world}: launch with "
                        f"torchrun --nproc-per-node {tp} -m llamaforge ... --tp {tp}")  # fmt: skip
    info = init_distributed(str(device) if device else "auto")
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    tp_state = TensorParallel(info.rank, info.world_size, info.device, control=control, heartbeat_s=timeout_s / 10)
    atexit.register(tp_state.close)
    return tp_state


def load_sharded(source: str, tp: TensorParallel, dtype: torch.dtype | None = None) -> Any:
    """This rank's part of the model at `source` as an ``LLM`` whose forward runs with the other ranks'.

    As ``llamaforge.load``: a quantized GGUF file stays in its blocks (each rank holds its rows or whole blocks of
    columns) unless `dtype` is given; other checkpoints load in their own dtype unless `dtype` is given.
    """
    from ..checkpoint import detect_format, format_module, load_model
    from ..llm import LLM, _load_tokenizer_if_present, resolve_source
    from ..quantize import is_quantized_gguf, load_gguf_quantized

    path = resolve_source(source)
    fmt = detect_format(path)
    config = format_module(fmt).read_config(path)
    check_shape(config, tp.world)
    if dtype is None and is_quantized_gguf(path):
        model = load_gguf_quantized(path, device=tp.device, part=block_slicer(path, config, tp))
    else:
        model, fmt = load_model(path, device=tp.device, dtype=dtype, fmt=fmt, transform=slicer(config, tp))
    split_model(model, tp)
    model.eval()
    return LLM(model=model, tokenizer=_load_tokenizer_if_present(path), config=model.config, source=str(source),
               format=fmt, info={"tensor_parallel": f"rank {tp.rank} of {tp.world}"})  # fmt: skip


def _in_features(m: nn.Module) -> int:
    # nn.Linear keeps its constructor's in_features when its weight is replaced by a slice: ask the weight
    return m.weight.shape[1] if isinstance(m, nn.Linear) else m.in_features


def split_model(model: nn.Module, tp: TensorParallel) -> None:
    """Make `model` (holding this rank's slices, see ``SPLITS``) compute the whole model's function with the
    other ranks: local head counts on the attention layers, collectives as forward hooks."""
    group = tp.group
    for layer in model.layers:
        att = layer.attention
        att.n_heads, att.n_kv_heads = att.n_heads // tp.world, att.n_kv_heads // tp.world
        att.wo.register_forward_hook(lambda m, i, out: _all_reduce(out, group))
        layer.feed_forward.w2.register_forward_hook(lambda m, i, out: _all_reduce(out, group))
    model.tok_embeddings.register_forward_hook(lambda m, i, out: _all_gather(out, tp))
    if _in_features(model.output) != model.config.dim:  # tied: the embedding's columns, a part of every logit
        cols = tp.part(model.config.dim)
        model.output.register_forward_pre_hook(lambda m, args: (args[0][..., cols].contiguous(),))
        model.output.register_forward_hook(lambda m, i, out: _all_reduce(out, group))
    else:
        model.output.register_forward_hook(lambda m, i, out: _all_gather(out, tp))
    model.tensor_parallel = tp
    tp.handshake()


def _all_reduce(x: Tensor, group: Any) -> Tensor:
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: Tensor, tp: TensorParallel) -> Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=-1)


def _geometry(tp: TensorParallel, cache: PagedKVCache) -> list[int]:
    """What a follower needs to make or grow its copy of rank 0's ``cache``: its number, blocks, block size, type."""
    return [tp.cache_id(cache), cache.num_blocks, cache.block_size, CACHE_TYPES.index(cache.cache_type)]


def leader_step(model: nn.Module) -> Any:
    """Rank 0's engine step: each forward and output head is announced to the other ranks, then run with them."""
    from .step import Step

    tp: TensorParallel = model.tensor_parallel

    def forward(tokens: Tensor, positions: Tensor, cache: PagedView, return_hidden: bool = False) -> Tensor:
        with tp.lock, _peers_checked(tp):
            tp.flush_freed()
            B, T = tokens.shape
            header = [_FORWARD, *_geometry(tp, cache.cache), B, T, cache.table.shape[1], int(return_hidden)]
            tp._send(header, tokens.to(torch.int64), positions.expand(B, T).to(torch.int64), cache.table.long())
            return model(tokens, positions, cache=cache, return_hidden=return_hidden)

    def head(x: Tensor) -> Tensor:
        with tp.lock, _peers_checked(tp):
            rows = x.reshape(-1, x.shape[-1])
            tp._send([_HEAD, *rows.shape, _ACTIVATIONS.index(x.dtype)], rows)
            return model.output(rows).view(*x.shape[:-1], -1)

    detail = f"the model's forward on {tp.world} tensor-parallel ranks (rank 0 leads)"
    return Step("tensor-parallel", detail, forward, head)


@contextlib.contextmanager
def _peers_checked(tp: TensorParallel) -> Any:
    """A collective that failed because another rank is gone raises ``PeerLostError`` (other errors pass)."""
    try:
        yield
    except RuntimeError as exc:  # gloo's "Connection closed by peer", "Timed out waiting ... for recv", ...
        lost = tp.lost(exc)
        if lost is None:
            raise
        raise lost from exc


@torch.inference_mode()
def follow(model: nn.Module) -> None:
    """Run rank 0's forwards on this rank's part of the model and KV cache, until rank 0 stops; a
    ``PeerLostError`` when rank 0 crashed or stopped answering (no message nor heartbeat for
    ``CONTROL_TIMEOUT_S``)."""
    tp: TensorParallel = model.tensor_parallel
    with _peers_checked(tp):
        _follow(model, tp)


def _follow(model: nn.Module, tp: TensorParallel) -> None:
    config = model.config
    caches: dict[int, PagedKVCache] = {}
    while True:
        h = tp._recv_header()
        op = h[0]
        if op == _STOP:
            return
        if op == _PING:
            continue
        if op == _FREE:
            caches.pop(h[1], None)
        elif op in (_FORWARD, _COPY):
            cid, num_blocks, block_size, cache_type = h[1:5]
            cache = caches.get(cid)
            if cache is None:
                cache = caches[cid] = PagedKVCache(config.n_layers, model.layers[0].attention.n_kv_heads,
                                                   config.dim_per_head, num_blocks, block_size=block_size,
                                                   dtype=CACHE_TYPES[cache_type], device=tp.device)  # fmt: skip
            cache.grow(num_blocks)
            if op == _COPY:
                cache.copy_block(*h[5:7])
                continue
            B, T, width, return_hidden = h[5:9]
            tokens = tp._recv((B, T), torch.int64)
            positions = tp._recv((B, T), torch.int64)
            table = tp._recv((B, width), torch.int64)
            model(tokens, positions, cache=PagedView(cache, table), return_hidden=bool(return_hidden))
        elif op == _HEAD:
            n, d, dtype = h[1:4]
            model.output(tp._recv((n, d), _ACTIVATIONS[dtype]))
        else:
            raise RuntimeError(f"tensor-parallel rank {tp.rank}: unknown message {op} from rank 0")
