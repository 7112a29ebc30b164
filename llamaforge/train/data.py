"""Pretraining data: ``prepare_data`` turns text, JSONL, Parquet or Hugging Face datasets into tokenized,
packed shards; ``PackedLoader`` serves fixed-length windows of them with an exactly resumable position.

Layout of a prepared directory::

    meta.json                         dtype, tokenizer ids, components with their weights and shards
    shards/<component>/<unit>.train.bin, <unit>.val.bin   flat token ids (uint16 or uint32), each document
                                      as BOS ... EOS, documents back to back
    shards/<component>/<unit>.json    written last for a unit: the unit is done (resume skips it)

Every document goes to train or validation by a hash of (seed, file, index), so the split does not depend on
the number of workers or on an interrupted run. Components ("commoncrawl", "github", ...) keep separate
streams; the loader samples each sequence's component in proportion to the mix weights, as the LLaMA paper
samples its data sources.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_output
from ..errors import UserError

META_FILE = "meta.json"
FORMAT_VERSION = 1
IGNORE_INDEX = -100
_JSONL = (".jsonl", ".ndjson", ".json")
_PARQUET = (".parquet",)
_HF_PREFIX = "hf:"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# Sources ------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One component of the data mix: files, directories, globs or ``hf:<dataset>[:<split>]`` names."""

    name: str
    paths: list[str]
    weight: float = 1.0
    text_key: str = "text"
    glob: str = "**/*"  # which files of a directory to take

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise UserError(f"data source name {self.name!r}: use letters, digits, '_', '-' or '.'")
        if not self.weight > 0:
            raise UserError(f"data source {self.name!r}: weight must be positive, got {self.weight}")
        if isinstance(self.paths, str):
            self.paths = [self.paths]


def load_mix(file: str | os.PathLike) -> list[Source]:
    """Read a data mix from YAML: a list (or ``{sources: [...]}``) of {name, paths, weight, text_key, glob}."""
    import yaml

    file = Path(file)
    data = yaml.safe_load(file.read_text())
    if isinstance(data, dict):
        data = data.get("sources")
    if not isinstance(data, list) or not data:
        raise UserError(f"{file}: expected a list of sources with name, paths and weight")
    sources = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or ("paths" not in item and "path" not in item):
            raise UserError(f"{file}: source #{i + 1} needs 'paths' (files, directories, globs or hf:<name>)")
        item = dict(item)
        paths = item.pop("paths", None) or item.pop("path")
        try:
            sources.append(Source(name=str(item.pop("name", f"source{i}")), paths=paths, **item))
        except TypeError as exc:
            raise UserError(f"{file}: source #{i + 1}: {exc}") from exc
    return sources


@dataclass
class _Unit:
    """A slice of work for one process: several small files, one large file, or one dataset shard."""

    component: str
    index: int
    items: list[str]
    nbytes: int
    text_key: str = "text"
    hf_shard: tuple[int, int] | None = None  # (index, count) for a Hugging Face dataset

    @property
    def stem(self) -> str:
        return f"{self.index:05d}"


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def _expand(source: Source) -> list[str]:
    files: list[str] = []
    for spec in source.paths:
        spec = str(spec)
        if spec.startswith(_HF_PREFIX):
            files.append(spec)
            continue
        path = Path(spec).expanduser()
        if _is_hf_dataset_dir(path):
            files.append(_HF_PREFIX + str(path))
        elif path.is_dir():
            found = sorted(p for p in path.glob(source.glob) if p.is_file() and not _hidden(p.relative_to(path)))
            files.extend(str(p) for p in found)
        elif path.is_file():
            files.append(str(path))
        elif any(ch in spec for ch in "*?["):
            files.extend(str(p) for p in sorted(Path().glob(spec)) if p.is_file())
        else:
            raise FileNotFoundError(f"data source {source.name!r}: no such file or directory: {spec}")
    if not files:
        raise UserError(f"data source {source.name!r}: no input files found in {source.paths}")
    return files


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def _plan_units(sources: Sequence[Source], unit_bytes: int, hf_shards: int) -> list[_Unit]:
    units: list[_Unit] = []
    for source in sources:
        index, pending, size = 0, [], 0
        for item in _expand(source):
            if item.startswith(_HF_PREFIX):
                for k in range(hf_shards):
                    units.append(_Unit(source.name, index, [item], 0, source.text_key, hf_shard=(k, hf_shards)))
                    index += 1
                continue
            nbytes = os.path.getsize(item)
            pending.append(item)
            size += nbytes
            if size >= unit_bytes:
                units.append(_Unit(source.name, index, pending, size, source.text_key))
                index, pending, size = index + 1, [], 0
        if pending:
            units.append(_Unit(source.name, index, pending, size, source.text_key))
    return units


