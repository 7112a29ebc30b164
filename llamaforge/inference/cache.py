"""The KV cache: keys and values in fixed-size blocks, a block table per sequence, automatic prefix reuse.

``PagedKVCache`` owns one pool per layer, ``k``/``v`` [n_layers, n_blocks, n_kv_heads, block_size, head_dim],
and hands blocks to sequences. A ``Sequence`` is a block table: position p of the sequence lives in slot
``p % block_size`` of block ``blocks[p // block_size]``. The loop that runs the model (the engine, the scorer,
a test) owns the cache and passes a ``view`` of some sequences to the model, ``model(tokens, positions,
cache=cache.view(seqs, positions))``; the model itself keeps no inference state.

Prefix caching (as vLLM's automatic prefix caching): once a block is full, its identity is a hash of its
tokens and of the identity of the block before it, so it names the whole prefix up to its end. Full blocks
are registered under that hash; a new sequence whose prompt starts with the same tokens takes those blocks
(shared, reference counted) and computes only the rest. Blocks nobody uses any more stay registered and are
evicted least recently used first (a sequence's later blocks before its earlier ones) when fresh blocks are
needed. Only full blocks are shared, and a sequence writes only into blocks it owns alone.

Admission never over-commits: ``admit`` reserves every block a request may need up to its maximum length, so a
running request never finds the cache full; a request that does not fit now waits (``admit`` returns None).

Block 0 is scratch: it is never handed out, block tables are padded with it, and padding tokens of a batch
write there.

Cache types: float32, float16, bfloat16, or ``"q8_0"``: 8-bit numbers with one float16 scale per 32 (llama.cpp's
``--cache-type q8_0``), about half the memory of float16. A q8_0 pool is int8 with rows of ``head_dim + head_dim/16``
bytes: the numbers, then their scales; the native decode step reads and writes it directly, the torch path
quantizes on write and dequantizes what it gathers (``q8_0_rows`` / ``q8_0_values``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

BLOCK_SIZE = 16  # tokens per block: the granularity of prefix reuse
CACHE_TYPES = ("float32", "float16", "bfloat16", "q8_0")


def q8_0_rows(x: Tensor) -> Tensor:
    """x [..., D] (D a multiple of 32) as q8_0 rows [..., D + D/16] int8: the numbers rounded to
    round(x / scale) with scale = max|x| / 127 per 32, then the scales as float16 bytes (the kernel's arithmetic)."""
    groups = x.float().unflatten(-1, (-1, 32))
    d = groups.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(groups * inv).to(torch.int8).flatten(-2)
    scales = d.squeeze(-1).to(torch.float16).view(torch.int8)  # [..., D/32] float16 -> [..., D/16] bytes
    return torch.cat([q, scales], dim=-1)


def q8_0_values(rows: Tensor, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The numbers of q8_0 rows [..., D + D/16] as [..., D] in `dtype`."""
    q = rows[..., :head_dim].float().unflatten(-1, (-1, 32))
    scales = rows[..., head_dim:].contiguous().view(torch.float16).float()
    return (q * scales[..., None]).flatten(-2).to(dtype)


def cache_storage(cache_type: str | torch.dtype) -> tuple[str, torch.dtype]:
    """(the cache type's name, the pool's storage dtype) for a torch dtype or a name in ``CACHE_TYPES``."""
    if isinstance(cache_type, torch.dtype):
        name = str(cache_type).removeprefix("torch.")
    else:
        name = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "bf16": "bfloat16"}.get(
            cache_type, cache_type)  # fmt: skip
    if name not in CACHE_TYPES:
        raise ValueError(f"unknown KV-cache type {cache_type!r}; choose one of {', '.join(CACHE_TYPES)}")
    return name, torch.int8 if name == "q8_0" else getattr(torch, name)


def _kv_heads(model: torch.nn.Module) -> int:
    """The KV heads the model's attention layers hold: all of them, or a tensor-parallel rank's share."""
    return model.layers[0].attention.n_kv_heads


@dataclass(eq=False)
class Sequence:
    """One sequence's place in the cache: its block table and how many of its positions hold valid keys."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # positions 0..num_tokens-1 hold this sequence's keys and values
    reused: int = 0  # of which were found in the prefix cache (not computed for this sequence)
    hashes: list[int] = field(default_factory=list)  # prefix hash of each registered (full) block, in order
    reserved: int = 0  # blocks promised to this sequence and not yet allocated

    def table(self, width: int) -> list[int]:
        """The block table padded with the scratch block to `width` entries."""
        return self.blocks[:width] + [0] * (width - len(self.blocks))


@dataclass(frozen=True)
class _Entry:  # what a registered block holds, to check a hash hit exactly
    parent: int
    tokens: tuple[int, ...]


_ROOT = 0x6C6C616D61  # the parent hash of a sequence's first block


def block_hashes(tokens: Seq[int], block_size: int, parent: int = _ROOT, start: int = 0) -> list[int]:
    """Prefix hashes of the full blocks of `tokens` from block `start` on (the hash of block start-1 as parent)."""
    out = []
    for b in range(start, len(tokens) // block_size):
        parent = hash((parent, tuple(tokens[b * block_size : (b + 1) * block_size])))
        out.append(parent)
    return out


class PagedKVCache:
    """A pool of KV blocks for every layer, the block allocator and the prefix table; see the module docstring."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, *,
                 block_size: int = BLOCK_SIZE, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu", prefix_caching: bool = True) -> None:  # fmt: skip
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.cache_type, self.dtype = cache_storage(dtype)  # dtype: what the pool stores (int8 for q8_0)
        self.quantized = self.cache_type == "q8_0"
        if self.quantized and head_dim % 32:
            raise ValueError(f"a q8_0 KV cache needs a head dimension that is a multiple of 32, got {head_dim}")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.row_width = head_dim + head_dim // 16 if self.quantized else head_dim  # stored elements per row
        self.block_size = block_size
        self.device = torch.device(device)
        self.prefix_caching = prefix_caching
        shape = (n_layers, num_blocks, n_kv_heads, block_size, self.row_width)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack; block 0 is scratch
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unused; least recently used first
        self._by_hash: dict[int, int] = {}
        self._entry: dict[int, tuple[int, _Entry]] = {}  # block -> (hash, entry) of registered blocks
        self._reserved = 0
        self.hit_tokens = 0  # prompt tokens served from the prefix cache (for metrics)
        self.query_tokens = 0  # prompt tokens looked up
        # told of every block copy (cache, src, dst): a tensor-parallel leader repeats it on the other ranks' caches
        self.on_copy: Callable[[PagedKVCache, int, int], None] | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_tokens: int, *, block_size: int = BLOCK_SIZE,
                  dtype: torch.dtype | str | None = None, prefix_caching: bool = True) -> PagedKVCache:  # fmt: skip
        """A cache for `model` (a ``Transformer``) with room for `num_tokens` positions (plus the scratch block),
        in `dtype` (default: the model's floating dtype)."""
        config = model.config
        ref = model.tok_embeddings.weight
        dtype = dtype or (ref.dtype if ref.dtype.is_floating_point else torch.float32)
        num_blocks = -(-num_tokens // block_size) + 1
        cache = cls(config.kv_layers, _kv_heads(model), config.dim_per_head, num_blocks, block_size=block_size,
                    dtype=dtype, device=ref.device, prefix_caching=prefix_caching)  # fmt: skip
        tp = getattr(model, "tensor_parallel", None)
        if tp is not None and tp.is_leader:  # a split model's leader: its copies are the other ranks' too
            cache.on_copy = tp.copy_block
        return cache

    # Sizes ------------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        """Positions the cache can hold (scratch block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @staticmethod
    def bytes_per_token(model: torch.nn.Module, dtype: torch.dtype | str) -> int:
        """Keys and values of one position in every layer, in bytes."""
        c = model.config
        name, storage = cache_storage(dtype)
        row = c.dim_per_head + c.dim_per_head // 16 if name == "q8_0" else c.dim_per_head
        return 2 * c.kv_layers * _kv_heads(model) * row * torch.empty((), dtype=storage).element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable) and are not promised to a sequence."""
        return len(self._free) + len(self._evictable) - self._reserved

    @property
    def num_cached(self) -> int:
        """Registered blocks that no sequence uses (kept for prefix reuse until evicted)."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return sum(1 for r in self._ref if r > 0)

    def grow(self, num_blocks: int) -> None:
        """Enlarge the pool to `num_blocks` blocks (existing blocks keep their ids and contents)."""
        extra = num_blocks - self.num_blocks
        if extra <= 0:
            return
        pad = (self.n_layers, extra, self.n_kv_heads, self.block_size, self.row_width)
        self.k = torch.cat([self.k, torch.zeros(pad, dtype=self.dtype, device=self.device)], dim=1)
        self.v = torch.cat([self.v, torch.zeros(pad, dtype=self.dtype, device=self.device)], dim=1)
        first = len(self._ref)
        self._ref += [0] * extra
        self._free = list(range(num_blocks - 1, first - 1, -1)) + self._free

    # Sequences ------------------------------------------------------------------------------------------------
    def match(self, tokens: Seq[int]) -> list[int]:
        """The registered blocks that hold the longest prefix of `tokens` made of full blocks (no reference taken)."""
        if not self.prefix_caching:
            return []
        found = []
        parent = _ROOT
        for h, b in zip(block_hashes(tokens, self.block_size), range(len(tokens) // self.block_size)):
            block = self._by_hash.get(h)
            if block is None:
                break
            entry = self._entry[block][1]
            if entry.parent != parent or entry.tokens != tuple(tokens[b * self.block_size : (b + 1) * self.block_size]):
                break  # a hash collision: not this prefix
            found.append(block)
            parent = h
        return found

    def admit(self, tokens: Seq[int], max_tokens: int, reuse: bool = True) -> Sequence | None:
        """A sequence for a prompt `tokens` that may grow to `max_tokens` positions, or None when the cache cannot
        promise that many blocks now. Its longest cached prefix of full blocks is reused (when `reuse`), always
        leaving at least one prompt token to compute (whose output predicts the first new token)."""
        if max_tokens > self.capacity:
            raise ValueError(f"a sequence of {max_tokens} tokens does not fit in a KV cache of {self.capacity} "
                             f"tokens ({self.num_blocks - 1} blocks of {self.block_size})")  # fmt: skip
        matched = self.match(tokens[: len(tokens) - 1]) if reuse else []
        need = self.blocks_for(max_tokens) - len(matched)
        taken_from_lru = sum(1 for b in matched if self._ref[b] == 0)
        if need > self.num_free - taken_from_lru:
            return None
        for b in matched:
            self._take(b)
        self._reserved += need
        n = len(matched) * self.block_size
        self.query_tokens += len(tokens)
        self.hit_tokens += n
        hashes = [self._entry[b][0] for b in matched]
        return Sequence(blocks=list(matched), num_tokens=n, reused=n, hashes=hashes, reserved=need)

    def ensure(self, seq: Sequence, num_positions: int) -> None:
        """Give `seq` blocks for positions 0..num_positions-1 (from its reservation)."""
        while len(seq.blocks) * self.block_size < num_positions:
            if seq.reserved > 0:
                seq.reserved -= 1
                self._reserved -= 1
            elif self.num_free < 1:
                raise RuntimeError("the KV cache is full (a sequence grew past the blocks reserved for it)")
            seq.blocks.append(self._allocate())

    def commit(self, seq: Sequence, tokens: Seq[int], num_tokens: int) -> None:
        """Record that positions 0..num_tokens-1 of `seq` now hold the keys and values of ``tokens[:num_tokens]``
        and register its newly full blocks for prefix reuse."""
        seq.num_tokens = num_tokens
        if not self.prefix_caching:
            return
        full = num_tokens // self.block_size
        if full <= len(seq.hashes):
            return
        bs = self.block_size
        start = len(seq.hashes)
        parent = seq.hashes[-1] if seq.hashes else _ROOT
        for b, h in enumerate(block_hashes(tokens[: full * bs], bs, parent, start), start):
            block = seq.blocks[b]
            seq.hashes.append(h)
            if h in self._by_hash or block in self._entry:  # the same prefix computed twice at once: keep the first
                parent = h
                continue
            self._by_hash[h] = block
            self._entry[block] = (h, _Entry(parent, tuple(tokens[b * bs : (b + 1) * bs])))
            parent = h

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Forget positions from `num_tokens` on (e.g. rejected draft tokens); their blocks stay allocated."""
        seq.num_tokens = min(seq.num_tokens, num_tokens)

    def release(self, seq: Sequence) -> None:
        """Return the sequence's blocks and reservation: registered blocks stay cached until evicted."""
        for block in reversed(seq.blocks):  # later blocks become evictable first
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._entry:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        self._reserved -= seq.reserved
        seq.blocks, seq.hashes, seq.reserved, seq.num_tokens = [], [], 0, 0

    def fork(self, seq: Sequence, num_tokens: int, max_tokens: int) -> Sequence | None:
        """A new sequence whose first `num_tokens` positions are those of `seq` (its full blocks shared, a partial
        last block copied), with room to grow to `max_tokens`; None when the cache cannot promise the blocks."""
        full = num_tokens // self.block_size
        partial = num_tokens % self.block_size != 0
        need = self.blocks_for(max_tokens) - full
        if need > self.num_free:
            return None
        for b in seq.blocks[:full]:
            self._take(b)
        self._reserved += need
        child = Sequence(blocks=list(seq.blocks[:full]), num_tokens=num_tokens, hashes=list(seq.hashes[:full]),
                         reserved=need)  # fmt: skip
        if partial:
            self.ensure(child, num_tokens)
            self.copy_block(seq.blocks[full], child.blocks[-1])
        return child

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``dst`` of every layer's keys and values becomes a copy of block ``src``."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        if self.on_copy is not None:
            self.on_copy(self, src, dst)

    def export_prefix(self, tokens: Seq[int]) -> tuple[int, Tensor, Tensor]:
        """The cached full blocks of the longest prefix of `tokens`: (how many tokens, keys, values), keys and
        values as stored, [n_layers, tokens, n_kv_heads, row_width]."""
        blocks = self.match(tokens)
        n = len(blocks) * self.block_size
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)

        def gather(pool: Tensor) -> Tensor:  # [L, nb, Hkv, bs, W] -> [L, nb * bs, Hkv, W]
            return pool[:, index].transpose(2, 3).reshape(self.n_layers, n, self.n_kv_heads, self.row_width)

        return n, gather(self.k), gather(self.v)

    def import_prefix(self, tokens: Seq[int], k: Tensor, v: Tensor) -> int:
        """Put the keys and values of `tokens` ([n_layers, len(tokens), n_kv_heads, row_width], e.g. from a prompt-cache
        file) into the cache as registered blocks (unused, so evictable), for the next prompt that starts with these
        tokens. Whole blocks only: returns how many tokens were imported. Blocks already cached are kept."""
        bs = self.block_size
        full = min(len(tokens) // bs, self.num_free)
        parent = _ROOT
        for b, h in enumerate(block_hashes(tokens[: full * bs], bs)):
            if h not in self._by_hash:
                block = self._allocate()
                shape = (self.n_layers, bs, self.n_kv_heads, self.row_width)
                self.k[:, block] = k[:, b * bs : (b + 1) * bs].reshape(shape).transpose(1, 2).to(self.dtype)
                self.v[:, block] = v[:, b * bs : (b + 1) * bs].reshape(shape).transpose(1, 2).to(self.dtype)
                self._by_hash[h] = block
                self._entry[block] = (h, _Entry(parent, tuple(tokens[b * bs : (b + 1) * bs])))
                self._ref[block] = 0
                self._evictable[block] = None
            elif self._by_hash[h] in self._evictable:
                self._evictable.move_to_end(self._by_hash[h])
            parent = h
        return full * bs

    def forget_prefix(self, tokens: Seq[int]) -> int:
        """Evict the cached blocks of `tokens`' prefix that no sequence uses; returns how many blocks went."""
        gone = 0
        for block in reversed(self.match(tokens)):
            if self._ref[block] == 0:
                self._evictable.pop(block)
                h, _ = self._entry.pop(block)
                del self._by_hash[h]
                self._free.append(block)
                gone += 1
        return gone

    def clear(self) -> None:
        """Drop every cached prefix that no sequence uses."""
        while self._evictable:
            self._free.append(self._evict())

    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            self._evictable.pop(block, None)
        self._ref[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block = self._evict()
        else:
            raise RuntimeError("the KV cache is full")
        self._ref[block] = 1
        return block

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        h, _ = self._entry.pop(block)
        del self._by_hash[h]
        return block

    # Model inputs -------------------------------------------------------------------------------------------
    def view(self, seqs: Seq[Sequence], positions: Tensor, width: int | None = None) -> PagedView:
        """What ``model(tokens, positions, cache=...)`` takes for a batch of `seqs` whose tokens sit at `positions`
        [B, T] (give each sequence its blocks first, ``ensure``). Block tables are padded with the scratch block
        to `width` blocks (default: enough for the largest position), so padding tokens write there."""
        width = max(width or 0, self.blocks_for(int(positions.max()) + 1))
        table = torch.tensor([s.table(width) for s in seqs], dtype=torch.long, device=self.device)
        return PagedView(self, table)

    def prepare(self, seqs: Seq[Sequence], positions: Tensor) -> PagedView:
        """``ensure`` each sequence has blocks up to its largest position in `positions`, then ``view``: for callers
        whose batches have no padding beyond what the sequences may hold (tests, the scorer)."""
        for seq, top in zip(seqs, positions.max(dim=1).values.tolist()):
            self.ensure(seq, top + 1)
        return self.view(seqs, positions)

    def sequence(self, max_tokens: int) -> Sequence:
        """An empty sequence that may grow to `max_tokens` positions (no prefix reuse); a RuntimeError when the
        cache cannot promise them."""
        seq = self.admit([], max_tokens, reuse=False)
        if seq is None:
            raise RuntimeError(f"the KV cache has no room for a sequence of {max_tokens} tokens now")
        return seq


class PagedView:
    """A batch of sequences' block tables over a ``PagedKVCache``: the ``KVCacheView`` a cached forward takes."""

    def __init__(self, cache: PagedKVCache, table: Tensor) -> None:
        self.cache = cache
        self.table = table  # [B, blocks]

    @property
    def key_length(self) -> int:
        return self.table.shape[1] * self.cache.block_size

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cache
        bs = c.block_size
        block = self.table.gather(1, positions // bs)  # [B, T]
        slot = positions % bs
        pool_k, pool_v = c.k[layer], c.v[layer]  # [n_blocks, Hkv, bs, W]
        store = q8_0_rows if c.quantized else (lambda x: x.to(c.dtype))
        pool_k[block, :, slot] = store(k.transpose(1, 2))  # [B, T, Hkv, W]
        pool_v[block, :, slot] = store(v.transpose(1, 2))
        B, blocks = self.table.shape
        keys = pool_k[self.table].transpose(1, 2).reshape(B, c.n_kv_heads, blocks * bs, c.row_width)
        values = pool_v[self.table].transpose(1, 2).reshape(B, c.n_kv_heads, blocks * bs, c.row_width)
        if c.quantized:
            return q8_0_values(keys, c.head_dim, k.dtype), q8_0_values(values, c.head_dim, v.dtype)
        return keys.to(k.dtype), values.to(v.dtype)
