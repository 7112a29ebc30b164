"""Hypothesis settings for the fuzz tests (tests/hardening), and the property they all check.

Profiles: ``default`` (a few hundred examples per reader, a fast default run), ``slow`` (used by the tests marked
``slow``: many more examples) and ``ci`` (derandomized, so a CI run is reproducible; chosen when ``$CI`` is set).
Hypothesis prints the seed of a failing run (``--hypothesis-seed=N`` replays it) and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # hangs are caught by the explicit time bound in `refuses_cleanly`, not by per-example timing
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile("default", max_examples=200, **_COMMON)
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.load_profile("ci" if os.environ.get("CI") else "default")

SLOW_EXAMPLES = 3000  # per reader in the `slow` run
TIME_LIMIT = 10.0  # seconds one load may take on a file of a few KB before it counts as a hang
MEMORY_LIMIT = 1 << 30  # growth of the peak RSS over a whole fuzz test that counts as unbounded memory


def refuses_cleanly(path: Path, load: Callable[[Path], Any], errors: tuple[type[BaseException], ...]) -> Any:
    """`load(path)` returns, or raises one of `errors` with a message naming `path`: never another exception,
    and never slower than TIME_LIMIT. Returns what `load` returned (None when it refused)."""
    import time

    start = time.monotonic()
    try:
        result = load(path)
    except errors as exc:
        assert path.name in str(exc), f"the error does not name the file: {type(exc).__name__}: {exc}"
        result = None
    elapsed = time.monotonic() - start
    assert elapsed < TIME_LIMIT, f"loading took {elapsed:.1f} s"
    return result


@pytest.fixture
def bounded_memory():
    """Fails the test when the process's peak RSS grew by more than MEMORY_LIMIT while it ran."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MEMORY_LIMIT, f"peak memory grew by {grown / 2**20:.0f} MiB while fuzzing"
