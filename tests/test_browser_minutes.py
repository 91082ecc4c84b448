"""In Chromium: name a concept in the dashboard (the notes file is written, the atlas stays
byte-identical), download the meeting report from the sidebar, and open it with every image loaded.
Runs on the tiny generated atlas (no ../shared). Skips when Chromium or Playwright is missing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tiny_atlas import REPO, TESTS, tiny_atlas  # noqa: F401  (tiny_atlas is a fixture)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 120_000  # the first page load reads the atlas and imports scikit-learn; slow on a busy 2-core host
NAME = "tumour epithelium"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def served(tiny_atlas, tmp_path_factory):
    """`streamlit run dashboard/app.py -- --atlas A --notes A.notes.json` on a copy of the tiny atlas."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's Chromium (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -r "
                        "requirements-test.txt")
    folder = tmp_path_factory.mktemp("minutes-browser")
    atlas = folder / "atlas.h5"
    shutil.copyfile(tiny_atlas, atlas)
    notes = folder / "atlas.h5.notes.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "streamlit-minutes-server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port), "--",
             "--atlas", str(atlas), "--notes", str(notes)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "streamlit exited; see test-artifacts/streamlit-minutes-server.log"
                time.sleep(0.5)
        yield {"url": url, "atlas": atlas, "notes": notes, "sha": sha(atlas), "folder": folder}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def idle(pg) -> None:
    pg.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=stApp]');"
        " return a && a.getAttribute('data-test-script-state') === 'notRunning'"
        " && [...document.images].every(i => i.complete); }", timeout=TIMEOUT_MS)


def clean(pg, errors: list[str]) -> None:
    boxes = pg.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()
    assert not errors, errors


def test_name_a_concept_then_find_it_in_the_downloaded_report(browser, served, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 720}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(f"{served['url']}/?page=cluster&cluster=2")
    name_box = pg.get_by_role("textbox", name="Name (shown instead of the number on every page)")
    name_box.wait_for(timeout=TIMEOUT_MS)
    idle(pg)
    name_box.fill(NAME)
    pg.get_by_role("textbox", name="Notes", exact=True).fill("dense purple nests <b>not bold</b>")
    pg.get_by_role("button", name="Save name and notes").click()
    pg.get_by_test_id("stAlertContentSuccess").filter(has_text=f"Saved to {served['notes']}").wait_for(
        timeout=TIMEOUT_MS)
    idle(pg)
    pg.screenshot(path=str(ARTIFACTS / "minutes-named-concept.png"), full_page=True)
    clean(pg, errors)
    saved = json.loads(served["notes"].read_text())
    assert saved["concepts"]["2"]["name"] == NAME
    assert sha(served["atlas"]) == served["sha"]
    assert pg.get_by_text(f"Name and notes of C2: {NAME}").count() >= 1  # the page relabelled itself

    with pg.expect_download(timeout=TIMEOUT_MS) as dl:
        pg.get_by_role("button", name="Meeting report (HTML)").click()
    report = tmp_path / "report.html"
    dl.value.save_as(str(report))
    text = report.read_text()
    assert NAME in text and "&lt;b&gt;not bold&lt;/b&gt;" in text and served["sha"] in text

    rp = context.new_page()
    rp.goto(report.as_uri())
    rp.wait_for_load_state("load")
    widths = rp.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : -1)")
    assert len(widths) >= 4 and all(w > 0 for w in widths), widths
    assert NAME in rp.inner_text("body")
    rp.screenshot(path=str(ARTIFACTS / "minutes-report.png"), full_page=True)
    assert sha(served["atlas"]) == served["sha"]
    context.close()
