"""Headless Chromium for browser tests: Debian's chromium, driven by Playwright for Python.

Playwright's Python wheel carries its own driver; the browser is the system's chromium
(``executable_path``), never one Playwright downloads. ``chromium_page()`` starts it headless,
with a fresh temporary profile (Playwright's own --user-data-dir) and the flags a sandbox without
a network needs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path(os.environ.get("GPTPIPE_CHROMIUM", "/usr/bin/chromium"))

# Playwright adds --headless itself. Without the background-networking flags Chromium keeps
# trying to reach Google's hosts, which a closed network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

VIEWPORT = {"width": 1280, "height": 800}


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when Chromium and Playwright are present."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM}: `apt-get install chromium` or set GPTPIPE_CHROMIUM"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed: pip install playwright"
    return None


@contextmanager
def chromium_page(allowed_origin: str, timeout_s: float = 30) -> Iterator[Page]:
    """A page in a fresh headless Chromium that may only reach ``allowed_origin``.

    Every other request (a UI's telemetry, fonts from a CDN) is aborted, so the page behaves
    the same with or without a network.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.route(
                lambda url: not url.startswith(allowed_origin), lambda route: route.abort()
            )
            page = context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            yield page
        finally:
            browser.close()


class Screenshots:
    """Saves page screenshots in ``folder`` and copies them to $GPTPIPE_SCREENSHOTS when set."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        keep = os.environ.get("GPTPIPE_SCREENSHOTS")
        self.keep = Path(keep) if keep else None
        self.saved: list[Path] = []

    def take(self, page: Page, name: str) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path))
        self.saved.append(path)
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, self.keep / path.name)
        return path
