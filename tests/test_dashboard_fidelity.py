"""The dashboard's Fidelity page and the fidelity numbers on the concept drill-down, through Streamlit's
AppTest: on a real atlas with stored fidelity results and GradCAM (8 BreakHis images run with
`--gradcam --explain MUC`), on the shared mini atlas with its fidelity group removed (computed on the fly), and on
small atlases written with the store's writer (one slide: no cross-validation; undefined values).
Every number shown is checked against `precompute.report.report_dict`.

Set LUMEN_DASHBOARD_FIDELITY_TEST_ATLAS to an atlas built like `fid_atlas` to skip its build.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from conftest import copy_without_fidelity
from dashboard_fixtures import (BREAKHIS_ROWS, DATA, REPO, assert_pages_import_no_torch, dash_atlas,  # noqa: F401
                                run_app)  # (dash_atlas is a fixture)
from generated import write_review_cohort
from precompute.report import report_dict

NO_CAM = "GradCAM was not computed: re-run with --gradcam"
# The output explained in fid_atlas: one the model calls positive on some tiles of its cohort (BreakHis
# images: mucus; the generated slides: the class capricorn-crc gives most of their tiles).
EXPLAIN = "MUC" if DATA.is_dir() else "DERMA_NV"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fid_atlas(tmp_path_factory) -> Path:
    """8 BreakHis images (2 patients) with fidelity results, GradCAM and the K grid (about a minute);
    without ../shared/data the 8 generated benign and malignant slides of the review cohort."""
    given = os.environ.get("LUMEN_DASHBOARD_FIDELITY_TEST_ATLAS")
    if given:
        return Path(given)
    folder = tmp_path_factory.mktemp("fidelity-atlas")
    manifest = folder / "manifest.csv"
    if DATA.is_dir():
        lines = (DATA / "cohort" / "breakhis" / "manifest.csv").read_text().splitlines()
        rows = [lines[0]]
        for i in BREAKHIS_ROWS:
            sid, path, *rest = lines[i].split(",")
            rows.append(",".join([sid, str(DATA / "cohort" / "breakhis" / path), *rest]))
    else:
        rows = write_review_cohort(folder / "slides").read_text().splitlines()[:9]  # header + 4 benign + 4 malignant
    manifest.write_text("\n".join(rows) + "\n")
    atlas = folder / "atlas.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "precompute", "run", "--cohort", str(manifest), "--model", "capricorn-crc",
         "--out", str(atlas), "--mpp", "0.5", "--min-tissue", "0", "--gradcam", "--explain", EXPLAIN,
         "--workers", "1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and atlas.exists(), proc.stdout + proc.stderr
    return atlas


def _write_atlas(path: Path, slides: list[tuple[str, str, str]], fidelity: bool, seed: int = 0) -> Path:
    """A small atlas written with the store's writer: slides = [(slide_id, diagnosis, patient)], 6 tiles each,
    K = 3, outputs ["a", "TUM"] (logits only). With `fidelity`, a hand-made fidelity group with GradCAM and a
    K grid holding undefined (NaN) values."""
    from PIL import Image

    from precompute.store import AtlasWriter
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "pink").save(buf, format="JPEG")
    with AtlasWriter(path, attrs={"config": {"k": 3}, "command_line": "precompute run --explain=1 --gradcam"},
                     embedding_dim=3, output_names=["a", "TUM"], k=3, has_probs=False) as w:
        for sid, diag, patient in slides:
            n = 6
            w.add_slide({"slide_id": sid, "diagnosis": diag, "patient": patient, "status": "ok", "width": 600,
                         "height": 100, "tile_l0": 100, "cell_l0": 50},
                        tiles={"x": np.arange(n) * 100, "y": np.zeros(n), "tissue_frac": np.ones(n),
                               "embedding": rng.random((n, 3)), "outputs": rng.normal(size=(n, 2)),
                               "weights": rng.random((n, 3)), "nmf_cluster": np.arange(n) % 3,
                               "recon_err": np.zeros(n), "thumb_jpeg": [buf.getvalue()] * n})
        if fidelity:
            nan = float("nan")
            w.put_group("fidelity", {
                "coef": np.array([0.5, -0.25, 0.0]), "intercept": np.array([0.1]), "r2": np.array([0.4]),
                "r2_cv": np.array([nan]), "cam_r_mean": np.array([0.2, -0.1, nan]),
                "cam_r_std": np.array([0.1, 0.3, nan]), "cam_n": np.array([6, 5, 0]),
                "cam_r_pos_mean": np.array([nan, nan, nan]), "cam_r_pos_std": np.array([nan, nan, nan]),
                "cam_n_pos": np.array([0, 0, 0])},
                attrs={"output_index": 1, "output_name": "TUM", "threshold": 0.7, "groups": "slide", "n_folds": 0,
                       "n_groups": 1, "cv_note": "cross-validation needs tiles from at least 2 groups",
                       "has_gradcam": True})
            w.put_group("fidelity/k_grid", {
                "ks": np.array([2, 3]), "nmf_rel_error": np.array([0.5, 0.4]), "nmf_r2": np.array([0.3, nan]),
                "nmf_r2_cv": np.array([nan, nan]), "kmeans_rel_error": np.array([0.6, nan]),
                "kmeans_r2": np.array([0.2, 0.25]), "kmeans_r2_cv": np.array([nan, nan])})
    return path


# -- helpers --------------------------------------------------------------------------------------
def open_app(atlas: Path, monkeypatch, **params) -> AppTest:
    """`run_app` that fails on any exception or error message of the page."""
    return run_app(atlas, monkeypatch, assert_clean, **params)


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def chart_tables(chart) -> list[pd.DataFrame]:
    """The data sets shipped to the browser with one Vega-Lite chart."""
    return [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in chart.proto.datasets]


def datasets(at: AppTest) -> list[pd.DataFrame]:
    """Every data set shipped to the browser with any Vega-Lite chart of the page."""
    return [t for chart in at.get("vega_lite_chart") for t in chart_tables(chart)]


def table_with(at: AppTest, *columns: str) -> pd.DataFrame:
    """The first chart dataset that has all these columns."""
    return next(t for t in datasets(at) if set(columns) <= set(t.columns))


def metrics(at: AppTest) -> dict[str, tuple[str, str]]:
    return {m.label: (m.value, m.delta) for m in at.metric}


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning") for e in getattr(at, kind)]
    return "\n".join(parts)


def fmt3(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def same(shown, expected) -> None:
    """Values shipped to the page equal report_dict's (None where it is undefined)."""
    shown = pd.to_numeric(pd.Series(list(shown)), errors="coerce").to_numpy(dtype=float)
    expected = np.array([np.nan if v is None else v for v in expected], dtype=float)
    np.testing.assert_array_equal(shown, expected)


