"""How much memory this process may still use, and a refusal with the numbers when a load would not fit."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


class InsufficientMemoryError(UserError, MemoryError):
    """A model that would not fit in the memory available: says what was needed and what is available."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError  # unreachable


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None when there is no limit."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().splitlines()[-1].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / cgroup.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, IndexError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory this process can still take without swapping or being killed: the kernel's MemAvailable (free memory
    plus reclaimable caches), or less under a cgroup limit. None where neither can be read (not Linux)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


def check_fits(needed: int, what: str, hint: str = "") -> None:
    """Raise InsufficientMemoryError, before anything is allocated, when `needed` bytes exceed what is available.
    ``LLAMAFORGE_SKIP_MEMORY_CHECK=1`` skips the check (e.g. to rely on swap)."""
    if os.environ.get("LLAMAFORGE_SKIP_MEMORY_CHECK", "").strip() in ("1", "true", "yes"):
        return
    available = available_bytes()
    if available is not None and needed > available:
        raise InsufficientMemoryError(
            f"{what} needs {format_bytes(needed)} of memory but only {format_bytes(available)} is available"
            + (f"; {hint}" if hint else "")
        )
