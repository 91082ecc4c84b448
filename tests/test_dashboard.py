"""The review dashboard: each page through Streamlit's AppTest on a small real atlas, URL state,
error pages, read-only use, and the pure helpers (enrichment, density raster, overlays) checked
against independent computations. Browser tests are in test_browser_dashboard.py."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from dashboard_fixtures import (REPO, assert_clean, assert_pages_import_no_torch, dash_atlas,  # noqa: F401
                                open_app)  # (dash_atlas is a fixture)
from precompute.store import Atlas
from synthetic_atlas import write_atlas
from dashboard.views import cluster, slide

PAGES = ("overview", "cluster", "slides", "enrichment")


# -- helpers --------------------------------------------------------------------------------
def chart_tables(at: AppTest, index: int = 0) -> list[pd.DataFrame]:
    """The data sets shipped to the browser with the index-th Vega-Lite chart."""
    proto = at.get("vega_lite_chart")[index].proto
    return [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in proto.datasets]


def legend_of(at: AppTest) -> str:
    """The scatter's colour legend (HTML above the chart)."""
    return next(m.value for m in at.markdown if m.value.startswith("<b>"))


def points_of(at: AppTest) -> pd.DataFrame:
    return next(t for t in chart_tables(at) if "px" in t.columns)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def atlas_info(dash_atlas):
    with Atlas(dash_atlas) as a:
        s = a.slides()
        t = a.tiles(["slide", "weights", "nmf_cluster", "probs"])
        return {"slides": s, "tiles": t, "k": a.k, "n": a.n_tiles, "outputs": a.output_names}