# -- the Fidelity page --------------------------------------------------------------------------------
def test_page_with_stored_fidelity_and_gradcam(fid_atlas, monkeypatch):
    rep = report_dict(fid_atlas)
    assert rep["source"] == "atlas" and rep["gradcam"] and rep["k_grid"]
    at = open_app(fid_atlas, monkeypatch, page="fidelity")
    assert at.sidebar.radio[0].value == "fidelity"
    m = metrics(at)
    reg = rep["regression"]
    assert m["Explained output"][0] == EXPLAIN == rep["output"]["name"]
    assert m["Output index"][0] == str(rep["output"]["index"])
    assert m["Positive tiles"][0] == f"probability ≥ {rep['threshold']:g}"
    assert m["R² in-sample"][0] == fmt3(reg["r2"]) and m["R² cross-validated"][0] == fmt3(reg["r2_cv"])
    assert m["Folds"][0] == str(reg["n_folds"]) and m["Patients"][0] == str(reg["n_groups"])
    shown = at.dataframe[0].value.iloc[0]  # the regression table: exact values
    assert shown["r2_in_sample"] == reg["r2"] and shown["r2_cross_validated"] == reg["r2_cv"]
    assert shown["n_folds"] == reg["n_folds"] and shown["grouping"] == rep["grouping"] == "patient"
    words = texts(at)
    assert f"`--explain {EXPLAIN}`" in words and "Computed on the fly" not in words and NO_CAM not in words
    # coefficients and effects per SD: the chart data and the table
    coef = table_with(at, "coef")
    assert list(coef["concept"]) == [f"C{c['cluster']}" for c in rep["clusters"]]
    same(coef["coef"], [c["coef"] for c in rep["clusters"]])
    same(coef["effect_per_sd"], [c["effect_sd"] for c in rep["clusters"]])
    assert list(coef["direction"]) == ["pushes the prediction up" if c["coef"] > 0 else "pushes the prediction down"
                                       for c in rep["clusters"]]
    table = at.dataframe[1].value
    same(table["coef"], [c["coef"] for c in rep["clusters"]])
    # GradCAM: mean ± std per concept, all tiles then positive tiles
    cam = table_with(at, "std")
    for c in rep["clusters"]:
        rows = cam[cam["concept"] == f"C{c['cluster']}"].set_index("tiles")
        same(rows.loc[["all tiles", "positive tiles"], "mean"], [c["cam_r_mean"], c["cam_r_pos_mean"]])
        same(rows.loc[["all tiles", "positive tiles"], "std"], [c["cam_r_std"], c["cam_r_pos_std"]])
        lo, hi = rows.loc["all tiles", ["lo", "hi"]]
        assert lo == pytest.approx(max(-1, c["cam_r_mean"] - c["cam_r_std"]))
        assert hi == pytest.approx(min(1, c["cam_r_mean"] + c["cam_r_std"]))
    same(at.dataframe[2].value["n_positive"], [c["cam_n_pos"] for c in rep["clusters"]])
    # K grid: lines per method and measure, this atlas's K marked, and the table
    grid = table_with(at, "method", "measure")
    assert set(grid["method"]) == {"NMF", "k-means"}
    nmf_err = grid[(grid["method"] == "NMF") & (grid["measure"] == "reconstruction error")].sort_values("k")
    same(nmf_err["value"], [r["nmf_rel_error"] for r in rep["k_grid"]])
    assert any(t.columns.tolist() == ["k", "label"] and t["k"].iloc[0] == rep["k"] for t in datasets(at))
    gt = at.dataframe[3].value
    assert gt["k"].tolist() == [r["k"] for r in rep["k_grid"]]
    assert gt.loc[gt["this_atlas"], "k"].tolist() == [rep["k"]]
    same(gt["kmeans_r2_cv"], [r["kmeans_r2_cv"] for r in rep["k_grid"]])
    labels = [b.label for b in at.get("download_button")]
    # regression, coefficients, GradCAM per tile, pooled agreement, K grid (no importance in this atlas)
    assert sum("CSV" in lab for lab in labels) == 5, labels


