"""In Chromium: name a concept in the dashboard (the notes file is written, the atlas stays
byte-identical), download the meeting report from the sidebar, and open it with every image loaded.
Runs on the tiny generated atlas (no ../shared). Skips when Chromium or Playwright is missing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from browser_harness import ARTIFACTS, chromium, dashboard_server, missing_browser
from browser_harness import idle as harness_idle
from tiny_atlas import tiny_atlas  # noqa: F401  (tiny_atlas is a fixture)

pytestmark = pytest.mark.browser

TIMEOUT_MS = 120_000  # the first page load reads the atlas and imports scikit-learn; slow on a busy 2-core host
NAME = "tumour epithelium"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def served(tiny_atlas, tmp_path_factory):
    """`streamlit run dashboard/app.py -- --atlas A --notes A.notes.json` on a copy of the tiny atlas."""
    why = missing_browser()
    if why:
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("minutes-browser")
    atlas = folder / "atlas.h5"
    shutil.copyfile(tiny_atlas, atlas)
    notes = folder / "atlas.h5.notes.json"
    ARTIFACTS.mkdir(exist_ok=True)
    with dashboard_server(atlas, "--notes", str(notes), log=ARTIFACTS / "streamlit-minutes-server.log") as srv:
        yield {**srv, "atlas": atlas, "notes": notes, "sha": sha(atlas), "folder": folder}


@pytest.fixture(scope="module")
def browser(served):
    with chromium() as b:
        yield b


def idle(pg) -> None:
    harness_idle(pg, TIMEOUT_MS)


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
