"""Damaged atlases and hostile manifest text against every reader: `inspect`, `report` and the dashboard.

A valid atlas is written through the store's writer from synthetic arrays (tests/synthetic_atlas.py),
then damaged in one way per case. Expected outcome of each case (see CASES):
  open  - the store's validator refuses the file on open: `inspect` and `report` exit 2 with a message
          naming the file and the damaged item, no traceback; every dashboard page shows Lumen's own
          "Cannot open the atlas" message naming the item, never a Streamlit exception box.
  maps  - one slide's maps are damaged, found when they are read: `inspect` (which reads every slide's
          maps) exits 2 naming the item; `report` (which needs no maps) exits 0; the dashboard's Slides
          page for that slide shows Lumen's message, its Overview is unaffected.
  proj  - NaN/inf projection values: `inspect` and `report` exit 0; the Overview says the scatter cannot
          be drawn instead of drawing a blank chart.
Also: CSV downloads neutralise spreadsheet formulas, manifest text never becomes HTML, and Streamlit is
configured to show no error details and no links to outside services.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from dashboard_fixtures import run_app
from precompute.store import Atlas, AtlasFormatError
from synthetic_atlas import write_atlas

REPO = Path(__file__).resolve().parents[1]
REBUILD = "python -m precompute run"
PAGES = ("overview", "cluster", "slides", "enrichment", "fidelity")
HOSTILE_IDS = ["=cmd|' /C calc'!A0", "=SUM(1+1)", "<img src=x onerror=alert(1)>", "@S4"]
HOSTILE_DX = ["<img src=x onerror=alert(1)>", "=cmd|' /C calc'!A0", "=cmd|' /C calc'!A0", "+benign"]


# -- damage -------------------------------------------------------------------------------------
def _delete(name):
    def damage(f):
        del f[name]
    return damage


def _replace(name, make):
    def damage(f):
        data = make(f[name][()])
        del f[name]
        f[name] = data
    return damage


def _attr(name, value, obj=""):
    def damage(f):
        if value is None:
            del f[obj or "/"].attrs[name]
        else:
            f[obj or "/"].attrs[name] = value
    return damage


def _shift_starts(f):
    starts = f["slides/tile_start"][()]
    f["slides/tile_start"][...] = starts + 1


def _offsets_past_end(f):
    offs = f["tiles/thumb_offsets"]
    offs[-1] = offs[-1] + 1000


def _file_not_hdf5(path: Path) -> None:
    path.write_text("slide_id,path\nS1,/data/1.svs\n")


def _file_truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# id -> (damage of the open h5py file, or of the path for whole-file cases; outcome; text the message names)
CASES = {
    "not_hdf5": (_file_not_hdf5, "open", "not an HDF5 file"),
    "truncated": (_file_truncated, "open", "damaged or truncated"),
    "no_slides_group": (_delete("slides"), "open", "slides/"),
    "no_tiles_weights": (_delete("tiles/weights"), "open", "tiles/weights"),
    "no_thumb_jpeg": (_delete("tiles/thumb_jpeg"), "open", "tiles/thumb_jpeg"),
    "no_prototype_crops": (_delete("clusters/prototypes/jpeg_bytes"), "open", "clusters/prototypes/jpeg_bytes"),
    "concepts_H_wrong_K": (_replace("clusters/H", lambda a: a[:2]), "open", "clusters/H"),
    "weights_5x2": (_replace("tiles/weights", lambda a: a[:5, :2]), "open", "tiles/weights"),
    "x_one_short": (_replace("tiles/x", lambda a: a[:-1]), "open", "tiles/x"),
    "outputs_as_text": (_replace("tiles/outputs", lambda a: np.array([str(v) for v in a[:, 0]], dtype=object)),
                        "open", "tiles/outputs"),
    "concept_out_of_range": (_replace("tiles/nmf_cluster", lambda a: a + 5), "open", "tiles/nmf_cluster"),
    "prototype_past_last_tile": (_replace("clusters/prototypes/tile", lambda a: a + 10_000), "open",
                                 "clusters/prototypes/tile"),
    "tile_start_shifted": (_shift_starts, "open", "slides/tile_start"),
    "thumb_offsets_past_end": (_offsets_past_end, "open", "tiles/thumb_offsets"),
    "config_not_json": (_attr("config", "{tile_px: 224"), "open", "config"),
    "output_names_not_json": (_attr("output_names", "NORM,TUM", "tiles"), "open", "output_names"),
    "format_version_string": (_attr("format_version", "1"), "open", "format_version"),
    "format_version_2": (_attr("format_version", 2), "open", "format version 2"),
    "not_lumen": (_attr("format", None), "open", "not a Lumen atlas"),
    "n_tiles_1e9": (_attr("n_tiles", 1e9), "open", "n_tiles"),
    "n_tiles_mismatch": (_attr("n_tiles", 10**9), "open", "n_tiles"),
    "no_hard_map": (_delete("slide_maps/0/hard"), "maps", "slide_maps/0/hard"),
    "soft_map_wrong_shape": (_replace("slide_maps/1/soft", lambda a: a[:1]), "maps", "slide_maps/1/soft"),
    "no_thumb_downsample": (_attr("thumb_downsample", None, "slide_maps/2"), "maps", "thumb_downsample"),
    "nan_projection": (_replace("tiles/proj", lambda a: np.where(np.arange(len(a))[:, None] % 2, np.nan, a)),
                       "proj", "NaN"),
}
MAP_SLIDE = {"no_hard_map": "S1", "soft_map_wrong_shape": "S2", "no_thumb_downsample": "S3"}
WHOLE_FILE = {"not_hdf5", "truncated"}
OWN_ADVICE = {"not_hdf5", "not_lumen", "format_version_2"}  # not damage: the message gives its own advice


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_atlas(tmp_path_factory.mktemp("good") / "atlas.h5")


@pytest.fixture(scope="module")
def damaged(good, tmp_path_factory) -> dict[str, Path]:
    """case id -> a copy of the good atlas damaged as CASES says."""
    folder = tmp_path_factory.mktemp("damaged")
    out = {}
    for case, (damage, _, _) in CASES.items():
        path = folder / f"{case}.h5"
        shutil.copy(good, path)
        if case in WHOLE_FILE:
            damage(path)
        else:
            with h5py.File(path, "r+") as f:
                damage(f)
        out[case] = path
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "precompute", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def assert_names(message: str, path: Path, case: str) -> None:
    """The message names the file, the damaged item, and (for damage) how to rebuild the atlas."""
    flat = " ".join(message.split())
    assert str(path) in flat and CASES[case][2] in flat, (case, flat)
    if case not in OWN_ADVICE:
        assert REBUILD in flat, (case, flat)


def open_everything(path: Path) -> None:
    """What the readers read: the file (validated on open) and every slide's maps."""
    with Atlas(path) as atlas:
        for i in range(atlas.n_slides):
            atlas.slide_maps(i)