@pytest.fixture()
def atlas_without_fidelity(dash_atlas, tmp_path):
    """The test atlas as an older run (or one with no output to explain) leaves it: no fidelity group."""
    return copy_without_fidelity(dash_atlas, tmp_path / "no-fidelity.h5")


def test_page_computes_on_the_fly_without_a_fidelity_group(atlas_without_fidelity, monkeypatch):
    dash_atlas = atlas_without_fidelity
    rep = report_dict(dash_atlas)
    assert rep["source"] == "computed" and not rep["gradcam"] and not rep["k_grid"]
    at = open_app(dash_atlas, monkeypatch, page="fidelity")
    info = " ".join(i.value for i in at.info)
    assert "Computed on the fly" in info and NO_CAM in info and "No K grid" in info
    m = metrics(at)
    reg = rep["regression"]
    assert m["Explained output"][0] == rep["output"]["name"] and m["Positive tiles"][0] == "–"
    assert m["R² in-sample"][0] == fmt3(reg["r2"]) and m["R² cross-validated"][0] == fmt3(reg["r2_cv"])
    shown = at.dataframe[0].value.iloc[0]
    assert shown["r2_in_sample"] == reg["r2"] and shown["r2_cross_validated"] == reg["r2_cv"]
    assert shown["source"] == "computed"
    same(table_with(at, "coef")["coef"], [c["coef"] for c in rep["clusters"]])
    assert not any("lo" in t.columns for t in datasets(at))  # no GradCAM chart
    assert "dashboard picked" in texts(at)


