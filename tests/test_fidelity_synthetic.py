"""Fidelity figures on a generated cohort and a tiny model whose head after the hooked layer is global
average pool + linear: the explained target (--target), GradCAM (closed form: dy/dA_c is the same at
every cell, alpha = (dy/dz) . W[:, c] / (h w)), pooled agreement with bootstrap intervals, per-tile r
with its non-zero-cell rule, repeated grouped cross-validation. Every figure is recomputed here with
numpy / scipy / scikit-learn from the model's own weights and the stored maps, not with Lumen's code."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from scipy.stats import pearsonr
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from conftest import REPO, run_cli
from generated import png_tile, write_stain_cohort
from precompute.report import format_report, report_dict
from precompute.store import Atlas
from seeded_models import CLASSES, features_of, tiny_linear_head

TUM = CLASSES.index("TUM")
TILE_PX = 64  # the model's input: the generated images are read at native resolution
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def build(folder: Path, *extra: str) -> Path:
    """Run the CLI on the generated cohort in `folder` (made when absent) with the tiny model."""
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        write_stain_cohort(folder)
    out = folder / f"atlas{'_'.join(extra).replace('-', '')}.h5"
    proc = run_cli("run", "--cohort", str(manifest), "--model", "seeded_models:tiny_linear_head", "--out", str(out),
                   "--native-resolution", "--min-tissue", "0", "--k", "3", "--k-grid", "2,3", "--gradcam",
                   "--workers", "0", "--no-progress", *extra, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory) -> Path:
    """8 generated images (4 tiles each, 4 patients), default target, GradCAM, K = 3."""
    return build(tmp_path_factory.mktemp("tiny-cohort"))


def _tiles(path: Path) -> dict:
    with Atlas(path) as atlas:
        t = atlas.tiles(["slide", "x", "y", "weights", "outputs", "probs"])
        t["slide_id"] = np.asarray(atlas.slides()["slide_id"])[t["slide"]]
        t["maps"] = {i: np.asarray(atlas.slide_maps(i)["gradcam"], dtype=np.float64) for i in range(atlas.n_slides)}
        t["patient"] = np.asarray(atlas.slides()["patient"])[t["slide"]]
    return t


def _closed_form_cam(folder: Path, t: dict, dydz: np.ndarray) -> np.ndarray:
    """GradCAM (N, h, w) of a target with per-tile dy/dz (N, O) on the GAP + linear head."""
    model, _ = tiny_linear_head()
    W = model.fc.weight.detach().double().numpy()                             # (O, C)
    pixels = np.stack([png_tile(folder, s, int(x), int(y), TILE_PX) for s, x, y in zip(t["slide_id"], t["x"], t["y"])])
    A = features_of(model, pixels)                                            # (N, h, w, C)
    alpha = dydz @ W / (A.shape[1] * A.shape[2])                              # (N, C)
    return np.maximum(np.einsum("nhwc,nc->nhw", A, alpha), 0.0)


def _stored_cam_blocks(t: dict) -> np.ndarray:
    """Each tile's 8 x 8 block of its slide's stored GradCAM map (64 px tiles, 8 px cells, no overlap)."""
    return np.stack([t["maps"][int(s)][int(y) // 8:int(y) // 8 + 8, int(x) // 8:int(x) // 8 + 8]
                     for s, x, y in zip(t["slide"], t["x"], t["y"])])


def test_default_target_is_one_vs_rest_log_odds(tiny_atlas):
    """A softmax head explains log(p / (1 - p)) by default: the stored regression equals a fit on it."""
    t = _tiles(tiny_atlas)
    z = t["outputs"].astype(np.float64)
    y = z[:, TUM] - logsumexp(np.delete(z, TUM, axis=1), axis=1)
    p = t["probs"][:, TUM].astype(np.float64)
    np.testing.assert_allclose(y, np.log(p / (1 - p)), atol=1e-4)  # it is the log-odds of the stored probability
    rep = report_dict(tiny_atlas)
    assert rep["target"] == "log-odds" and rep["output"]["name"] == "TUM"
    fit = LinearRegression().fit(t["weights"].astype(np.float64), y)
    np.testing.assert_allclose([c["coef"] for c in rep["clusters"]], fit.coef_, rtol=1e-6, atol=1e-9)
    assert rep["regression"]["r2"] == pytest.approx(fit.score(t["weights"].astype(np.float64), y), abs=1e-9)
    text = format_report(rep)
    assert "explained target: the one-vs-rest log-odds" in text and "--target log-odds" in text


def test_gradcam_of_the_log_odds_matches_the_closed_form(tiny_atlas):
    """d log-odds / dz = e_c - softmax of the other logits; the stored map equals ReLU(A . alpha)."""
    t = _tiles(tiny_atlas)
    z = t["outputs"].astype(np.float64)
    dydz = np.zeros_like(z)
    dydz[:, TUM] = 1.0
    others = [j for j in range(z.shape[1]) if j != TUM]
    dydz[:, others] = -softmax(z[:, others], axis=1)
    expected = _closed_form_cam(tiny_atlas.parent, t, dydz)
    stored = _stored_cam_blocks(t)
    assert (stored > 0).any() and (stored == 0).any()  # the test model gives a CAM that is partly zero
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=1e-5)  # float16 storage


@pytest.mark.slow
def test_contrast_target_changes_gradcam_and_regression(tiny_atlas):
    """--target contrast: y = z_c - mean of the others, and its GradCAM follows that gradient."""
    out = build(tiny_atlas.parent, "--target", "contrast")
    t = _tiles(out)
    z = t["outputs"].astype(np.float64)
    y = z[:, TUM] - np.delete(z, TUM, axis=1).mean(axis=1)
    rep = report_dict(out)
    assert rep["target"] == "contrast" and "logit minus the mean of the other logits" in rep["target_text"]
    fit = LinearRegression().fit(t["weights"].astype(np.float64), y)
    np.testing.assert_allclose([c["coef"] for c in rep["clusters"]], fit.coef_, rtol=1e-6, atol=1e-9)
    dydz = np.full_like(z, -1.0 / (z.shape[1] - 1))
    dydz[:, TUM] = 1.0
    np.testing.assert_allclose(_stored_cam_blocks(t), _closed_form_cam(out.parent, t, dydz), rtol=2e-3, atol=1e-5)


def test_unknown_target_is_refused_before_any_work(tmp_path):
    proc = run_cli("run", "--cohort", str(tmp_path), "--model", "capricorn-crc", "--out", str(tmp_path / "a.h5"),
                   "--target", "probability")
    assert proc.returncode == 2
    assert "--target must be one of logit, log-odds, contrast" in proc.stdout + proc.stderr


# -- pooled agreement with GradCAM ------------------------------------------------------------------
def _maps(path: Path) -> tuple[list[dict], dict]:
    """Per slide: cam, soft, tissue (hard > 0) and the tiles' blocks and positive flags; plus tile table."""
    t = _tiles(path)
    slides = []
    with Atlas(path) as atlas:
        for i in range(atlas.n_slides):
            m = atlas.slide_maps(i)
            rows = np.flatnonzero(t["slide"] == i)
            slides.append({"cam": np.asarray(m["gradcam"], np.float64), "soft": np.asarray(m["soft"], np.float64),
                           "tissue": np.asarray(m["hard"]) > 0, "x": t["x"][rows], "y": t["y"][rows],
                           "positive": t["probs"][rows, TUM] >= 0.5})
    return slides, t