# -- the store's validator ------------------------------------------------------------------------
def test_the_valid_atlas_passes_every_reader(good):
    open_everything(good)
    for command in ("inspect", "report"):
        proc = cli(command, str(good))
        assert proc.returncode == 0, proc.stderr
        assert "32 tiles" in proc.stdout


@pytest.mark.parametrize("case", CASES)
def test_validator_names_the_damaged_item(case, damaged):
    path = damaged[case]
    _, outcome, _ = CASES[case]
    if outcome == "proj":
        open_everything(path)  # NaN values are not a format error; the dashboard says so (below)
        return
    if outcome == "maps":
        Atlas(path).close()  # the file opens; the slide's maps fail when read
    with pytest.raises(AtlasFormatError) as info:
        open_everything(path)
    assert_names(str(info.value), path, case)


# -- inspect and report -----------------------------------------------------------------------
# What each command does not read: a damage there leaves the command working.
NOT_READ = {"inspect": "proj", "report": "maps"}
REPORT_CASES = ["truncated", "no_tiles_weights", "weights_5x2", "config_not_json", "format_version_string",
                "no_hard_map"]


@pytest.mark.parametrize("command, case", [("inspect", c) for c in CASES] + [("report", c) for c in REPORT_CASES])
def test_command_exits_2_with_the_message(command, case, damaged):
    """`inspect` for every case, `report` (whose body is checked for every case below) for a few."""
    path = damaged[case]
    proc = cli(command, str(path))
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    if CASES[case][1] == NOT_READ[command]:
        assert proc.returncode == 0 and "32 tiles" in proc.stdout, proc.stderr
        return
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error:") and proc.stdout == ""
    assert_names(proc.stderr, path, case)


