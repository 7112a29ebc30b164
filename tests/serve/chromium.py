"""Debian's chromium driven by Playwright (its own browser download does not work offline), for the chat page's
tests and for docs/screenshots.py.

Without chromium the browser tests skip, unless LLAMAFORGE_REQUIRE_BROWSER=1 (set by .ci/run, which installs
chromium), where they fail: CI must not pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """$LLAMAFORGE_CHROMIUM (when it is a file), else chromium on the PATH."""
    given = os.environ.get("LLAMAFORGE_CHROMIUM")
    if given:
        return given if os.path.isfile(given) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"Playwright is not installed ({exc}); pip install -e '.[test]'"
    if chromium_path() is None:
        return "chromium is not installed (apt-get install chromium), or set LLAMAFORGE_CHROMIUM to its path"
    return None


def require_browser() -> None:
    """Skip the calling test when the browser is missing; fail it instead under LLAMAFORGE_REQUIRE_BROWSER=1."""
    missing = browser_missing()
    if missing is None:
        return
    if os.environ.get("LLAMAFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LLAMAFORGE_REQUIRE_BROWSER=1 but {missing}")
    pytest.skip(missing)


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