# -- launch configuration, imports ------------------------------------------------------------
def test_launch_config_binds_localhost_without_telemetry():
    cfg = tomllib.loads((REPO / "dashboard" / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    assert cfg["server"]["headless"] is True
    assert cfg["browser"]["gatherUsageStats"] is False


def test_dashboard_imports_no_torch(dash_atlas):
    """Every page runs in a fresh interpreter without torch ever being imported."""
    assert_pages_import_no_torch(dash_atlas, PAGES)


# -- error pages --------------------------------------------------------------------------------
def test_missing_and_unusable_files_show_a_message(tmp_path, monkeypatch):
    text = tmp_path / "notes.h5"
    text.write_text("not an atlas")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    future = tmp_path / "future.h5"
    with h5py.File(future, "w") as f:
        f.attrs["format"] = "lumen-atlas"
        f.attrs["format_version"] = 99
    cases = {tmp_path / "missing.h5": "no such file", text: "not an HDF5 file", plain: "not a Lumen atlas",
             future: "format version 99", tmp_path: "not an HDF5 file"}
    for path, phrase in cases.items():
        at = open_app(path, monkeypatch)
        errors = " ".join(e.value for e in at.error)
        assert "Cannot open the atlas" in errors and phrase in errors, (path, errors)
    at = open_app(None, monkeypatch)
    assert "No atlas given" in at.error[0].value and "--atlas" in at.error[0].value


def test_atlas_argument_after_double_dash(monkeypatch):
    from dashboard.launch import atlas_argument
    monkeypatch.delenv("LUMEN_ATLAS", raising=False)
    assert atlas_argument(["--", "--atlas", "demo/atlas.h5"]) == "demo/atlas.h5"
    assert atlas_argument(["--atlas", "a.h5", "--other"]) == "a.h5"
    monkeypatch.setenv("LUMEN_ATLAS", "env.h5")
    assert atlas_argument([]) == "env.h5"


def test_read_only_atlas_is_left_unchanged(dash_atlas, tmp_path, monkeypatch):
    atlas = tmp_path / "ro.h5"
    shutil.copy(dash_atlas, atlas)
    atlas.chmod(0o444)
    before, mtime = sha256(atlas), atlas.stat().st_mtime_ns
    for page in PAGES:
        at = open_app(atlas, monkeypatch, page=page)
        if page == "slides":
            at.selectbox(key="url_layer").select("soft").run()
            at.selectbox(key="url_tile").select(at.selectbox(key="url_tile").value + 1).run()
            assert_clean(at)
    assert sha256(atlas) == before and atlas.stat().st_mtime_ns == mtime
    assert oct(atlas.stat().st_mode & 0o777) == "0o444"
    assert not list(tmp_path.glob("ro.h5?*")), "no side files next to the atlas"


# -- pages ----------------------------------------------------------------------------------------
def test_overview_summary_and_scatter(dash_atlas, atlas_info, monkeypatch):
    at = open_app(dash_atlas, monkeypatch)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Slides"] == "11" and metrics["Tiles"] == f"{atlas_info['n']:,}"
    assert metrics["Failed"] == "1" and metrics["No tissue"] == "1"
    assert not at.dataframe  # the cohort table is in its own tab, drawn only when opened
    cohort = open_app(dash_atlas, monkeypatch, tab="cohort").dataframe[0].value.set_index("diagnosis")
    assert cohort.loc["squamous", ["slides", "ok", "no_tissue", "failed"]].tolist() == [3, 1, 1, 1]
    assert cohort["tiles"].sum() == atlas_info["n"]
    pts = points_of(at)  # a small atlas: every tile is a point
    assert sorted(pts["row"]) == list(range(atlas_info["n"]))
    # the density image comes by a short link, so neither the spec nor "Show data" holds base64
    spec = at.get("vega_lite_chart")[0].proto.spec
    density = next(t for t in chart_tables(at) if "url" in t.columns)
    assert len(density) == 1 and re.fullmatch(r"/(\w+/)?media/[0-9a-f]+\.png", density["url"][0])
    assert "base64" not in spec and not any("base64" in t.to_string() for t in chart_tables(at))
    truth = atlas_info["tiles"]["nmf_cluster"][pts["row"]] + 1
    assert (pts["concept"].astype(str) == [f"C{c}" for c in truth]).all()
    from dashboard.views.overview import COLOR_MODES
    from precompute.colors import concept_colors, diagnosis_colors
    assert list(pts["colour"].astype(str)) == [concept_colors(atlas_info["k"])[c - 1] for c in truth]
    diagnoses = sorted(set(atlas_info["slides"]["diagnosis"]))
    slide_dx = np.asarray(atlas_info["slides"]["diagnosis"], dtype=object)
    for mode in COLOR_MODES:
        at.selectbox(key="url_color").select(mode).run()
        assert_clean(at)
        assert at.query_params["color"] in (mode, [mode])
        # one chart for every colouring (the browser keeps it and swaps its data): only the data differ
        assert at.get("vega_lite_chart")[0].proto.spec == spec, mode
        if mode == "diagnosis":  # each point in the colour of its slide's diagnosis, and a legend for it
            p = points_of(at)
            want = [diagnosis_colors(diagnoses)[diagnoses.index(slide_dx[i])]
                    for i in atlas_info["tiles"]["slide"][p["row"]]]
            assert list(p["colour"].astype(str)) == want
            assert all(f"</span>{d}</span>" in legend_of(at) for d in diagnoses)  # HTML, above the chart
        if mode == "output":
            assert "linear-gradient" in legend_of(at)


def test_diagnosis_filter_applies_to_every_view(dash_atlas, atlas_info, monkeypatch):
    s = atlas_info["slides"]
    malignant = {i for i, d in enumerate(s["diagnosis"]) if d == "malignant"}
    at = open_app(dash_atlas, monkeypatch, dx="malignant")
    pts = points_of(at)
    assert len(pts) and set(pts["diagnosis"].astype(str)) == {"malignant"}
    assert len(pts) == sum(int(s["n_tiles"][i]) for i in malignant)
    at = open_app(dash_atlas, monkeypatch, dx="malignant", page="slides")
    assert set(at.selectbox(key="url_slide").options) == {f"{s['slide_id'][i]} — malignant" for i in malignant}
    at = open_app(dash_atlas, monkeypatch, dx="malignant", page="cluster")
    metric = next(m for m in at.metric if m.label.startswith("Slides with it"))
    assert metric.value.endswith(f"/ {len(malignant)}")
    at = open_app(dash_atlas, monkeypatch, dx="malignant", page="enrichment")
    assert any("nothing to compare against" in w.value for w in at.warning)


def test_cluster_page_for_every_concept(dash_atlas, atlas_info, monkeypatch):
    at = open_app(dash_atlas, monkeypatch, page="cluster")
    nmf = atlas_info["tiles"]["nmf_cluster"]
    for k in range(1, atlas_info["k"] + 1):
        at.selectbox(key="url_cluster").select(k).run()
        assert_clean(at)
        assert at.query_params["cluster"] in (str(k), [str(k)])
        metric = next(m for m in at.metric if m.label.startswith("Tiles where"))
        assert metric.label == f"Tiles where C{k} dominates" and metric.value == f"{int((nmf == k - 1).sum()):,}"
        # the first tab holds the two galleries (each one chart of images) and nothing else drawn by Vega
        assert sorted(c.key.rsplit("_", 1)[0] for c in at.get("vega_lite_chart")) == [
            "gallery_gal_typical", "gallery_proto"]
        for tab, charts in (("composition", 3), ("slides", 3), ("tiles", 2)):  # the open tab's charts
            at.session_state["url_tab"] = cluster.TABS[tab]
            at.run()
            assert_clean(at)
            assert at.query_params["tab"] in (tab, [tab])
            assert len(at.get("vega_lite_chart")) == charts, (k, tab)
    at.session_state["url_tab"] = cluster.TABS["composition"]
    at.run()
    for by in ("meta.subtype", "patient", "diagnosis"):
        at.selectbox(key="url_by").select(by).run()
        assert_clean(at)
    at.selectbox(key="url_output").select(3).run()
    assert_clean(at)


def test_slides_page_for_every_slide_and_layer(dash_atlas, atlas_info, monkeypatch):
    s = atlas_info["slides"]
    at = open_app(dash_atlas, monkeypatch, page="slides")
    for i, sid in enumerate(s["slide_id"]):
        at.selectbox(key="url_slide").select(sid).run()
        assert_clean(at)
        warnings = " ".join(w.value for w in at.warning)
        if s["status"][i] == "failed":
            assert "failed" in warnings and "broken.svs" in " ".join(c.value for c in at.code)
        elif s["status"][i] == "no_tissue":
            assert "No tissue" in warnings
        else:
            assert not warnings
            rows = at.selectbox(key="url_tile").options  # CMU has 117 tiles: a list of LIST_MAX
            assert len(rows) == min(s["n_tiles"][i], slide.LIST_MAX)
    at.selectbox(key="url_slide").select("cmu").run()
    for layer in ("clusters", "soft", "output"):
        at.selectbox(key="url_layer").select(layer).run()
        for opacity in (0, 100):
            at.slider(key="url_opacity").set_value(opacity).run()
            assert_clean(at)
    start = int(s["tile_start"][list(s["slide_id"]).index("cmu")])
    at.selectbox(key="url_tile").select(start + 5).run()
    assert_clean(at)
    assert at.query_params["tile"] in (str(start + 5), [str(start + 5)])
    weights = chart_tables(at, 1)[0]  # the tile's concept-weight bars (chart 0 is the slide)
    np.testing.assert_allclose(weights["weight"], atlas_info["tiles"]["weights"][start + 5], rtol=1e-6)


def test_long_lists_show_the_entries_around_the_open_one(tmp_path, monkeypatch):
    """Past LIST_MAX entries the slide and tile lists show the ones around the open slide / selected tile
    (the browser pays for every option on every draw); the open ones are always listed, and the label still
    counts every slide of the filter."""
    monkeypatch.setattr(slide, "LIST_MAX", 4)
    ids = [f"S{i:02d}" for i in range(12)]
    path = write_atlas(tmp_path / "many.h5", slide_ids=ids, diagnoses=["benign"] * 12, tiles_per_slide=(12,) * 12)
    with Atlas(path) as a:
        starts = list(a.slides()["tile_start"])
    at = open_app(path, monkeypatch, page="slides", slide="S07", tile=str(starts[7] + 9))
    box = at.selectbox(key="url_slide")
    assert box.value == "S07" and [o.split(" ")[0] for o in box.options] == ["S05", "S06", "S07", "S08"]
    assert box.label.startswith("Slide (12 in the filter") and "Type a slide id" in box.help
    tiles = at.selectbox(key="url_tile")
    assert tiles.value == starts[7] + 9 and len(tiles.options) == 4 and "of 12 on this slide" in tiles.help
    assert [o.split(" ")[0] for o in tiles.options] == ["#7", "#8", "#9", "#10"]
    at.selectbox(key="url_slide").select("S08").run()  # the list moves with the open slide
    assert_clean(at)
    assert [o.split(" ")[0] for o in at.selectbox(key="url_slide").options] == ["S06", "S07", "S08", "S09"]
    assert [o.split(" ")[0] for o in at.selectbox(key="url_tile").options] == ["#0", "#1", "#2", "#3"]
    at = open_app(path, monkeypatch, page="slides", slide="S00")  # at an end the list starts there
    assert [o.split(" ")[0] for o in at.selectbox(key="url_slide").options] == ["S00", "S01", "S02", "S03"]
    monkeypatch.setattr(slide, "LIST_MAX", 100)  # short lists are whole, with nothing to explain
    at = open_app(path, monkeypatch, page="slides", slide="S07")
    assert len(at.selectbox(key="url_slide").options) == 12 and not at.selectbox(key="url_slide").help


def test_a_typed_text_names_a_slide():
    """What the cut slide list opens for a typed text (the browser test types into the list itself)."""
    ids = ["TCGA-A1-0001", "TCGA-A1-0002", "tcga-b2-0100", "S — 1"]
    assert slide.find_slide("TCGA-A1-0002", ids) == "TCGA-A1-0002"
    assert slide.find_slide("  tcga-a1-0002 ", ids) == "TCGA-A1-0002"  # case and spaces do not matter
    assert slide.find_slide("TCGA-A1-0002 — benign", ids) == "TCGA-A1-0002"  # a list entry typed in full
    assert slide.find_slide("0100", ids) == "tcga-b2-0100"  # part of an id: the first that contains it
    assert slide.find_slide("A1", ids) == "TCGA-A1-0001"
    assert slide.find_slide("S — 1", ids) == "S — 1"  # an id with the list's separator in it
    assert slide.find_slide("C3-9999", ids) is None and slide.find_slide("  ", ids) is None


def test_soft_maps_of_every_concept_on_demand(tmp_path, monkeypatch):
    """The strip of small soft maps is drawn when its expander is opened: one image per concept, then the
    model output's map, each under its name, all different, and one PNG of them all. Closed, nothing of it
    is sent (the selected tile's picture is the page's only image)."""
    path = write_atlas(tmp_path / "three.h5")
    at = open_app(path, monkeypatch, page="slides")
    assert not at.get("image") and not any(b.key == "dl_strip" for b in at.get("download_button"))
    figures = [m.value for m in at.markdown if "<figure" in m.value]
    assert len(figures) == 1 and "src='data:image/jpeg;base64," in figures[0]
    at.session_state["slide_strip"] = True  # what opening the expander does
    at.run()
    assert_clean(at)
    strip = at.get("image")[-1].proto.imgs
    with Atlas(path) as a:
        k, outputs = int(a.attrs["k"]), list(a.attrs["output_names"])
    caps = [im.caption for im in strip]
    assert caps[:-1] == [f"C{j + 1}" for j in range(k)] and caps[-1] in {f"{o} probability" for o in outputs}
    assert len({im.url for im in strip}) == k + 1 and all(im.url.startswith("data:image/") for im in strip)
    assert any(b.key == "dl_strip" for b in at.get("download_button"))


def test_enrichment_page(dash_atlas, monkeypatch):
    at = open_app(dash_atlas, monkeypatch, page="enrichment", target="benign")
    assert len(at.table) == 1  # the ranking; all columns only on request
    at.toggle(key="enrich_all").set_value(True).run()
    ranking, table = at.table[0].value, at.table[1].value
    assert list(ranking["log2 enrichment"]) == sorted(ranking["log2 enrichment"], reverse=True)
    assert list(ranking["concept"]) == list(table["concept"])
    assert set(table["target_slides"]) == {4} and set(table["other_slides"]) == {5}  # 4 malignant + cmu
    assert set(ranking["benign slides ≥ 20%"]) <= {f"{n} of 4" for n in range(5)}
    at.slider(key="url_min_share").set_value(50).run()
    assert_clean(at)
    at.selectbox(key="url_target").select("squamous").run()
    assert_clean(at)
    assert any("Only one squamous slide" in w.value for w in at.warning)
    at.button(key="open_2").click().run()  # open C3 from the enrichment page
    assert_clean(at)
    assert at.sidebar.radio[0].value == "cluster" and at.selectbox(key="url_cluster").value == 3


# -- URL state ----------------------------------------------------------------------------------------
def test_permalink_reopens_the_same_view(dash_atlas, atlas_info, monkeypatch):
    at = open_app(dash_atlas, monkeypatch, page="cluster", cluster="3", dx=["benign", "squamous"], color="diagnosis")
    assert at.sidebar.radio[0].value == "cluster"
    assert at.selectbox(key="url_cluster").value == 3
    assert at.sidebar.multiselect[0].value == ["benign", "squamous"]
    at.sidebar.radio[0].set_value("overview").run()  # other pages keep their parameters
    assert_clean(at)
    assert at.selectbox(key="url_color").value == "diagnosis"
    qp = at.query_params
    assert qp["cluster"] in ("3", ["3"]) and qp["color"] in ("diagnosis", ["diagnosis"])
    assert sorted(at.query_params["dx"]) == ["benign", "squamous"]
    # a slide view with layer, concept, opacity and tile
    start = int(atlas_info["slides"]["tile_start"][0])
    sid = atlas_info["slides"]["slide_id"][0]
    at = open_app(dash_atlas, monkeypatch, page="slides", slide=sid, layer="soft", soft="2", opacity="30",
                  tile=str(start + 2))
    assert at.selectbox(key="url_slide").value == sid
    assert at.selectbox(key="url_layer").value == "soft" and at.selectbox(key="url_soft").value == 2
    assert at.slider(key="url_opacity").value == 30 and at.selectbox(key="url_tile").value == start + 2


def test_bad_url_values_fall_back_to_defaults(dash_atlas, monkeypatch):
    at = open_app(dash_atlas, monkeypatch, page="nope", cluster="99", dx="unknown", color="x")
    assert at.sidebar.radio[0].value == "overview" and at.selectbox(key="url_color").value == "nmf"
    at = open_app(dash_atlas, monkeypatch, page="slides", slide="no-such-slide", opacity="abc", tile="-4")
    assert at.slider(key="url_opacity").value == 55
    at = open_app(dash_atlas, monkeypatch, page="cluster", cluster="0")
    assert at.selectbox(key="url_cluster").value == 1


# -- pure helpers against independent computations ------------------------------------------------------
def test_loaded_arrays_match_the_atlas(dash_atlas, atlas_info):
    from dashboard.data import AtlasData
    data = AtlasData.open(dash_atlas)
    t = atlas_info["tiles"]
    df = pd.DataFrame(t["weights"]).assign(slide=t["slide"]).groupby("slide").sum()
    expect = np.zeros((data.n_slides, data.k))
    expect[df.index] = df.to_numpy()
    np.testing.assert_allclose(data.slide_weight, expect, rtol=1e-5)
    counts = pd.crosstab(t["slide"], t["nmf_cluster"]).reindex(index=range(data.n_slides), columns=range(data.k),
                                                               fill_value=0)
    np.testing.assert_array_equal(data.slide_count, counts.to_numpy())
    np.testing.assert_array_equal(data.top, t["probs"].argmax(axis=1))
    assert data.out_kind == "probs" and data.out.shape == (data.n, len(atlas_info["outputs"]))


def _independent_enrichment(tiles: pd.DataFrame, target: str, min_share: float) -> pd.DataFrame:
    """Straight from tile rows with pandas: per concept weight shares and slide counts."""
    wcols = [c for c in tiles.columns if c.startswith("w")]
    per_slide = tiles.groupby(["slide", "diagnosis"])[wcols].sum().reset_index()
    per_slide = per_slide[per_slide[wcols].sum(axis=1) > 0]
    share = per_slide[wcols].div(per_slide[wcols].sum(axis=1), axis=0)
    is_t = per_slide["diagnosis"] == target
    wt, wo = per_slide.loc[is_t, wcols].sum(), per_slide.loc[~is_t, wcols].sum()
    return pd.DataFrame({
        "cluster_share_in_target": wt / (wt + wo),
        "log2_enrichment": np.log2((wt / wt.sum() + 1e-6) / (wo / wo.sum() + 1e-6)),
        "target_slides_ge": (share[is_t] >= min_share).sum(),
        "other_slides_ge": (share[~is_t] >= min_share).sum(),
        "top_slide_share": per_slide.loc[is_t, wcols].max() / wt,
    }).set_axis([f"C{j + 1}" for j in range(len(wcols))])


@pytest.mark.parametrize("target", ["benign", "malignant"])
def test_enrichment_table_matches_an_independent_computation(dash_atlas, atlas_info, target):
    from dashboard.data import AtlasData
    from precompute.enrichment import enrichment_table
    t, s = atlas_info["tiles"], atlas_info["slides"]
    tiles = pd.DataFrame(t["weights"], columns=[f"w{j}" for j in range(atlas_info["k"])])
    tiles["slide"] = t["slide"]
    tiles["diagnosis"] = np.asarray(s["diagnosis"])[t["slide"]]
    expect = _independent_enrichment(tiles, target, 0.2)
    data = AtlasData.open(dash_atlas)
    got = enrichment_table(data.slide_weight, data.slides["diagnosis"].to_numpy(), target, min_share=0.2,
                           slide_ids=data.slide_ids()).set_index("concept").loc[expect.index]
    for col in expect.columns:
        np.testing.assert_allclose(got[col].astype(float), expect[col].astype(float), rtol=1e-5, atol=1e-6,
                                   err_msg=col)


def test_enrichment_flags_a_dominating_slide():
    from precompute.enrichment import by_diagnosis, enrichment_table
    # 3 slides of "a": concept 0 lives almost only on slide 0; 2 slides of "b"; one empty (failed) slide
    w = np.array([[90.0, 10.0], [1.0, 9.0], [1.0, 9.0], [2.0, 8.0], [2.0, 8.0], [0.0, 0.0]])
    d = np.array(["a", "a", "a", "b", "b", "a"])
    table = enrichment_table(w, d, "a", min_share=0.5, slide_ids=np.array(list("pqrstu"))).set_index("concept")
    assert table.loc["C1", "top_target_slide"] == "p"
    assert table.loc["C1", "top_slide_share"] == pytest.approx(90 / 92)
    assert table.loc["C1", "target_slides_ge"] == 1 and table.loc["C1", "target_slides"] == 3  # empty slide ignored
    assert table.loc["C1", "cluster_share_in_target"] == pytest.approx(92 / 96)
    assert table.index[0] == "C1"  # the most enriched first
    long = by_diagnosis(w, d, ["a", "b"], min_share=0.5)
    row = long[(long["concept"] == "C2") & (long["diagnosis"] == "b")].iloc[0]
    assert row["share_of_diagnosis_weight"] == pytest.approx(0.8) and row["slides_ge"] == 2


def test_density_raster_counts_every_point():
    from dashboard import raster
    rng = np.random.default_rng(1)
    proj = rng.normal(size=(50_000, 2)).astype(np.float32)
    ext = raster.extent(proj)
    bins = raster.bins_for(len(proj))
    cells = raster.bin_index(proj, ext, bins)
    assert (cells >= 0).all()
    hist, _, _ = np.histogram2d(proj[:, 1], proj[:, 0], bins=(bins[1], bins[0]),
                                range=((ext[2], ext[3]), (ext[0], ext[1])))
    counts = np.bincount(cells, minlength=bins[0] * bins[1]).reshape(bins[1], bins[0])
    np.testing.assert_array_equal(counts, hist[::-1].astype(int))  # row 0 = top = largest y
    img = raster.density_rgba(cells, bins, categories=(proj[:, 0] > 0).astype(int), colors=["#ff0000", "#0000ff"])
    assert img.shape == (bins[1], bins[0], 4)
    assert ((img[..., 3] > 0) == (counts > 0)).all()
    right = img[:, -bins[0] // 4:][img[:, -bins[0] // 4:, 3] > 0]
    assert (right[:, 2] == 255).all()  # the right-hand side (x > 0) is blue


def test_brush_is_resolved_against_all_tiles():
    from dashboard import raster
    rng = np.random.default_rng(2)
    proj = rng.uniform(-5, 5, size=(200_000, 2)).astype(np.float32)
    mask = rng.random(len(proj)) < 0.7
    rows = raster.rows_in_box(proj, mask, (1.0, -1.0), (0.5, 2.0))
    brute = [i for i in range(len(proj)) if mask[i] and -1 <= proj[i, 0] <= 1 and 0.5 <= proj[i, 1] <= 2]
    assert rows.tolist() == brute
    perm = np.random.default_rng(0).permutation(len(proj))
    sample = raster.sample_rows(perm, mask)
    assert len(sample) == raster.MAX_POINTS and mask[sample].all() and len(set(sample)) == len(sample)
    narrow = mask & (proj[:, 0] > 0)
    assert set(sample[narrow[sample]]) <= set(raster.sample_rows(perm, narrow))  # drawn points stay drawn


def test_overlay_geometry():
    from precompute import overlay
    from precompute.colors import concept_color, concept_lut, rgb
    hard = np.array([[0, 1], [2, 3]], np.uint8)  # cell side 100 level-0 px; thumbnail 4 level-0 px per px
    rgba = overlay.grid_to_thumb(overlay.hard_rgba(hard, 3), 100, 4, (40, 60))  # grid covers 50 x 50 px
    assert rgba.shape == (60, 40, 4)
    assert rgba[10, 10, 3] == 0  # no tissue is transparent
    assert tuple(rgba[10, 30, :3]) == rgb(concept_color(0)) and tuple(rgba[35, 10, :3]) == rgb(concept_color(1))
    assert tuple(rgba[35, 30, :3]) == rgb(concept_color(2))
    assert (rgba[55, :, 3] == 0).all()  # below the grid: nothing
    assert concept_lut(3)[0, 3] == 0
    grid = overlay.tile_value_grid(np.array([0, 40]), np.array([0, 0]), 80, np.array([1.0, 0.0]), 4, (30, 40))
    assert grid[5, 5] == 1.0 and grid[5, 15] == 0.5 and grid[5, 25] == 0.0 and np.isnan(grid[25, 5])
    base = np.full((2, 2, 3), 100, np.uint8)
    top = np.zeros((2, 2, 4), np.uint8)
    top[..., 0], top[..., 3] = 200, 255
    assert overlay.blend(base, top, 0.5)[0, 0].tolist() == [150, 50, 50]


def test_concept_colours_are_fixed():
    from precompute.colors import concept_color, concept_colors
    assert concept_colors(6) == [concept_color(k) for k in range(6)]
    assert concept_colors(8)[:6] == concept_colors(6)  # K does not change a concept's colour
    assert len(set(concept_colors(20))) == 20


def test_contact_sheet_shows_each_thumbnail_in_its_cell(atlas_info, dash_atlas):
    import io

    from PIL import Image

    from dashboard.ui import contact_sheet
    with Atlas(dash_atlas) as a:
        thumbs = a.thumbnails([0, 1, 2])
    sheet = np.asarray(Image.open(io.BytesIO(contact_sheet(thumbs, ["a", "b", "c"], cols=2, cell=160))).convert("RGB"))
    assert sheet.shape == (2 * (160 + 16), 2 * 160, 3)  # 3 images in 2 columns: 2 rows of cell + caption
    for i, jpg in enumerate(thumbs):
        im = Image.open(io.BytesIO(jpg)).convert("RGB")
        im.thumbnail((156, 156))
        x, y = (i % 2) * 160 + 2, (i // 2) * 176 + 2
        got = sheet[y:y + im.height, x:x + im.width].astype(int)
        assert np.abs(got - np.asarray(im, int)).mean() < 3, i  # the thumbnail itself, at its place
    assert (sheet[176 + 2:176 + 150, 160 + 2:320 - 2] == 255).all()  # the fourth cell is empty


def test_every_page_has_downloads(dash_atlas, monkeypatch):
    for page in PAGES:
        at = open_app(dash_atlas, monkeypatch, page=page)
        labels = [b.label for b in at.get("download_button")]
        assert any("CSV" in lab for lab in labels), (page, labels)
    at = open_app(dash_atlas, monkeypatch, page="slides", slide="cmu")
    assert any("PNG" in b.label for b in at.get("download_button"))


def test_json_attrs_are_shown(dash_atlas, monkeypatch):
    at = open_app(dash_atlas, monkeypatch, tab="cohort")
    assert "capricorn-crc" in " ".join(m.value for m in at.markdown)
    assert any("precompute" in c.value for c in at.code)
    assert json.loads(at.json[0].value)["config"]["k"] == 6


def test_pages_survive_a_minimal_atlas(tmp_path, monkeypatch):
    """An atlas with no projection, no k-means, no prototypes or distances, no probabilities and no
    slide maps (written directly with the store's writer) still renders every page."""
    import io

    from PIL import Image

    from precompute.store import AtlasWriter
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "pink").save(buf, format="JPEG")
    path = tmp_path / "minimal.h5"
    with AtlasWriter(path, attrs={"config": {"k": 2}}, embedding_dim=3, output_names=["a", "b"], k=2,
                     has_probs=False) as w:
        for s, diag in enumerate(["x", "y"]):
            n = 4
            w.add_slide({"slide_id": f"s{s}", "diagnosis": diag, "status": "ok", "width": 400, "height": 100,
                         "tile_l0": 100, "cell_l0": 50},
                        tiles={"x": np.arange(n) * 100, "y": np.zeros(n), "tissue_frac": np.ones(n),
                               "embedding": rng.random((n, 3)), "outputs": rng.normal(size=(n, 2)),
                               "weights": rng.random((n, 2)), "nmf_cluster": rng.integers(0, 2, n),
                               "recon_err": np.zeros(n), "thumb_jpeg": [buf.getvalue()] * n})
    for page in PAGES:
        at = open_app(path, monkeypatch, page=page)
        assert not at.error, [e.value for e in at.error]
    at = open_app(path, monkeypatch, page="overview")
    assert any("no 2-D projection" in i.value for i in at.info)
    at = open_app(path, monkeypatch, page="slides")
    assert any("no cluster map" in w.value for w in at.warning)