@pytest.mark.parametrize("case", CASES)
def test_report_refuses_what_it_cannot_read(case, damaged):
    """report_dict (the command's body) for every case; the command itself for a few (above)."""
    from precompute.report import report_dict

    path = damaged[case]
    if CASES[case][1] in ("maps", "proj"):  # report reads neither maps nor the projection
        assert report_dict(path)["n_tiles"] == 32
        return
    with pytest.raises(AtlasFormatError) as info:
        report_dict(path)
    assert_names(str(info.value), path, case)


@pytest.mark.parametrize("case", ["weights_5x2", "no_hard_map"])
def test_html_report_and_geojson_export_refuse_a_damaged_atlas(case, damaged, tmp_path):
    path = damaged[case]
    for args, made in ((("report", str(path), "--html", str(tmp_path / "r.html")), tmp_path / "r.html"),
                       (("export", str(path), "--geojson", str(tmp_path / "gj")), tmp_path / "gj" / "S1.geojson")):
        proc = cli(*args)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert proc.returncode == 2 and not made.exists(), (args, proc.returncode, proc.stderr)
        assert_names(proc.stderr, path, case)


# -- the dashboard ------------------------------------------------------------------------------
def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def atlas_error(at) -> str:
    errors = " ".join(e.value for e in at.error)
    assert "Cannot open the atlas" in errors, errors
    return errors


@pytest.mark.parametrize("case", CASES)
def test_dashboard_shows_lumens_message(case, damaged, monkeypatch):
    path = damaged[case]
    outcome = CASES[case][1]
    if outcome == "open":  # refused on load, whatever the page: each case opens a different page
        page = PAGES[list(CASES).index(case) % len(PAGES)]
        at = run_app(path, monkeypatch, no_exception, page=page)
        assert_names(atlas_error(at), path, case)
    elif outcome == "maps":
        at = run_app(path, monkeypatch, no_exception, page="slides", slide=MAP_SLIDE[case])
        assert_names(atlas_error(at), path, case)
        at = run_app(path, monkeypatch, no_exception, page="overview")
        assert not at.error and at.get("vega_lite_chart")
    else:
        at = run_app(path, monkeypatch, no_exception, page="overview")
        warning = " ".join(w.value for w in at.warning)
        assert "NaN or infinite for 16 of 32 tiles" in warning and "scatter cannot be drawn" in warning, warning
        assert "Density image" not in " ".join(c.value for c in at.caption)  # no blank chart under a caption


def test_a_fragment_rerun_shows_the_message_too():
    """The Overview scatter is a fragment (a brush reruns only it, outside the page's guard): its guard
    shows the same message for a read error inside it."""
    from streamlit.testing.v1 import AppTest

    def app():
        import streamlit as st

        from dashboard.guard import guarded
        from precompute.store import damaged

        @st.fragment
        @guarded
        def gallery():
            raise damaged("atlas.h5", "tiles/thumb_jpeg", "is missing")

        gallery()

    at = AppTest.from_function(app, default_timeout=60)
    at.run()
    no_exception(at)
    assert "atlas.h5: damaged atlas: tiles/thumb_jpeg is missing" in atlas_error(at)


def test_streamlit_shows_no_error_details_or_outside_links():
    config = tomllib.loads((REPO / "dashboard" / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"
    assert config["client"]["showErrorLinks"] is False


# -- hostile manifest text ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    return write_atlas(tmp_path_factory.mktemp("hostile") / "atlas.h5", slide_ids=HOSTILE_IDS,
                       diagnoses=HOSTILE_DX)


def read_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode(), newline="")))


