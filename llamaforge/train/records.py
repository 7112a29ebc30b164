"""Records of fine-tuning data files (instructions, conversations, preference pairs) and where each came from.

A file is a JSON array (indented or on one line, as ``json.dump`` and ``Dataset.to_json(lines=False)`` write
it), JSONL, Parquet, or a directory written by ``datasets.Dataset.save_to_disk``. Every record carries its
index in the file, which is its identity (the train/validation split hashes it, so the split does not depend
on the file's layout), and a location for messages ("line 12", "record 3 (line 1)").

Records that cannot be used raise ``BadExample``; a ``DataReport`` collects them by reason so a run can skip
them with a count and their locations in the log, and fail only when nothing usable is left.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import UserError


class BadExample(ValueError):  # noqa: N818 - a record, not a program error
    """One record cannot be used; ``reason`` groups the report (``missing field``, ``too long`` ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Record:
    index: int  # position among the file's records, from 0
    line: int  # line the record starts on (0 where a format has no lines)
    value: Any  # the parsed record, or a BadExample when it could not be parsed
    where: str  # for messages: "line 12" (JSONL), "record 3 (line 1)" (JSON array), "record 3" (Parquet)


def read_records(path: str | os.PathLike) -> Iterator[Record]:
    """Each record of a JSON array, JSONL, Parquet file or ``save_to_disk`` dataset directory, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.is_dir() or path.suffix.lower() == ".parquet":
        yield from _read_table(path)
        return
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":
        yield from _read_json_array(path, text, start)
        return
    index = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            value = BadExample("invalid JSON", exc.msg)
        yield Record(index, n, value, f"line {n}")
        index += 1


def _read_json_array(path: Path, text: str, pos: int) -> Iterator[Record]:
    """Each element of a top-level JSON array with the line it starts on (``json.load`` would lose that)."""
    decoder = json.JSONDecoder()
    line, last, index = 1, 0, 0

    def line_at(i: int) -> int:
        nonlocal line, last
        line += text.count("\n", last, i)
        last = i
        return line

    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise UserError(f"{path}: the JSON array is not closed (line {line_at(pos)})")
        if text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:  # the rest of the array cannot be parsed reliably
            raise UserError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} (record {index + 1}): "
                            f"{exc.msg}") from None  # fmt: skip
        n = line_at(pos)
        yield Record(index, n, obj, f"record {index + 1} (line {n})")
        index, pos = index + 1, end


def _read_table(path: Path) -> Iterator[Record]:
    """Rows of a Parquet file (pyarrow) or of a ``datasets`` directory (``load_from_disk``) as records."""
    if path.is_dir():
        try:
            import datasets
        except ImportError as exc:
            raise UserError(f"{path}: reading a Hugging Face dataset directory needs the 'datasets' package "
                            "(pip install datasets), or export it with Dataset.to_json") from exc  # fmt: skip
        if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            raise UserError(f"{path} is a directory but not a saved Hugging Face dataset; give a JSON, JSONL or "
                            "Parquet file")  # fmt: skip
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        rows: Any = iter(ds)
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise UserError(f"{path}: reading Parquet needs the 'pyarrow' package (pip install pyarrow)") from exc
        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
    for index, row in enumerate(rows):
        yield Record(index, 0, row, f"record {index + 1}")


@dataclass
class DataReport:
    """What came out of a data file: kept examples and skipped records grouped by reason."""

    path: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> [(where, detail)]

    def add(self, where: str, bad: BadExample) -> None:
        self.skipped.setdefault(bad.reason, []).append((where, bad.detail))

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, max_lines: int = 5, noun: str = "examples") -> str:
        head = f"{self.path}: {self.kept} of {self.total} {noun} kept"
        if not self.skipped:
            return head
        parts = []
        for reason, items in sorted(self.skipped.items(), key=lambda kv: -len(kv[1])):
            shown = "; ".join(f"{where}: {d}" for where, d in items[:max_lines])
            more = f"; ... {len(items) - max_lines} more" if len(items) > max_lines else ""
            parts.append(f"  {reason} ({len(items)}): {shown}{more}")
        return f"{head}, {self.n_skipped} skipped:\n" + "\n".join(parts)


class _Indexed(Protocol):
    index: int


T = TypeVar("T", bound=_Indexed)


def split_by_index(items: Sequence[T], val_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, validation): an item goes to validation by a hash of (seed, its index in the file), so the split
    is the same on every rank and run whatever the file's layout. With two or more items both sides keep at
    least one; the training side is never empty."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"finetune.val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(items) < 2:
        return list(items), []

    def u(i: int) -> float:
        digest = hashlib.blake2b(f"{seed}:{items[i].index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    n_val = min(len(items) - 1, max(1, round(val_fraction * len(items))))
    val = set(sorted(range(len(items)), key=u)[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]