def _pooled(slides: list[dict], k: int, positive_only: bool) -> float:
    cams, ws = [], []
    for s in slides:
        mask = s["tissue"].copy()
        if positive_only:
            under = np.zeros_like(mask)
            for x, y, p in zip(s["x"], s["y"], s["positive"]):
                if p:
                    under[y // 8:y // 8 + 8, x // 8:x // 8 + 8] = True
            mask &= under
        cams.append(s["cam"][mask])
        ws.append(s["soft"][k][mask])
    cam, w = np.concatenate(cams), np.concatenate(ws)
    return pearsonr(cam, w).statistic if len(cam) > 1 and cam.std() > 0 and w.std() > 0 else np.nan


def test_pooled_agreement_matches_scipy_on_the_stored_maps(tiny_atlas):
    """Pooled r over all tissue cells and over cells of positive tiles, per concept, and its 95 % interval
    by resampling slides (same seeded draws), recomputed with scipy from the stored maps."""
    slides, _ = _maps(tiny_atlas)
    rep = report_dict(tiny_atlas)
    a = rep["agreement"]
    assert a["unit"] == "slide" and a["n_units"] == len(slides) == 8 and a["n_boot"] == 1000
    assert a["n_cells"] == sum(int(s["tissue"].sum()) for s in slides)
    draws = np.random.default_rng(0).integers(0, len(slides), size=(1000, len(slides)))
    for k, c in enumerate(rep["clusters"]):
        assert c["pooled_r"] == pytest.approx(_pooled(slides, k, False), abs=1e-6)
        assert c["pooled_pos_r"] == pytest.approx(_pooled(slides, k, True), abs=1e-6)
        boot = np.array([_pooled([slides[j] for j in d], k, False) for d in draws])
        lo, hi = np.nanpercentile(boot, [2.5, 97.5])
        assert (c["pooled_r_lo"], c["pooled_r_hi"]) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
        assert c["pooled_r_lo"] < c["pooled_r_hi"]


def test_per_tile_r_only_where_the_cam_has_enough_non_zero_cells(tiny_atlas):
    """Per-tile r on tiles with >= max(3, 10 % of the tile's cells) non-zero CAM cells; counts of used and
    excluded tiles; the mean per-tile r recomputed with numpy."""
    slides, _ = _maps(tiny_atlas)
    rep = report_dict(tiny_atlas)
    a = rep["agreement"]
    need = max(3, int(np.ceil(0.1 * 64)))
    assert a["min_cam_cells"] == need
    rs, used = [], []
    for s in slides:
        for x, y in zip(s["x"], s["y"]):
            tissue = s["tissue"][y // 8:y // 8 + 8, x // 8:x // 8 + 8]  # r over the tile's tissue cells only
            cam = s["cam"][y // 8:y // 8 + 8, x // 8:x // 8 + 8][tissue]
            soft = s["soft"][:, y // 8:y // 8 + 8, x // 8:x // 8 + 8][:, tissue]
            ok = int((cam > 0).sum()) >= need
            used.append(ok)
            rs.append([np.corrcoef(cam, soft[k])[0, 1] if ok and soft[k].std() > 0 and cam.std() > 0 else np.nan
                       for k in range(len(soft))])
    rs = np.array(rs)
    assert a["n_tiles_used"] == sum(used) and a["n_tiles_excluded"] == len(used) - sum(used)
    for k, c in enumerate(rep["clusters"]):
        assert c["tile_n"] == np.isfinite(rs[:, k]).sum()
        assert c["tile_r_mean"] == pytest.approx(np.nanmean(rs[:, k]), abs=1e-6)
    text = format_report(rep)
    assert f"{a['n_tiles_used']} of {a['n_tiles']} tiles used, {a['n_tiles_excluded']} excluded" in text
    assert "pooled r, all cells" in text


def _cv_r2s(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, repeats: int = 20) -> list[float]:
    """Pooled out-of-fold R^2 of `repeats` seeded shuffles of whole groups to min(5, groups) folds."""
    names, codes = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    r2s = []
    for _ in range(repeats):
        fold_of = np.empty(len(names), int)
        fold_of[rng.permutation(len(names))] = np.arange(len(names)) % min(5, len(names))
        fold = fold_of[codes]
        oof = np.empty_like(y)
        for f in np.unique(fold):
            oof[fold == f] = LinearRegression().fit(X[fold != f], y[fold != f]).predict(X[fold == f])
        r2s.append(r2_score(y, oof))
    return r2s


def test_repeated_grouped_cv_median_and_band(tiny_atlas):
    """20 seeded shuffles of whole patients to 4 folds: median and 5-95 % band of the pooled out-of-fold
    R^2, recomputed with scikit-learn; the report states them."""
    t = _tiles(tiny_atlas)
    z = t["outputs"].astype(np.float64)
    y = z[:, TUM] - logsumexp(np.delete(z, TUM, axis=1), axis=1)
    X = t["weights"].astype(np.float64)
    r2s = _cv_r2s(X, y, t["patient"])
    reg = report_dict(tiny_atlas)["regression"]
    assert reg["n_repeats"] == 20
    assert reg["r2_cv_median"] == pytest.approx(np.median(r2s), abs=1e-9)
    assert (reg["r2_cv_p5"], reg["r2_cv_p95"]) == (pytest.approx(np.percentile(r2s, 5), abs=1e-9),
                                                   pytest.approx(np.percentile(r2s, 95), abs=1e-9))
    assert f"median {reg['r2_cv_median']:.3f}, 5-95 % band" in format_report(report_dict(tiny_atlas))


def test_dashboard_fidelity_page_names_the_target_band_and_agreement(tiny_atlas, monkeypatch):
    """The Fidelity page shows the stored target, the repeated-CV median with its band, and the pooled
    agreement with its tile counts, as `report` does."""
    from dashboard_fixtures import run_app

    rep = report_dict(tiny_atlas)
    reg, a = rep["regression"], rep["agreement"]

    def clean(at):
        assert not at.exception and not at.error

    at = run_app(tiny_atlas, monkeypatch, clean, page="fidelity")
    metrics = {m.label: (m.value, m.delta) for m in at.metric}
    assert metrics["Target"][0] == "log-odds"
    assert metrics["R² cross-validated, median of 20 shuffles"] == (
        f"{reg['r2_cv_median']:.3f}", f"5–95 %: {reg['r2_cv_p5']:.3f} to {reg['r2_cv_p95']:.3f}")
    captions = " ".join(c.value for c in at.caption)
    assert (f"{a['n_tiles_used']} of {a['n_tiles']} tiles used, {a['n_tiles_excluded']} excluded" in captions
            and f"bootstrap over {a['n_units']} slides" in captions)


# -- K grid: NMF against k-means with cells per cluster, calibration size ---------------------------
def test_k_grid_uses_cells_per_cluster_for_k_means(tiny_atlas):
    """k_grid_cells on the model's own cells of every tile: k-means features are the number of each tile's
    cells in each cluster, NMF features the summed NNLS weights; recomputed with scikit-learn / scipy."""
    from scipy.optimize import nnls
    from sklearn.cluster import KMeans
    from sklearn.decomposition import NMF

    from precompute.fidelity import k_grid_cells

    t = _tiles(tiny_atlas)
    model, _ = tiny_linear_head()
    pixels = np.stack([png_tile(tiny_atlas.parent, s, int(x), int(y), TILE_PX)
                       for s, x, y in zip(t["slide_id"], t["x"], t["y"])])
    A = features_of(model, pixels)                                  # (T, 8, 8, C)
    cells = A.reshape(-1, A.shape[-1]).astype(np.float32)
    tile = np.repeat(np.arange(len(A)), 64)
    z = t["outputs"].astype(np.float64)
    y = z[:, TUM] - logsumexp(np.delete(z, TUM, axis=1), axis=1)

    def sk_nmf(V, k, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # an unconverged H is still a fixed H to compare on
            return NMF(n_components=k, init="nndsvd", max_iter=400, random_state=seed).fit(V).components_

    grid = k_grid_cells(cells, tile, y, t["patient"], (3,), seed=0, nmf_fit=sk_nmf)
    km = KMeans(n_clusters=3, n_init=3, random_state=0).fit(cells)
    counts = np.stack([np.bincount(km.labels_[tile == i], minlength=3) for i in range(len(A))]).astype(float)
    assert counts.sum() == len(cells)
    fit = LinearRegression().fit(counts, y)
    assert grid["kmeans_r2"][0] == pytest.approx(fit.score(counts, y), abs=1e-9)
    assert grid["kmeans_r2_cv"][0] == pytest.approx(np.median(_cv_r2s(counts, y, t["patient"])), abs=1e-9)
    H = sk_nmf(cells, 3, 0)
    W = np.stack([nnls(H.T.astype(np.float64), c.astype(np.float64))[0] for c in cells])
    sums = np.stack([W[tile == i].sum(0) for i in range(len(A))])
    assert grid["nmf_r2"][0] == pytest.approx(LinearRegression().fit(sums, y).score(sums, y), abs=1e-4)
    dist = km.transform(cells.reshape(len(A), 64, -1).mean(axis=1))
    assert grid["kmeans_dist_r2"][0] == pytest.approx(LinearRegression().fit(dist, y).score(dist, y), abs=1e-5)


def test_calibration_keeps_all_cells_of_a_small_cohort(tiny_atlas):
    """The default calibration keeps every cell of each calibration tile when they fit the cap (32 tiles x
    64 cells here), and the run's K grid is computed on those whole tiles; at K = 3 its NMF features are
    the atlas's own concepts, so its in-sample R^2 equals the stored regression's."""
    rep = report_dict(tiny_atlas)
    with Atlas(tiny_atlas) as atlas:
        fit, config = atlas.attrs["fit"], atlas.config
        info = atlas.group_attrs("fidelity/k_grid")
    assert config["calib_cells_per_tile"] == 64 and fit["calibration_cells"] == 32 * 64
    assert (info["n_cells"], info["n_tiles"], info["features"]) == (32 * 64, 32, "cells per cluster")
    row = next(r for r in rep["k_grid"] if r["k"] == 3)
    assert row["nmf_r2"] == pytest.approx(rep["regression"]["r2"], abs=0.01)
    assert "cells per cluster per tile" in format_report(rep)


# -- honest maps: no concept on glass; concepts on glass flagged ----------------------------------
def test_glass_cells_get_no_concept_and_glass_concepts_are_flagged(tiny_atlas):
    """Cells under 10 % tissue (block mean of the stored tissue mask) have hard 0 and soft 0; each concept's
    share of glass cells, recomputed from the model's own cells (scipy NNLS against the stored H, argmax),
    matches `inspect`, which flags the concepts with more than half of their cells on glass or edges."""
    from scipy.optimize import nnls

    from precompute.atlas_summary import format_summary, summarise

    t = _tiles(tiny_atlas)
    model, _ = tiny_linear_head()
    with Atlas(tiny_atlas) as atlas:
        H = atlas.group("clusters")["H"].astype(np.float64)
        maps = [atlas.slide_maps(i) for i in range(atlas.n_slides)]
    k = len(H)
    per = np.zeros((k, 3), int)  # tissue, edge, glass cells per dominant concept
    for i, m in enumerate(maps):
        frac = np.asarray(m["tissue"], np.float64).reshape(16, 8, 16, 8).mean(axis=(1, 3))  # 8 px cells
        glass = frac < 0.10
        assert (np.asarray(m["hard"])[glass] == 0).all() and (np.asarray(m["soft"])[:, glass] == 0).all()
        assert (np.asarray(m["hard"])[~glass] > 0).all()
        np.testing.assert_allclose(np.asarray(m["cell_tissue"], np.float64), frac, atol=1e-3)
        rows = np.flatnonzero(t["slide"] == i)
        pix = np.stack([png_tile(tiny_atlas.parent, f"s{i}", int(t["x"][r]), int(t["y"][r]), TILE_PX) for r in rows])
        A = features_of(model, pix)
        for r, a in zip(rows, A):
            y0, x0 = int(t["y"][r]) // 8, int(t["x"][r]) // 8
            for cy in range(8):
                for cx in range(8):
                    dom = int(np.argmax(nnls(H.T, a[cy, cx])[0]))
                    f = frac[y0 + cy, x0 + cx]
                    per[dom, 2 if f < 0.10 else 1 if f < 0.50 else 0] += 1
    rows = summarise(tiny_atlas)["clusters"]["nmf"]
    assert any(per[:, 2] > 0)  # the generated slides do have glass inside tiles
    for j, row in enumerate(rows):
        n = per[j].sum()
        assert row["map_cells"] == pytest.approx(n, abs=2)  # NNLS ties between near-equal concepts
        if n:
            assert row["glass_share"] == pytest.approx(per[j, 2] / n, abs=0.01)
            assert row["on_glass_or_edges"] == ((per[j, 1] + per[j, 2]) / n > 0.5)
    text = format_summary(summarise(tiny_atlas))
    assert ("FLAG: mostly on glass or tissue edges" in text) == any(r["on_glass_or_edges"] for r in rows)


# -- concept importance by intervention -------------------------------------------------------------
@pytest.mark.slow
def test_importance_by_removal_matches_the_closed_form_of_a_linear_head(tiny_atlas):
    """--importance on the GAP + linear head: removing concept k gives z' = W mean(max(A - w_k h_k, 0)) + b,
    so each tile's importance y(z) - y(z') and its deletion curve follow from the model's own cells, the
    stored H and scipy's NNLS; the cohort summary is their mean with a slide-bootstrap interval."""
    from scipy.optimize import nnls

    out = build(tiny_atlas.parent, "--importance")
    with Atlas(out) as atlas:
        t = atlas.tiles(["slide", "x", "y", "outputs", "importance", "deletion"])
        H = atlas.group("clusters")["H"].astype(np.float64)
        ids = np.asarray(atlas.slides()["slide_id"])[t["slide"]]
    rep = report_dict(out)
    model, _ = tiny_linear_head()
    W, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    pixels = np.stack([png_tile(out.parent, s, int(x), int(y), TILE_PX) for s, x, y in zip(ids, t["x"], t["y"])])
    A = features_of(model, pixels).reshape(len(pixels), 64, -1)                 # (N, cells, C)

    def target(z):
        return z[..., TUM] - logsumexp(np.delete(z, TUM, axis=-1), axis=-1)

    y_full = target(t["outputs"].astype(np.float64))
    np.testing.assert_allclose(target(A.mean(1) @ W.T + b), y_full, atol=1e-4)  # the head is what we think
    wts = np.stack([[nnls(H.T, cell)[0] for cell in tile] for tile in A])      # (N, cells, K)
    parts = wts[..., :, None] * H[None, None]                                   # (N, cells, K, C)
    removed = np.stack([target(np.maximum(A - parts[:, :, j], 0).mean(1) @ W.T + b) for j in range(len(H))], 1)
    expected = y_full[:, None] - removed
    np.testing.assert_allclose(t["importance"], expected, atol=5e-3)
    order = np.argsort(-t["importance"], axis=1)
    cum = np.cumsum(np.take_along_axis(parts, order[:, None, :, None], axis=2), axis=2)
    steps = [target(np.maximum(A - cum[:, :, j], 0).mean(1) @ W.T + b) for j in range(len(H))]
    np.testing.assert_allclose(t["deletion"], np.column_stack([y_full, *steps]), atol=5e-3)
    for k, c in enumerate(rep["clusters"]):
        assert c["importance"] == pytest.approx(expected[:, k].mean(), abs=5e-3)
        assert c["importance_lo"] <= c["importance"] <= c["importance_hi"]
    assert "Importance by removal" in format_report(rep)


def test_concept_page_warns_about_concepts_on_glass(tiny_atlas, monkeypatch):
    """The concept drill-down warns exactly for the concepts `inspect` flags as mostly on glass or edges."""
    from dashboard_fixtures import run_app

    from precompute.atlas_summary import summarise

    rows = summarise(tiny_atlas)["clusters"]["nmf"]
    for row in rows:
        at = run_app(tiny_atlas, monkeypatch, lambda at: None, page="cluster", cluster=str(row["cluster"]))
        warned = any("Mostly on glass or tissue edges" in w.value for w in at.warning)
        assert warned == row["on_glass_or_edges"], row
    assert any(r["on_glass_or_edges"] for r in rows) and not all(r["on_glass_or_edges"] for r in rows)