def test_csv_cells_never_run_as_formulas():
    from dashboard.ui import csv_bytes

    df = pd.DataFrame({"slide_id": ["=SUM(1+1)", "+1", "-1", "@A1", "\tx", "\rx", "plain", "a=b"],
                       "value": [-1.5, 2.0, -3.0, 0.0, 1.0, 1.0, 1.0, 1.0],
                       "count": np.arange(-4, 4), "=HYPERLINK(1)": ["x"] * 8})
    rows = read_csv(csv_bytes(df))
    assert [r["slide_id"] for r in rows] == ["'=SUM(1+1)", "'+1", "'-1", "'@A1", "'\tx", "'\rx", "plain", "a=b"]
    assert [r["value"] for r in rows] == ["-1.5", "2.0", "-3.0", "0.0", "1.0", "1.0", "1.0", "1.0"]
    assert [r["count"] for r in rows] == [str(v) for v in range(-4, 4)]  # numbers stay numbers
    assert "'=HYPERLINK(1)" in rows[0]


def test_dashboard_tables_with_hostile_ids_export_inert_csv(hostile):
    from dashboard.data import AtlasData
    from dashboard.ui import csv_bytes
    from dashboard.views.overview import cohort_table

    data = AtlasData.open(hostile)
    try:
        tiles = read_csv(csv_bytes(data.tile_table(np.arange(data.n))))
        assert {r["slide_id"] for r in tiles} == {"'=cmd|' /C calc'!A0", "'=SUM(1+1)", "<img src=x onerror=alert(1)>"}
        assert {r["diagnosis"] for r in tiles} == {"<img src=x onerror=alert(1)>", "'=cmd|' /C calc'!A0"}
        assert not any(r[key].startswith(("=", "+", "-", "@")) for r in tiles
                       for key in ("slide_id", "diagnosis", "top_output"))
        assert float(tiles[0]["weight_C1"]) == pytest.approx(float(data.weights[0, 0]), rel=1e-6)
        cohort = read_csv(csv_bytes(cohort_table(data)))
        assert {r["diagnosis"] for r in cohort} >= {"'=cmd|' /C calc'!A0", "'+benign"}
    finally:
        data.atlas.close()


def test_every_csv_download_goes_through_the_helper():
    """csv_bytes is the only place that writes CSV, and csv_button the only CSV download button."""
    for path in (REPO / "dashboard").rglob("*.py"):
        text = path.read_text()
        writers = re.findall(r"\.to_csv\(|csv\.writer|text/csv", text)
        if path.name == "ui.py":
            assert "return out.to_csv(index=False, " in text and "data=lambda: csv_bytes(make())" in text
            assert sorted(writers) == [".to_csv(", "text/csv"], writers
        else:
            assert not writers, path


def test_manifest_text_is_never_html(hostile, monkeypatch):
    """Every page, with the hostile diagnosis selected where a page shows one: no markdown that may
    carry HTML contains the manifest's <img> tag unescaped (the Slides page's own <img> of the selected
    tile is there, with the hostile slide id escaped in its caption and alt text)."""
    views = [("overview", {}), ("overview", {"tab": "concepts"}), ("overview", {"tab": "cohort"}),
             ("cluster", {}), ("cluster", {"tab": "composition"}), ("cluster", {"tab": "slides"}),
             ("slides", {"slide": HOSTILE_IDS[2]}), ("enrichment", {"target": HOSTILE_DX[0]}), ("fidelity", {})]
    for page, params in views:  # every tab of every page: only the open tab is drawn
        at = run_app(hostile, monkeypatch, no_exception, page=page, **params)
        html_blocks = [m.value for m in at.get("markdown") if m.proto.allow_html]
        assert html_blocks and not any("<img src=x" in block for block in html_blocks), (page, html_blocks)
        if page == "slides":
            assert any("alt='&lt;img src=x onerror=alert(1)&gt;" in block for block in html_blocks)
        if page == "enrichment":
            assert any("&lt;img src=x onerror=alert(1)&gt;" in block for block in html_blocks)