def _documents(item: str, text_key: str, hf_shard: tuple[int, int] | None) -> Iterator[str]:
    """The documents of one input: a text file is one document; JSONL/Parquet/datasets one per record."""
    if item.startswith(_HF_PREFIX):
        yield from _hf_documents(item[len(_HF_PREFIX) :], text_key, hf_shard or (0, 1))
        return
    path = Path(item)
    suffix = path.suffix.lower()
    if suffix in _JSONL:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
                yield _text_field(record, text_key, f"{path}:{lineno}")
    elif suffix in _PARQUET:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if text_key not in table.schema_arrow.names:
            raise UserError(f"{path}: no column {text_key!r} (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[text_key], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        raw = path.read_bytes()
        if b"\x00" in raw[:8192]:  # binary file in a text directory
            return
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            yield text


def _text_field(record: Any, key: str, where: str) -> str:
    if not isinstance(record, dict) or key not in record:
        raise UserError(f"{where}: record has no {key!r} field (set text_key)")
    return str(record[key])


def _hf_documents(spec: str, text_key: str, shard: tuple[int, int]) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise UserError(f"reading Hugging Face dataset {spec!r} needs the 'datasets' package: "
                        "pip install datasets") from exc  # fmt: skip
    path = Path(spec).expanduser()
    if _is_hf_dataset_dir(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        name, _, split = spec.partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
    if text_key not in ds.column_names:
        raise UserError(f"dataset {spec!r}: no column {text_key!r} (columns: {', '.join(ds.column_names)})")
    ds = ds.shard(num_shards=shard[1], index=shard[0], contiguous=True)
    for record in ds.select_columns([text_key]):
        if record[text_key]:
            yield record[text_key]


def _unit_fraction(seed: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


# Preparation --------------------------------------------------------------------------------------
_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _WORKER_TOKENIZER
    if isinstance(tokenizer, (str, os.PathLike)):
        from .. import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    _WORKER_TOKENIZER = tokenizer


def _process_unit(unit: _Unit, out_dir: str, dtype_name: str, val_fraction: float, seed: int) -> dict[str, Any]:
    """Tokenize one unit into its train/val shard files, then write its done-marker (last, atomically)."""
    tok = _WORKER_TOKENIZER
    folder = Path(out_dir) / "shards" / unit.component
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype_name)
    limit = np.iinfo(dtype).max
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    final = {split: folder / f"{unit.stem}.{split}.bin" for split in counts}
    tmp = {split: path.with_suffix(".bin.tmp") for split, path in final.items()}
    handles = {split: open(tmp[split], "wb") for split in counts}  # noqa: SIM115 - closed below
    try:
        for item in unit.items:
            rel = item if item.startswith(_HF_PREFIX) else os.path.basename(item)
            for i, text in enumerate(_documents(item, unit.text_key, unit.hf_shard)):
                shard_tag = f"#{unit.hf_shard[0]}" if unit.hf_shard else ""
                split = "val" if _unit_fraction(seed, f"{rel}{shard_tag}:{i}") < val_fraction else "train"
                ids = tok.encode(text, bos=True, eos=True)
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.max() > limit or arr.min() < 0):
                    raise UserError(f"{item}: token id {int(arr.max())} does not fit {dtype_name}")
                arr.astype(dtype).tofile(handles[split])
                counts[split] += arr.size
                docs[split] += 1
    finally:
        for fh in handles.values():
            fh.close()
    for split in counts:
        os.replace(tmp[split], final[split])
    marker = {"items": unit.items, "hf_shard": unit.hf_shard, "tokens": counts, "documents": docs,
              "val_fraction": val_fraction, "seed": seed, "dtype": dtype_name}  # fmt: skip
    with atomic_output(folder / f"{unit.stem}.json", is_dir=False) as tmp_marker:
        tmp_marker.write_text(json.dumps(marker))
    return {"unit": unit, **marker}


def _done(unit: _Unit, out_dir: Path, dtype_name: str, val_fraction: float, seed: int) -> dict[str, Any] | None:
    """The unit's marker when a previous run finished the same unit with the same settings."""
    folder = out_dir / "shards" / unit.component
    marker = folder / f"{unit.stem}.json"
    if not marker.exists():
        return None
    try:
        data = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    same = (data.get("items") == unit.items and data.get("val_fraction") == val_fraction
            and data.get("seed") == seed and data.get("dtype") == dtype_name
            and (tuple(data["hf_shard"]) if data.get("hf_shard") else None) == unit.hf_shard)  # fmt: skip
    files_ok = all((folder / f"{unit.stem}.{s}.bin").exists() for s in ("train", "val"))
    return {"unit": unit, **data} if same and files_ok else None


def prepare_data(sources: Sequence[Source], out_dir: str | os.PathLike, tokenizer: Any, *,
                 val_fraction: float = 0.005, seed: int = 0, workers: int | None = None,
                 unit_bytes: int = 16 << 20, hf_shards: int | None = None, progress: bool = True,
                 tokenizer_source: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Tokenize and pack ``sources`` into ``out_dir``; return the metadata written to ``meta.json``.

    ``tokenizer`` is a tokenizer object (``encode(text, bos=, eos=)``, ``bos_id``, ``eos_id``,
    ``vocab_size``) or a source for ``llamaforge.load_tokenizer``. Units finished by an earlier, interrupted
    run with the same settings are kept, so running the same command again resumes.
    """
    from tqdm.auto import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UserError(f"data source names must be unique, got {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        from .. import load_tokenizer
        from ..llm import resolve_source

        tokenizer_source = tokenizer_source or str(tokenizer)
        tokenizer = resolve_source(tokenizer)  # a built-in name or hub id becomes its cached path, once for all workers
        tok = load_tokenizer(tokenizer)
        worker_tokenizer: Any = tokenizer
    else:
        tok = tokenizer
        worker_tokenizer = tokenizer if tokenizer_source is None else tokenizer_source
    vocab_size = int(tok.vocab_size)
    dtype_name = "uint16" if vocab_size <= 2**16 else "uint32"
    workers = max(1, workers or os.cpu_count() or 1)
    units = _plan_units(sources, unit_bytes, hf_shards or workers)

    results: list[dict[str, Any]] = []
    todo: list[_Unit] = []
    for unit in units:
        done = _done(unit, out, dtype_name, val_fraction, seed)
        (results.append(done) if done else todo.append(unit))
    total_bytes = sum(u.nbytes for u in todo) or None
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare-data", disable=not progress)
    if results:
        bar.write(f"resuming: {len(results)} of {len(units)} units already done")
    args = (str(out), dtype_name, val_fraction, seed)
    if workers == 1 or len(todo) <= 1:
        _init_worker(worker_tokenizer)
        for unit in todo:
            results.append(_process_unit(unit, *args))
            bar.update(unit.nbytes)
    else:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                    initargs=(worker_tokenizer,)) as pool:  # fmt: skip
            futures = [pool.submit(_process_unit, unit, *args) for unit in todo]
            for fut in cf.as_completed(futures):
                result = fut.result()
                results.append(result)
                bar.update(result["unit"].nbytes)
    bar.close()

    components: dict[str, Any] = {}
    for source in sources:
        mine = sorted((r for r in results if r["unit"].component == source.name), key=lambda r: r["unit"].index)
        entry: dict[str, Any] = {"weight": source.weight, "train": [], "val": [], "train_tokens": 0,
                                 "val_tokens": 0, "documents": 0}  # fmt: skip
        for r in mine:
            entry["documents"] += r["documents"]["train"] + r["documents"]["val"]
            for split in ("train", "val"):
                if r["tokens"][split]:
                    entry[split].append(f"shards/{source.name}/{r['unit'].stem}.{split}.bin")
                    entry[f"{split}_tokens"] += r["tokens"][split]
        components[source.name] = entry
    if val_fraction > 0 and not any(c["val_tokens"] for c in components.values()):
        n_docs = sum(c["documents"] for c in components.values())
        warnings.warn(f"{out}: 0 validation tokens: none of the {n_docs:,} documents went to the validation split "
                      f"(val_fraction {val_fraction:g}), so pretraining on this data reports no validation loss. "
                      "Rerun prepare-data with a larger --val-fraction (e.g. 0.1; each text file is one document, "
                      "each JSONL/Parquet record one)", stacklevel=2)  # fmt: skip
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name,
        "vocab_size": vocab_size,
        "bos_id": getattr(tok, "bos_id", None),
        "eos_id": getattr(tok, "eos_id", None),
        "tokenizer": tokenizer_source,
        "val_fraction": val_fraction,
        "seed": seed,
        "components": components,
    }
    with atomic_output(out / META_FILE, is_dir=False) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return meta


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{data_dir}: not a prepared data directory (no {META_FILE}); "
                                "run `llamaforge prepare-data` first")  # fmt: skip
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported format_version {meta.get('format_version')}")
    return meta


# Loading --------------------------------------------------------------------------------------------
class TokenStream:
    """The concatenation of a component's shard files, memory-mapped; ``read(start, n)`` crosses files."""

    def __init__(self, files: Sequence[Path], dtype: str) -> None:
        self.arrays = [np.memmap(f, dtype=np.dtype(dtype), mode="r") for f in files if os.path.getsize(f)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < n:
            local = start + filled - int(self.offsets[i])
            take = min(n - filled, len(self.arrays[i]) - local)
            out[filled : filled + take] = self.arrays[i][local : local + take]
            filled += take
            i += 1
        return out


def _mix64(x: int) -> int:
    """splitmix64: a cheap, well-spread integer hash (deterministic sampling without RNG state)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _affine_permutation(n: int, seed: int) -> tuple[int, int]:
    """(a, b) with gcd(a, n) = 1, so j -> (a*j + b) mod n is a permutation of range(n) in O(1) memory."""
    if n <= 1:
        return 1, 0
    a = _mix64(seed) % n or 1
    while math.gcd(a, n) != 1:
        a = a + 1 if a + 1 < n else 1
    return a, _mix64(seed ^ 0x5DEECE66D) % n


def document_mask(tokens: torch.Tensor, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """Causal mask [B, 1, T, T] (True = attend) that also keeps each token inside its own document."""
    if bos_id is not None:
        starts = tokens == bos_id
    elif eos_id is not None:
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[:, 1:] = tokens[:, :-1] == eos_id
    else:
        raise ValueError("document masking needs the tokenizer's bos_id or eos_id in the data's meta.json")
    doc = starts.long().cumsum(-1)
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    return (doc[:, :, None] == doc[:, None, :]).logical_and_(causal)[:, None]


@dataclass
class LoaderState:
    step: int = 0  # optimizer steps served
    drawn: dict[str, int] = field(default_factory=dict)  # sequences taken from each component


class PackedLoader:
    """Fixed-length training windows from a prepared directory, identical on every rank.

    Each optimizer step takes ``micro_batch_size * grad_accum_steps * world_size`` sequences of
    ``seq_len + 1`` tokens. Sequence ``i`` of the run draws its component by a hash of (seed, i) weighted by
    the mix, then that component's next window in a per-epoch shuffled order. The whole position is two
    integers per component, so resuming is exact; every rank computes the same plan and reads only its rows
    (micro-batch m of rank r holds sequences ``m*world*mb + r*mb ...``), so a run on N processes sees the same
    global batch as one process with N times the micro-batch.
    """

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, micro_batch_size: int, grad_accum_steps: int = 1,
                 *, rank: int = 0, world_size: int = 1, seed: int = 0, mix: dict[str, float] | None = None,
                 doc_mask: bool = False, device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.dir = Path(data_dir)
        meta = read_meta(self.dir)
        self.meta = meta
        self.seq_len, self.micro, self.accum = seq_len, micro_batch_size, grad_accum_steps
        self.rank, self.world, self.seed = rank, world_size, seed
        self.doc_mask, self.device = doc_mask, torch.device(device)
        self.bos_id, self.eos_id = meta.get("bos_id"), meta.get("eos_id")
        weights = {name: float(c["weight"]) for name, c in meta["components"].items()}
        if mix:
            unknown = sorted(set(mix) - set(weights))
            if unknown:
                raise UserError(f"data mix names unknown components {unknown}; {self.dir} has {sorted(weights)}")
            weights = {name: float(mix.get(name, 0.0)) for name in weights}
        self.streams: dict[str, TokenStream] = {}
        self.chunks: dict[str, int] = {}
        for name, comp in meta["components"].items():
            if weights[name] <= 0:
                continue
            stream = TokenStream([self.dir / f for f in comp["train"]], meta["dtype"])
            n = (len(stream) - 1) // seq_len
            if n < 1:
                raise UserError(f"{self.dir}: component {name!r} has {len(stream)} training tokens, fewer "
                                f"than one sequence of {seq_len + 1}")  # fmt: skip
            self.streams[name], self.chunks[name] = stream, n
        if not self.streams:
            raise UserError(f"{self.dir}: the data mix gives no component a positive weight")
        self.names = list(self.streams)
        total = sum(weights[n] for n in self.names)
        self.cumulative = np.cumsum([weights[n] / total for n in self.names])
        self.state = LoaderState(drawn=dict.fromkeys(self.names, 0))
        self._perms: dict[str, tuple[int, int, int]] = {}

    @property
    def weights(self) -> dict[str, float]:
        probs = np.diff(np.concatenate([[0.0], self.cumulative]))
        return dict(zip(self.names, probs.tolist()))

    @property
    def sequences_per_step(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len

    def _component(self, sample: int) -> int:
        u = _mix64((self.seed << 40) ^ sample) / 2**64
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.names) - 1)

    def _window_start(self, name: str, k: int) -> int:
        n = self.chunks[name]
        epoch, j = divmod(k, n)
        cached = self._perms.get(name)
        if cached is None or cached[0] != epoch:  # one epoch's permutation per component, O(1) memory
            comp_seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")
            cached = (epoch, *_affine_permutation(n, (self.seed * 1_000_003 + comp_seed) * 65_537 + epoch))
            self._perms[name] = cached
        _, a, b = cached
        return ((a * j + b) % n) * self.seq_len

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step: dicts with ``tokens`` and ``targets``
        [micro, seq_len] (and ``attn_mask`` with document masking)."""
        first = self.state.step * self.sequences_per_step
        plan: list[tuple[str, int]] = []
        for i in range(self.sequences_per_step):
            name = self.names[self._component(first + i)]
            plan.append((name, self._window_start(name, self.state.drawn[name])))
            self.state.drawn[name] += 1
        self.state.step += 1
        batches = []
        for m in range(self.accum):
            lo = (m * self.world + self.rank) * self.micro
            rows = [self.streams[name].read(start, self.seq_len + 1) for name, start in plan[lo : lo + self.micro]]
            batches.append(self._batch(np.stack(rows)))
        return batches

    def _batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        data = torch.from_numpy(windows)
        batch = {"tokens": data[:, :-1].contiguous(), "targets": data[:, 1:].contiguous()}
        if self.doc_mask:
            batch["attn_mask"] = document_mask(batch["tokens"], self.bos_id, self.eos_id)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.state.step, "drawn": dict(self.state.drawn), "seed": self.seed,
                "sequences_per_step": self.sequences_per_step, "seq_len": self.seq_len}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seq_len", "sequences_per_step", "seed"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise UserError(f"cannot resume the data position: checkpoint has {key}={state[key]}, "
                                f"this run has {getattr(self, key)} (keep the global batch and seq_len)")  # fmt: skip
        drawn = dict.fromkeys(self.names, 0)
        drawn.update({k: int(v) for k, v in state["drawn"].items() if k in drawn})
        self.state = LoaderState(step=int(state["step"]), drawn=drawn)


class ValidationSet:
    """A fixed validation set: ``batches`` global batches of windows spread evenly over the whole validation
    split (all components concatenated, so every part is represented), each rank taking its rows; the same
    windows at every evaluation."""

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, micro_batch_size: int, batches: int, *,
                 rank: int = 0, world_size: int = 1, doc_mask: bool = False,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        meta = read_meta(data_dir)
        files = [Path(data_dir) / f for c in meta["components"].values() for f in c["val"]]
        self.stream = TokenStream(files, meta["dtype"])
        self.seq_len, self.micro, self.rank, self.world = seq_len, micro_batch_size, rank, world_size
        self.doc_mask, self.device = doc_mask, torch.device(device)
        self.bos_id, self.eos_id = meta.get("bos_id"), meta.get("eos_id")
        self.n_windows = (len(self.stream) - 1) // seq_len if len(self.stream) else 0
        self.batches = min(batches, self.n_windows // (micro_batch_size * world_size))
        self.stride = self.n_windows / max(1, self.batches * micro_batch_size * world_size)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for b in range(self.batches):
            lo = (b * self.world + self.rank) * self.micro
            rows = [self.stream.read(int((lo + i) * self.stride) * self.seq_len, self.seq_len + 1)
                    for i in range(self.micro)]  # fmt: skip
            data = torch.from_numpy(np.stack(rows))
            batch = {"tokens": data[:, :-1].contiguous(), "targets": data[:, 1:].contiguous()}
            if self.doc_mask:
                batch["attn_mask"] = document_mask(batch["tokens"], self.bos_id, self.eos_id)
            yield {k: v.to(self.device) for k, v in batch.items()}
