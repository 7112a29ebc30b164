"""The browser chat page: static files from ``serve/static/`` (no build step, nothing fetched from a CDN).

``GET /`` is the page and ``/webui/*`` its scripts and styles. They are public (the API key guards the API,
not the page): the page asks for the key when the API answers 401 and keeps it in the browser's storage. The page
talks to the server only through the public OpenAI-compatible API. Its Content-Security-Policy allows scripts,
styles and requests from this origin only, a second wall behind the page's own rule of turning model output into
text nodes, never into HTML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")
ASSETS = "/webui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# no-cache: the browser revalidates (a cheap 304), so an upgraded llamaforge never runs a stale mix of modules.
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def is_page_path(path: str) -> bool:
    """Paths of the page and its files (served without the API key)."""
    return path == "/" or path.startswith(ASSETS + "/")


class _Assets(StaticFiles):
    async def get_response(self, path: str, scope: Any) -> Any:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def add_webui(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its files under ``/webui/``."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():  # a broken install (package data missing): say so at start, not with a 404 later
        raise RuntimeError(f"the web UI's files are missing from {STATIC_DIR}; reinstall llamaforge or use --no-webui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=HEADERS)

    app.mount(ASSETS, _Assets(directory=STATIC_DIR), name="webui")
