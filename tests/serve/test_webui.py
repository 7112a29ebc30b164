"""The chat page as the server ships it (HTTP level; tests/serve/test_webui_browser.py drives it in a browser)."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from chromium import require_browser
from conftest import API_KEY, free_port, run_server

from llamaforge.cli import build_parser
from llamaforge.serve.webui import CSP, STATIC_DIR

ROOT = Path(__file__).resolve().parents[2]
TYPES = {".html": "text/html", ".js": "javascript", ".css": "text/css"}


def test_page_and_its_files_need_no_key_but_the_api_still_does(server):
    page = httpx.get(server.base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    for src in re.findall(r'(?:src|href)="(/webui/[^"]+)"', page.text):
        assert (STATIC_DIR / src.removeprefix("/webui/")).is_file(), src
    files = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())
    assert {p.suffix for p in files} == set(TYPES)
    for path in files:
        r = httpx.get(f"{server.base_url}/webui/{path.name}")
        assert r.status_code == 200 and TYPES[path.suffix] in r.headers["content-type"], path.name
        assert r.content == path.read_bytes() and r.headers["cache-control"] == "no-cache"
    # The API behind the page keeps its key; the page's own paths do not open anything else.
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    assert httpx.get(server.base_url + "/webui/../metrics").status_code in (401, 404)
    missing = httpx.get(server.base_url + "/webui/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_no_webui_serves_the_api_only(tiny_model_dir):
    with run_server(tiny_model_dir, webui=False, api_key=API_KEY) as srv:
        for path in ("/", "/webui/app.js"):
            r = httpx.get(srv.base_url + path, headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
        assert httpx.get(srv.base_url + "/").status_code == 401  # without the page, / is just another API path
        assert srv.http().get("/v1/models").status_code == 200


def test_llamaforge_serve_serves_the_page(tiny_model_dir):
    """The real command, as a user starts it: the page at / (even before the model is loaded), its address printed."""
    port = free_port()
    command = [sys.executable, "-m", "llamaforge", "serve", "--model", str(tiny_model_dir), "--port", str(port),
               "--log-level", "warning", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/")
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert page.status_code == 200 and "<title>llamaforge</title>" in page.text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert f"chat page at http://127.0.0.1:{port}/" in out, out


def test_cli_flag():
    parser = build_parser()
    assert parser.parse_args(["serve"]).webui is True
    assert parser.parse_args(["serve", "--no-webui"]).webui is False
    assert "--no-webui" in parser._subparsers._group_actions[0].choices["serve"].format_help()


def test_a_missing_browser_skips_the_browser_tests_except_where_they_are_required(monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("LLAMAFORGE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        require_browser()
    monkeypatch.setenv("LLAMAFORGE_REQUIRE_BROWSER", "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="LLAMAFORGE_REQUIRE_BROWSER=1 but chromium is not installed"):
        require_browser()
    assert "LLAMAFORGE_REQUIRE_BROWSER=1" in (ROOT / ".ci" / "run").read_text()


def test_the_page_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llamaforge"]
    package = ROOT / "llamaforge"
    for path in STATIC_DIR.iterdir():
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not in package-data"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and self.tags[-1][0] == "script" and data.strip():
            self.inline_script = True


def test_the_page_never_turns_text_into_html():
    """No code path in the page parses HTML (model output can only become text nodes), and the page itself has
    no inline script, style or handler, which its Content-Security-Policy would block."""
    for path in STATIC_DIR.glob("*.js"):
        code = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser",
                     "createContextualFragment", "eval(", "new Function", "srcdoc"):  # fmt: skip
            assert sink not in code, f"{path.name} uses {sink}"
    tags = _Tags()
    tags.feed((STATIC_DIR / "index.html").read_text())
    assert not tags.inline_script
    for tag, attrs in tags.tags:
        assert "style" not in attrs and not any(a.startswith("on") for a in attrs), (tag, attrs)
        if tag in ("script", "link") and (attrs.get("src") or attrs.get("href", "")).startswith("http"):
            pytest.fail(f"the page loads {tag} from another site (it must work offline): {attrs}")