def test_one_slide_shows_the_cross_validation_note(tmp_path, monkeypatch):
    path = _write_atlas(tmp_path / "one.h5", [("s0", "x", "")], fidelity=False)
    rep = report_dict(path)
    assert rep["regression"]["r2_cv"] is None and rep["regression"]["note"]
    at = open_app(path, monkeypatch, page="fidelity")
    assert any(rep["regression"]["note"] in w.value for w in at.warning)
    m = metrics(at)
    assert m["R² cross-validated"][0] == "–" and m["Slides"][0] == "1"
    assert m["R² in-sample"][0] == fmt3(rep["regression"]["r2"])


def test_undefined_values_render(tmp_path, monkeypatch):
    """Stored results with NaN GradCAM means (no positive tile) and gaps in the K grid."""
    path = _write_atlas(tmp_path / "gaps.h5", [("s0", "x", "p"), ("s1", "y", "q")], fidelity=True)
    rep = report_dict(path)
    assert rep["source"] == "atlas" and rep["gradcam"] and rep["clusters"][2]["cam_r_mean"] is None
    at = open_app(path, monkeypatch, page="fidelity")
    assert "`--explain =1`" not in texts(at) and "`--explain 1`" in texts(at)
    assert any("No positive tile with a defined r for: C1, C2, C3" in c.value for c in at.caption)
    assert any("at least 2 groups" in w.value for w in at.warning)
    coef = table_with(at, "coef")
    assert list(coef["direction"]) == ["pushes the prediction up", "pushes the prediction down", "no effect"]
    grid = [t for t in datasets(at) if "measure" in t.columns]  # error and R² charts
    assert sum(len(t) for t in grid) == 6  # 12 grid values, 6 undefined
    for k in (1, 2, 3):
        at = open_app(path, monkeypatch, page="cluster", cluster=str(k))
        assert "GradCAM r, all tiles" in metrics(at)


def charts_with(at: AppTest, column: str) -> str:
    """The Vega-Lite charts of the page that ship a data set with `column`, as text (spec and data)."""
    parts = []
    for chart in at.get("vega_lite_chart"):
        tables = chart_tables(chart)
        if any(column in t.columns for t in tables):
            parts += [chart.proto.spec] + [t.to_csv() for t in tables]
    return "\n".join(parts)


def test_a_name_given_later_reaches_the_charts_drawn_before(tmp_path, monkeypatch):
    """The pages keep chart specs and tile picks between visits (per atlas, filter and concept names): a
    name saved after a visit shows on the next one, in the coefficient charts and the concept's galleries."""
    from precompute import notes as nm

    path = _write_atlas(tmp_path / "named.h5", [("s0", "x", "p"), ("s1", "y", "q")], fidelity=True)
    monkeypatch.delenv("LUMEN_NOTES", raising=False)  # names from the default notes file beside the atlas
    charts = {"fidelity": "effect_per_sd", "cluster": "caption"}  # coefficient charts; galleries
    first = {page: charts_with(open_app(path, monkeypatch, page=page, cluster="1"), col)
             for page, col in charts.items()}
    assert all("C1" in text and "stroma" not in text for text in first.values())
    nm.save_concept(nm.default_path(path), path, hashlib.sha256(path.read_bytes()).hexdigest(), 3, 0, "stroma", "")
    for page, col in charts.items():
        assert "stroma" in charts_with(open_app(path, monkeypatch, page=page, cluster="1"), col), page


