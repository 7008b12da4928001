"""Drive Debian's Chromium headless from tests: dump a page's DOM after its scripts ran, or
take a screenshot. Flags keep it off the network (the machine has none but loopback)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, url: str, extra: list[str], budget_ms: int, timeout_s: float) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-500:]}")
    return done.stdout


def dump_dom(browser: str, url: str, *, budget_ms: int = 2500, timeout_s: float = 60) -> str:
    return _run(browser, url, ["--dump-dom"], budget_ms, timeout_s)


def screenshot(
    browser: str, url: str, path: Path, *, size=(1300, 900), budget_ms: int = 2500, timeout_s: float = 60
) -> Path:
    _run(browser, url, [f"--window-size={size[0]},{size[1]}", f"--screenshot={path}"], budget_ms, timeout_s)
    return path
