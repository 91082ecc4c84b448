"""Concept names in the dashboard (AppTest), the meeting report and the QuPath GeoJSON export, on the
tiny generated atlas (no ../shared needed)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import DATA
from dashboard_fixtures import open_app
from generated import write_slide
from precompute import notes as nm
from tiny_atlas import REPO, tiny_atlas  # noqa: F401  (tiny_atlas is a fixture)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def atlas(tiny_atlas, tmp_path) -> Path:
    """A private copy (each test may put notes beside it)."""
    dst = tmp_path / "atlas.h5"
    shutil.copyfile(tiny_atlas, dst)
    return dst


def app(monkeypatch, atlas: Path, notes: Path | None = None, **params):
    """The app on `atlas` with its notes file (None: the default beside the atlas); fails on any exception."""
    if notes is None:
        monkeypatch.delenv("LUMEN_NOTES", raising=False)
    else:
        monkeypatch.setenv("LUMEN_NOTES", str(notes))
    return open_app(atlas, monkeypatch, **params)


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [e.label for e in at.expander]
    parts += [str(o) for s in at.selectbox for o in s.options]
    return "\n".join(map(str, parts))


def test_naming_a_concept_in_the_dashboard_writes_the_notes_file_only(monkeypatch, atlas):
    before = sha(atlas)
    notes = atlas.with_name("atlas.h5.notes.json")
    at = app(monkeypatch, atlas, notes, page="cluster", cluster="2")
    at.text_input(key="notes_name_1").input("tumour epithelium")
    at.text_area(key="notes_text_1").input("dense purple nests;\nsee slide s1")
    at.button[[b.label for b in at.button].index("Save name and notes")].click()
    at.run()
    assert not at.exception
    saved = json.loads(notes.read_text())
    assert saved["concepts"]["2"] == {"name": "tumour epithelium", "note": "dense purple nests;\nsee slide s1"}
    assert saved["atlas"]["sha256"] == before
    assert sha(atlas) == before
    assert "tumour epithelium" in texts(at)  # the concept list and the expander use the name now
    for page in ("overview", "enrichment", "fidelity", "slides"):
        at = app(monkeypatch, atlas, notes, page=page)
    assert sha(atlas) == before


def test_an_invalid_name_is_refused_with_the_reason(monkeypatch, atlas):
    notes = atlas.with_name("n.json")
    at = app(monkeypatch, atlas, notes, page="cluster", cluster="1")
    at.text_input(key="notes_name_0").input("=cmd|' /C calc'!A0")
    at.button[[b.label for b in at.button].index("Save name and notes")].click()
    at.run()
    assert "Not saved." in [e.value for e in at.error]
    assert not notes.exists()


def test_without_a_notes_file_names_are_read_only_with_how_to_enable(monkeypatch, atlas):
    nm.save_concept(nm.default_path(atlas), atlas, sha(atlas), 3, 0, "stroma", "fibres")
    at = app(monkeypatch, atlas, page="cluster", cluster="1")
    assert not at.text_input and not at.text_area  # no editing controls
    shown = texts(at)
    assert "stroma" in shown and "--notes" in shown and "read-only" in shown


def run_cli(*args: str, timeout: float = 300):
    import subprocess

    from tiny_atlas import cli_env
    return subprocess.run([sys.executable, "-m", "precompute", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def test_report_html_carries_names_notes_and_the_atlas_sha256(atlas, tmp_path):
    before = sha(atlas)
    nm.save_concept(nm.default_path(atlas), atlas, before, 3, 0, "tumour epithelium", "<b>not bold</b> & =1+1")
    nm.save_atlas_note(nm.default_path(atlas), atlas, before, 3, "Meeting of the tumour board")
    out = tmp_path / "report.html"
    proc = run_cli("report", str(atlas), "--html", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "tumour epithelium" in text and "Meeting of the tumour board" in text
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; =1+1" in text and "<b>not bold</b>" not in text
    assert before in text
    assert "src=\"http" not in text and "<script" not in text and "<link" not in text  # self-contained
    assert text.count("data:image/jpeg;base64,") >= 3 * 1 + 3  # prototypes and example slides inline
    assert sha(atlas) == before


def test_report_of_a_non_atlas_exits_2(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("no")
    proc = run_cli("report", str(bad), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 2 and not (tmp_path / "r.html").exists()


def test_geojson_export_is_valid_within_the_slide_and_covers_the_hard_map(atlas, tmp_path):
    nm.save_concept(nm.default_path(atlas), atlas, sha(atlas), 3, 1, "stroma", "")
    out = tmp_path / "geo"
    proc = run_cli("export", str(atlas), "--geojson", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert check_geojson(atlas, out) > 0
    names = {f["properties"]["concept"]: f["properties"]["classification"]["name"]
             for p in out.glob("*.geojson") for f in json.loads(p.read_text())["features"]}
    assert names[2] == "stroma" and names[1] == "C1"  # the name from the notes file beside the atlas


def check_geojson(atlas: Path, out: Path) -> int:
    """Every slide's file: valid polygons inside the slide whose areas equal the hard map's cells per
    concept (level-0 px^2). Returns the number of features checked."""
    import shapely

    from precompute.store import Atlas

    n = 0
    with Atlas(atlas) as a:
        slides = a.slides()
        for i, sid in enumerate(slides["slide_id"]):
            maps = a.slide_maps(i)
            if maps is None:
                assert not (out / f"{sid}.geojson").exists()
                continue
            fc = json.loads((out / f"{sid}.geojson").read_text())
            hard, cell = maps["hard"], float(maps.attrs["cell_l0"])
            w, h = float(slides["width"][i]), float(slides["height"][i])
            area: dict[int, float] = {}
            for f in fc["features"]:
                geom = shapely.from_geojson(json.dumps(f["geometry"]))
                assert geom.is_valid and geom.geom_type == "Polygon"
                x0, y0, x1, y1 = geom.bounds
                assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
                props = f["properties"]
                assert props["objectType"] == "annotation" and len(props["classification"]["color"]) == 3
                assert props["classification"]["name"] == props["name"]
                assert 0 <= props["measurements"]["mean weight"] < float("inf")
                area[props["concept"]] = area.get(props["concept"], 0.0) + geom.area
                n += 1
            for j in range(1, a.k + 1):  # a concept's polygons cover exactly its cells, clipped to the slide
                rows, cols = (hard == j).nonzero()
                expect = float((((cols + 1) * cell).clip(max=w) - cols * cell) @
                               (((rows + 1) * cell).clip(max=h) - rows * cell))
                assert area.get(j, 0.0) == pytest.approx(expect, rel=1e-9, abs=1e-6)
    return n


@pytest.fixture(scope="module")
def demo_model_atlas(request, tmp_path_factory) -> Path:
    """A slide through the demo model (capricorn-crc, 224-px tiles): CMU-1-Small-Region.svs (conftest's
    cmu_atlas) when ../shared/data is present, else a generated 1344 x 1120 px slide at 0.5 um/px."""
    if DATA.is_dir():
        return request.getfixturevalue("cmu_atlas")
    folder = tmp_path_factory.mktemp("demo-model")
    slide = write_slide(folder / "slide.tiff", seed=7, width=1344, height=1120, blobs=14)
    out = folder / "atlas.h5"
    proc = run_cli("run", "--cohort", str(slide), "--model", "capricorn-crc", "--out", str(out), "--workers", "1",
                   "--no-progress", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.slow
def test_demo_model_slide_geojson_and_report(demo_model_atlas, tmp_path):
    """A slide through the demo model: the export validates and the report has a scale bar."""
    atlas = tmp_path / "demo.h5"
    shutil.copyfile(demo_model_atlas, atlas)
    proc = run_cli("export", str(atlas), "--geojson", str(tmp_path / "geo"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert check_geojson(atlas, tmp_path / "geo") > 0
    proc = run_cli("report", str(atlas), "--html", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "r.html").read_text()
    assert "µm/px" in text and "no scale bar" not in text


def test_traced_regions_are_exactly_the_cells_on_random_masks():
    """Boundary tracing against a plain union of cell squares: same shape, one polygon per 4-connected
    region (diagonal neighbours stay apart, as scipy counts them), all valid."""
    import numpy as np
    import shapely
    from scipy import ndimage

    from precompute.geojson_export import concept_regions

    rng = np.random.default_rng(0)
    for _ in range(200):
        m = rng.random((rng.integers(1, 12), rng.integers(1, 12))) < rng.uniform(0.2, 0.95)
        regions = concept_regions(m.astype(np.uint8), None, 0, 2.0, 1e9, 1e9)
        polys = [p for p, _, _ in regions]
        assert all(p.is_valid for p in polys)
        assert len(polys) == ndimage.label(m)[1]
        squares = shapely.union_all([shapely.box(2 * j, 2 * i, 2 * j + 2, 2 * i + 2) for i, j in zip(*np.nonzero(m))])
        traced = shapely.union_all(polys) if polys else shapely.Polygon()
        assert traced.symmetric_difference(squares).area == pytest.approx(0, abs=1e-9)
        assert sum(p.area for p in polys) == pytest.approx(4.0 * m.sum())