# -- the concept drill-down ----------------------------------------------------------------------------
def test_cluster_page_shows_the_concepts_fidelity(fid_atlas, dash_atlas, monkeypatch):
    rep = report_dict(fid_atlas)
    at = open_app(fid_atlas, monkeypatch, page="cluster")
    for c in rep["clusters"]:
        at.selectbox(key="url_cluster").select(c["cluster"]).run()
        assert_clean(at)
        m = metrics(at)
        assert m[f"Effect on {EXPLAIN} (coefficient)"] == (format(c["coef"], "+.4g"),
                                                    "pushes the prediction up" if c["coef"] > 0
                                                    else "pushes the prediction down")
        assert m["Effect per SD"][0] == format(c["effect_sd"], "+.3f")
        assert m["GradCAM r, all tiles"] == (f"{c['cam_r_mean']:+.2f} ± {c['cam_r_std']:.2f}", f"n = {c['cam_n']}")
        assert m["GradCAM r, positive tiles"][0] == f"{c['cam_r_pos_mean']:+.2f} ± {c['cam_r_pos_std']:.2f}"
    at.button(key="open_fidelity").click().run()
    assert_clean(at)
    assert at.sidebar.radio[0].value == "fidelity" and at.query_params["page"] in ("fidelity", ["fidelity"])

    rep = report_dict(dash_atlas)
    at = open_app(dash_atlas, monkeypatch, page="cluster", cluster="2")
    m = metrics(at)
    name = rep["output"]["name"]
    assert m[f"Effect on {name} (coefficient)"][0] == format(rep["clusters"][1]["coef"], "+.4g")
    assert "GradCAM r, all tiles" not in m and any(NO_CAM in c.value for c in at.caption)


# -- URL state --------------------------------------------------------------------------------------
def test_url_state_restores_the_fidelity_page(dash_atlas, monkeypatch):
    at = open_app(dash_atlas, monkeypatch, page="fidelity", dx="benign", cluster="3")
    assert at.sidebar.radio[0].value == "fidelity"
    assert at.sidebar.multiselect[0].value == ["benign"]
    assert any("diagnosis filter does not apply" in c.value for c in at.caption)
    at.sidebar.radio[0].set_value("cluster").run()  # leave and come back: parameters stay
    assert_clean(at)
    assert at.selectbox(key="url_cluster").value == 3
    at.sidebar.radio[0].set_value("fidelity").run()
    assert_clean(at)
    assert at.query_params["page"] in ("fidelity", ["fidelity"]) and at.query_params["cluster"] in ("3", ["3"])
    assert at.sidebar.radio[0].value == "fidelity" and "Fidelity" in at.sidebar.radio[0].options  # what the user sees


# -- helpers and imports ----------------------------------------------------------------------------
def test_wording_helpers():
    from dashboard.fidelity import cam_long, direction, grid_long, how_chosen
    assert direction(0.2) == "pushes the prediction up" and direction(-1e-9) == "pushes the prediction down"
    assert direction(0.0) == direction(None) == direction(float("nan")) == "no effect"
    rep = {"source": "atlas", "output": {"name": "MUC", "index": 4}}
    assert "`--explain MUC`" in how_chosen(rep, {"command_line": "x run --out a.h5 --explain MUC --gradcam"})
    assert "`--explain 'Tumour cells'`" in how_chosen(rep, {"command_line": "run --explain 'Tumour cells'"})
    assert "default" in how_chosen(rep, {"command_line": "run --out a.h5"})
    assert "dashboard picked **MUC**" in how_chosen({**rep, "source": "computed"}, {})
    cam = cam_long({"gradcam": True, "clusters": [
        {"cluster": 1, "cam_r_mean": 0.9, "cam_r_std": 0.3, "cam_n": 4, "cam_r_pos_mean": None,
         "cam_r_pos_std": None, "cam_n_pos": 0}]})
    assert cam["hi"].iloc[0] == 1.0 and cam["lo"].iloc[0] == pytest.approx(0.6) and pd.isna(cam["mean"].iloc[1])
    grid = grid_long({"k_grid": [{"k": 4, "nmf_rel_error": 0.5, "nmf_r2": None, "nmf_r2_cv": None,
                                  "kmeans_rel_error": None, "kmeans_r2": 0.1, "kmeans_r2_cv": None}]})
    assert sorted(grid["measure"]) == ["R² in-sample", "reconstruction error"]


def test_fidelity_and_cluster_pages_import_no_torch(fid_atlas):
    assert_pages_import_no_torch(fid_atlas, ("fidelity", "cluster"))
