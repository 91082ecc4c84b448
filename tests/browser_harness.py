"""One way to drive the dashboard in a real browser, shared by the browser tests and bench/dashboard.py:
start `streamlit run dashboard/app.py -- --atlas ...` as README says, launch Debian's Chromium through
Playwright, and wait for a state of the page (script idle, images loaded), never for a time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"

_IDLE_JS = ("() => { const a = document.querySelector('[data-testid=stApp]');"
            " return a && a.getAttribute('data-test-script-state') === 'notRunning'"
            " && [...document.images].every(i => i.complete)"
            " && !document.querySelector('[data-testid=stSkeleton], [data-testid=stSkeletonElement]'); }")


def missing_browser() -> str | None:
    """Why a browser run cannot happen here (None when Chromium and Playwright are both installed)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: install Debian's Chromium (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -r requirements-test.txt"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dashboard_server(atlas: Path, *app_args: str, log: Path | None = None,
                     startup_s: float = 120) -> Iterator[dict]:
    """Run the dashboard on `atlas` (extra script arguments after it, e.g. --notes FILE); yields
    {url, port, pid, start_s: seconds until it answered, the atlas read at start included}. Raises RuntimeError (with the log's tail) when the server exits or never answers."""
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port",
                             str(port), "--", "--atlas", str(atlas), *app_args],
                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        deadline = started + startup_s
        while True:  # poll the health endpoint: the server is up when it answers
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-2000:] if log else ""
                    raise RuntimeError(f"the dashboard did not start (exit {proc.poll()}): {tail}")
                time.sleep(0.5)
        yield {"url": url, "port": port, "pid": proc.pid, "start_s": time.monotonic() - started}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if log:
            out.close()


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium (Playwright Browser)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def idle(pg, timeout_ms: float = 60_000) -> None:
    """Wait until the script has finished, every image has loaded and no skeleton is left."""
    pg.wait_for_function(_IDLE_JS, timeout=timeout_ms)


def expect(target):
    """playwright's expect (imported late: modules using this import where playwright is missing)."""
    from playwright.sync_api import expect as _expect
    return _expect(target)
