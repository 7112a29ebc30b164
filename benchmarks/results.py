"""RESULTS.md bookkeeping shared by every benchmark: replace one section, keep all the others.

Benchmarks run as scripts (``python benchmarks/bench_x.py``), so this module is imported by plain name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(text: str, parent: str | None = None, path: Path = RESULTS) -> None:
    """Put `text`, whose first line is a Markdown heading ("## Serving", "### Training speed"), into
    `path`, replacing the block under the same heading (inside the `parent` heading's block when given)
    or appending it there. The file is rewritten atomically."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    lines = old.rstrip("\n").splitlines()
    lo, hi = 0, len(lines)
    if parent is not None:
        found = _block(lines, parent, lo, hi)
        if found is None:
            lines += ["", parent]
            found = (len(lines) - 1, len(lines))
        lo, hi = found
    new = [*text.strip("\n").splitlines(), ""]
    found = _block(lines, new[0].strip(), lo, hi)
    if found is None:
        lines[hi:hi] = ["", *new] if hi == len(lines) else [*new]
    else:
        lines[found[0] : found[1]] = new
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")
    os.replace(tmp, path)


def _block(lines: list[str], heading: str, lo: int, hi: int) -> tuple[int, int] | None:
    """[start, end) of the block under `heading`: up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    for start in range(lo, hi):
        if lines[start].strip() == heading:
            end = start + 1
            while end < hi and not _is_heading(lines[end], level):
                end += 1
            return start, end
    return None


def _is_heading(line: str, max_level: int) -> bool:
    hashes = len(line) - len(line.lstrip("#"))
    return 0 < hashes <= max_level and line[hashes : hashes + 1] == " "
