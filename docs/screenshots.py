"""Take the README's screenshots of the chat page (light and dark) with the built-in model.

    python docs/screenshots.py            # writes docs/webui-light.png and docs/webui-dark.png

Serves the built-in SmolLM2 model on a free loopback port, asks it two questions in Debian's chromium (driven by
Playwright, as the tests do) and saves the page as it is then. The answers are the model's own (greedy).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests" / "serve"))  # the chromium launcher the browser tests use

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a word is a palindrome, then explain it in two bullet points.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the PNGs (default: docs/)")
    args = parser.parse_args()

    import uvicorn
    from chromium import browser_missing, launch
    from playwright.sync_api import sync_playwright

    import llamaforge
    from llamaforge.serve import ServerConfig, create_app, server_state

    missing = browser_missing()
    if missing:
        sys.exit(f"screenshots: {missing}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServerConfig(model_name="smollm2-135m-instruct", max_seq_len=2048),
                     llm=llamaforge.load("smollm2-135m-instruct"))  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not (server.started and server_state(app).ready):
        time.sleep(0.05)
    try:
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1280, "height": 820}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}/")
            page.click("#toggle-settings")
            page.fill("#settings-form [name=temperature]", "0")
            page.fill("#settings-form [name=max_tokens]", "400")
            page.click("#toggle-settings")
            for i, question in enumerate(QUESTIONS):
                if i:
                    page.click("#new-chat")
                page.fill("#input", question)
                page.press("#input", "Enter")
                answered = "() => document.querySelector('#stop').hidden && document.querySelector('.msg.assistant')"
                page.wait_for_function(answered, timeout=300_000)
            page.locator("#input").blur()
            for scheme in ("light", "dark"):
                page.emulate_media(color_scheme=scheme)
                path = args.out / f"webui-{scheme}.png"
                page.screenshot(path=str(path))
                print(f"wrote {path}")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


if __name__ == "__main__":
    main()
