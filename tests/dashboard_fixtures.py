"""A small atlas for the dashboard tests, built once per test session.

Cohort: 4 benign + 4 malignant BreakHis images (two patients), the CMU slide (diagnosis "squamous"),
small.svs (ends as "no tissue") and broken.svs (ends as "failed"), all from ../shared/data, run
through `python -m precompute run` with the built-in capricorn-crc model on the CPU (about a minute).
Without ../shared/data the same cohort is generated (`generated.write_review_cohort`: same slide ids,
diagnoses, patients, subtypes, statuses), so every dashboard test runs on a plain clone too.

Set LUMEN_DASHBOARD_TEST_ATLAS to an atlas built with `build_atlas` to skip the build while iterating.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from generated import write_review_cohort

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BREAKHIS_ROWS = (1, 2, 3, 4, 17, 18, 19, 20)  # 1-based data rows of the BreakHis manifest


def write_manifest(data: Path, out: Path) -> Path:
    """Manifest (absolute paths) of the mini cohort described in the module docstring."""
    lines = (data / "cohort" / "breakhis" / "manifest.csv").read_text().splitlines()
    rows = ["slide_id,path,diagnosis,subtype,patient"]
    for i in BREAKHIS_ROWS:
        sid, path, diag, subtype, patient = lines[i].split(",")
        rows.append(",".join([sid, str(data / "cohort" / "breakhis" / path), diag, subtype, patient]))
    rows.append(f"cmu,{data / 'slides' / 'CMU-1-Small-Region.svs'},squamous,epithelium,cmu")
    rows.append(f"small,{data / 'slides' / 'small.svs'},squamous,epithelium,cmu")
    rows.append(f"broken,{data / 'bad' / 'broken.svs'},squamous,epithelium,cmu")
    out.write_text("\n".join(rows) + "\n")
    return out


def build_atlas(data: Path | None, folder: Path) -> Path:
    """Run the pipeline on the mini cohort (real with `data`, else generated) into folder/atlas.h5
    (reused when already there)."""
    atlas = folder / "atlas.h5"
    if atlas.exists():
        return atlas
    folder.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(data, folder / "manifest.csv") if data else write_review_cohort(folder / "slides")
    proc = subprocess.run(
        [sys.executable, "-m", "precompute", "run", "--cohort", str(manifest), "--model", "capricorn-crc",
         "--out", str(atlas), "--mpp", "0.5", "--min-tissue", "0", "--workers", "1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    # exit code 1 = finished with failed slides (broken.svs is meant to fail)
    assert proc.returncode in (0, 1) and atlas.exists(), proc.stdout + proc.stderr
    return atlas


@pytest.fixture(scope="session")
def dash_atlas(tmp_path_factory) -> Path:
    """Path of the mini atlas (one build per session, shared by every dashboard test module)."""
    given = os.environ.get("LUMEN_DASHBOARD_TEST_ATLAS")
    if given:
        return Path(given)
    return build_atlas(DATA if DATA.is_dir() else None, tmp_path_factory.getbasetemp() / "dashboard-atlas")


APP = str(REPO / "dashboard" / "app.py")


def run_app(atlas, monkeypatch, check, **params):
    """Run the app once through Streamlit's AppTest on `atlas` (None: no atlas given) with the given
    query parameters, then `check(at)` (each test module decides what counts as a clean page)."""
    from streamlit.testing.v1 import AppTest

    if atlas is None:
        monkeypatch.delenv("LUMEN_ATLAS", raising=False)
    else:
        monkeypatch.setenv("LUMEN_ATLAS", str(atlas))
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    check(at)
    return at


def assert_clean(at) -> None:
    """The page ran without an exception."""
    assert not at.exception, [e.value for e in at.exception]


def open_app(atlas, monkeypatch, **params):
    """`run_app` that fails on any exception of the page."""
    return run_app(atlas, monkeypatch, assert_clean, **params)


def assert_pages_import_no_torch(atlas: Path, pages: tuple[str, ...]) -> None:
    """Each page runs on `atlas` in a fresh interpreter without torch ever being imported."""
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"os.environ['LUMEN_ATLAS'] = {str(atlas)!r}\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"for page in {tuple(pages)!r}:\n"
        f"    at = AppTest.from_file({APP!r}, default_timeout=120)\n"
        "    at.query_params['page'] = page\n"
        "    at.run()\n"
        "    assert not at.exception, [e.value for e in at.exception]\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0 and "no torch" in proc.stdout, proc.stdout + proc.stderr
