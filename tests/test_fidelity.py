"""Fidelity statistics on a real atlas: output regression, GradCAM correlation, K grid, the report.

One small atlas of 8 BreakHis images (2 per patient, 4 patients) is built once with the command line;
every statistic is checked against an independent numpy / scipy / scikit-learn computation.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.optimize import nnls
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold

from conftest import DATA, copy_without_fidelity, run_cli
from generated import write_review_cohort
from precompute.correlation import cam_cluster_correlation, pearson_rows, summarise_cam_correlation
from precompute.explained import choose_output
from precompute.fidelity import k_grid
from precompute.nmf import nnls_converged
from precompute.regression import output_regression
from precompute.report import fidelity_from_atlas, format_report, report_dict
from precompute.store import Atlas

PATIENTS = ("22549AB", "14134E", "10926", "12204")  # 2 benign, 2 malignant; 2 images each


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory) -> Path:
    """Atlas of 8 BreakHis images (the manifest's patient column kept) with the demo model on CPU; without
    ../shared/data the 8 generated benign and malignant slides of the review cohort (also 4 patients x 2)."""
    tmp = tmp_path_factory.mktemp("fidelity")
    manifest = tmp / "manifest.csv"
    if DATA.is_dir():
        folder = DATA / "cohort" / "breakhis"
        with open(folder / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        chosen = [r for p in PATIENTS for r in [r for r in rows if r["patient"] == p][:2]]
        with open(manifest, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**r, "path": str((folder / r["path"]).resolve())} for r in chosen)
    else:
        lines = write_review_cohort(tmp / "slides").read_text().splitlines()
        manifest.write_text("\n".join(lines[:9]) + "\n")  # header + 4 benign + 4 malignant
    out = tmp / "X.h5"
    proc = run_cli("run", "--cohort", str(manifest), "--model", "capricorn-crc", "--out", str(out), "--mpp", "0.5",
                   "--min-tissue", "0", "--workers", "0", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def real(atlas_path) -> dict:
    """The atlas's tile table with per-tile patient ids and the explained output: the TUM logit, and the
    one-vs-rest TUM log-odds (the default target of this softmax head)."""
    with Atlas(atlas_path) as atlas:
        t = atlas.tiles(["slide", "x", "y", "weights", "outputs", "probs", "embedding", "nmf_cluster", "tissue_frac"])
        slides = atlas.slides()
        names = atlas.output_names
        H = atlas.group("clusters")["H"]
        soft = [atlas.slide_maps(i)["soft"] for i in range(atlas.n_slides)]
    tum = names.index("TUM")
    return {**t, "names": names, "H": H, "soft": soft, "slides": slides, "tum": tum,
            "logit": t["outputs"][:, tum].astype(np.float64),
            "log_odds": t["outputs"][:, tum].astype(np.float64) - logsumexp(np.delete(t["outputs"].astype(np.float64),
                                                                                     tum, axis=1), axis=1),
            "groups": slides["patient"][t["slide"]],
            "W": t["weights"].astype(np.float64)}


@pytest.fixture(scope="module")
def model_tiles(real) -> dict:
    """Real cells and a real GradCAM at the clustered layer, for the most tissue-rich tile of each image.

    The CAM explains the output the model favours on this cohort (highest mean probability; breast
    tissue is far from the demo model's TUM class, whose CAM is all zero here), or the next most favoured
    whose CAM is not zero on every one of these tiles (on generated slides the favoured class's CAM can
    be). GradCAM: the gradient
    of that logit w.r.t. the post-ReLU features.norm5 map, averaged over cells per channel, weights
    the channels; ReLU of the sum. Cells: the same post-ReLU map, (B, 7, 7, 1024).
    """
    torch = pytest.importorskip("torch")
    from precompute.models import find_layer, load_model, normalise_on_device
    from precompute.slides import open_slide

    # the most tissue-rich tile of each image (a corner tile of glass has an all-zero CAM)
    first = np.array([np.flatnonzero(real["slide"] == s)[real["tissue_frac"][real["slide"] == s].argmax()]
                      for s in np.unique(real["slide"])])
    pixels = []
    for row in first:
        s = int(real["slide"][row])
        side = int(real["slides"]["tile_l0"][s])
        assert side == 224  # 0.5 um/px override = target pixel size: tiles are read 1:1
        with open_slide(real["slides"]["path"][s]) as slide:
            pixels.append(slide.read_region((int(real["x"][row]), int(real["y"][row])), 0, (side, side)))
    loaded = load_model("capricorn-crc")
    net, spec = loaded.module.eval(), loaded.spec
    grabbed = {}

    def hook(_module, _inputs, output):
        act = torch.relu(output)  # the classifier head applies this ReLU as a function
        act.retain_grad()
        grabbed["act"] = act
        return act.clone()  # the model's own ReLU runs in place on what the hook returns

    handle = find_layer(net, spec.default_layer).register_forward_hook(hook)
    try:
        x = normalise_on_device(torch.from_numpy(np.stack(pixels)), spec)
        logits = net(x)
    finally:
        handle.remove()
    act = grabbed["act"].detach()                                   # (B, C, 7, 7)
    for cam_index in np.argsort(-real["probs"].mean(axis=0)):
        grad, = torch.autograd.grad(logits[:, cam_index].sum(), grabbed["act"], retain_graph=True)
        alpha = grad.mean(dim=(2, 3), keepdim=True)                 # (B, C, 1, 1)
        cam = torch.relu((alpha * act).sum(dim=1)).numpy()          # (B, 7, 7)
        if cam.any():
            break
    assert cam.any(), "the GradCAM of every output is zero on every tile: nothing to correlate"
    cam_index = int(cam_index)
    cells = act.permute(0, 2, 3, 1).numpy()                         # (B, 7, 7, C)
    return {"rows": first, "cam": cam.astype(np.float64), "cells": cells, "cam_index": cam_index,
            "logits": logits.detach().numpy()}


# ------------------------------------------------------------------------------------------------
# output regression
# ------------------------------------------------------------------------------------------------

def test_output_regression_matches_independent_fit(real):
    W, y, groups = real["W"], real["logit"], real["groups"]
    res = output_regression(W, y, groups)

    ref = LinearRegression().fit(W, y)
    np.testing.assert_allclose(res["coef"], ref.coef_, rtol=1e-6, atol=1e-9)
    assert res["intercept"] == pytest.approx(ref.intercept_, rel=1e-6)
    assert res["r2"] == pytest.approx(r2_score(y, ref.predict(W)), abs=1e-9)
    assert (res["n_tiles"], res["n_groups"], res["n_folds"]) == (len(y), 4, 4)  # 5 folds asked, 4 patients

    # the folds: every patient in exactly one test fold, the same partition as GroupKFold on the raw ids
    fold = res["fold"]
    assert len(set(groups)) == 4
    for p in set(groups):
        assert len(set(fold[groups == p])) == 1
    ref_folds = {frozenset(groups[test]) for _, test in GroupKFold(n_splits=4).split(W, y, groups)}
    assert {frozenset(groups[fold == f]) for f in range(4)} == ref_folds

    # pooled out-of-fold R^2, by least squares on each training fold
    oof = np.empty_like(y)
    for f in range(4):
        train, test = fold != f, fold == f
        A = np.c_[W[train], np.ones(train.sum())]
        beta = np.linalg.lstsq(A, y[train], rcond=None)[0]
        oof[test] = np.c_[W[test], np.ones(test.sum())] @ beta
    expected = 1 - ((y - oof) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert res["r2_cv"] == pytest.approx(expected, abs=1e-8)
    assert res["note"] == ""


@pytest.mark.parametrize("j", [0, 3])
def test_output_exactly_linear_in_one_concept_gives_r2_of_one(real, j):
    W = real["W"]
    res = output_regression(W, 3 * W[:, j] + 1, real["groups"])
    assert abs(res["r2"] - 1) < 1e-9
    assert abs(res["r2_cv"] - 1) < 1e-9
    assert res["coef"][j] == pytest.approx(3, abs=1e-9)
    assert np.abs(np.delete(res["coef"], j)).max() < 1e-9
    assert res["intercept"] == pytest.approx(1, abs=1e-9)


def test_cross_validation_needs_two_groups(real):
    res = output_regression(real["W"], real["logit"], np.full(len(real["logit"]), "one patient"))
    assert np.isnan(res["r2_cv"]) and res["n_folds"] == 0 and (res["fold"] == -1).all()
    assert "at least 2 groups" in res["note"]
    assert 0 < res["r2"] <= 1  # the in-sample fit is still there
    with pytest.raises(ValueError, match="NaN"):
        output_regression(real["W"], np.full(len(real["logit"]), np.nan), real["groups"])


def test_choose_output_by_name_index_or_default(real):
    names = real["names"]
    assert choose_output(names, True, "TUM") == (8, "TUM")
    assert choose_output(names, True, "tum") == (8, "TUM")
    assert choose_output(names, True, 8) == (8, "TUM")
    assert choose_output(names, True, "8") == (8, "TUM")
    assert choose_output(["logit"], False, None) == (0, "logit")
    with pytest.raises(ValueError, match="24 outputs.*8=TUM"):
        choose_output(names, True, None)
    with pytest.raises(ValueError, match="Did you mean TUM"):
        choose_output(names, True, "TUMOUR")
    with pytest.raises(ValueError, match="out of range"):
        choose_output(names, True, 24)


# ------------------------------------------------------------------------------------------------
# correlation maps
# ------------------------------------------------------------------------------------------------

def test_pearson_rows_matches_corrcoef_on_real_soft_maps(real):
    checked = 0
    for soft in real["soft"]:                      # (K, gh, gw) mean concept weights per cell of one image
        maps = soft.reshape(len(soft), -1).astype(np.float64)
        a, b = maps[:-1], maps[1:]                 # concept k's map against concept k+1's
        r = pearson_rows(a, b)
        for i in range(len(a)):
            with np.errstate(invalid="ignore", divide="ignore"):
                expected = np.corrcoef(a[i], b[i])[0, 1]
            if np.ptp(a[i]) == 0 or np.ptp(b[i]) == 0:
                assert np.isnan(r[i])
            else:
                assert r[i] == pytest.approx(expected, abs=1e-9)
                checked += 1
    assert checked >= 30


def test_pearson_rows_is_nan_on_constant_rows(real):
    a = real["soft"][0].reshape(len(real["soft"][0]), -1).astype(np.float64)[:3].copy()
    b = a[::-1].copy()
    a[1] = 0.0        # an absent concept
    b[2] = 0.7        # a flat map
    r = pearson_rows(a, b)
    assert np.isnan(r[1]) and np.isnan(r[2]) and np.isfinite(r[0])
    with pytest.raises(ValueError, match="same shape"):
        pearson_rows(a, b[:, :-1])


def _scipy_nnls(X: np.ndarray, H: np.ndarray) -> np.ndarray:
    """W (N, K): scipy's active-set NNLS of each row of X (N, C) against H (K, C), an independent reference."""
    Ht = np.asarray(H, dtype=np.float64).T
    return np.stack([nnls(Ht, x)[0] for x in np.asarray(X, dtype=np.float64)])


def test_nnls_converged_matches_scipy(real):
    """The K grid's NNLS (the run's torch solver, to convergence in float64) against scipy, row by row."""
    E = real["embedding"][:12].astype(np.float64)
    H = real["H"].astype(np.float64)
    W = nnls_converged(E, H)
    ref = _scipy_nnls(E, H)
    np.testing.assert_allclose(W, ref, rtol=1e-4, atol=1e-6 * ref.max())


def test_model_cells_match_the_atlas(real, model_tiles):
    """The test's own forward pass sees the same tiles as the run (so its GradCAM maps are comparable)."""
    rows = model_tiles["rows"]
    cells = model_tiles["cells"]
    np.testing.assert_allclose(cells.mean(axis=(1, 2)), real["embedding"][rows].astype(np.float32),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(model_tiles["logits"], real["outputs"][rows], rtol=1e-3, atol=1e-3)
    # per-tile summed weights = sum over the tile's cells of NNLS against H
    b, h, w, c = cells.shape
    cw = _scipy_nnls(cells.reshape(-1, c), real["H"]).reshape(b, h * w, -1).sum(axis=1)
    np.testing.assert_allclose(cw, real["W"][rows], rtol=5e-2, atol=5e-2 * real["W"][rows].max())


def test_cam_cluster_correlation_on_real_gradcam(real, model_tiles):
    cells, cam = model_tiles["cells"], model_tiles["cam"]
    b, h, w, c = cells.shape
    cw = _scipy_nnls(cells.reshape(-1, c), real["H"]).reshape(b, h, w, -1)
    r = cam_cluster_correlation(cam, cw)
    assert r.shape == (b, cw.shape[-1]) and r.dtype == np.float32
    defined = 0
    for i in range(b):
        for k in range(cw.shape[-1]):
            x, z = cam[i].ravel(), cw[i, :, :, k].ravel()
            if np.ptp(x) == 0 or np.ptp(z) == 0:   # CAM all zero, or the concept absent from the tile
                assert np.isnan(r[i, k])
            else:
                assert r[i, k] == pytest.approx(np.corrcoef(x, z)[0, 1], abs=1e-5)
                defined += 1
    assert defined >= b  # real maps: most pairs are defined
    flat = cam.copy()
    flat[0] = 0.0  # a tile where the explained class gets no positive evidence: GradCAM is all zero
    r0 = cam_cluster_correlation(flat, cw)
    assert np.isnan(r0[0]).all() and np.array_equal(r0[1:], r[1:], equal_nan=True)

    # summary over all tiles and over the tiles the model calls positive (threshold: the median probability)
    p = real["probs"][model_tiles["rows"], model_tiles["cam_index"]]
    positive = p >= np.median(p)
    s = summarise_cam_correlation(r, positive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, which is what we expect
        for key, rows in (("", slice(None)), ("_pos", positive)):
            np.testing.assert_allclose(s[f"r{key}_mean"], np.nanmean(r[rows], axis=0), rtol=1e-6, equal_nan=True)
            np.testing.assert_allclose(s[f"r{key}_std"], np.nanstd(r[rows], axis=0), rtol=1e-6, atol=1e-7,
                                       equal_nan=True)
            np.testing.assert_array_equal(s[f"n{key}"], np.isfinite(r[rows]).sum(axis=0))


# ------------------------------------------------------------------------------------------------
# choosing K
# ------------------------------------------------------------------------------------------------

def _sk_nmf(V, k, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return NMF(n_components=k, init="nndsvd", max_iter=300, random_state=seed).fit(V).components_


def test_k_grid_on_real_cells(real, model_tiles):
    cells = model_tiles["cells"].reshape(-1, model_tiles["cells"].shape[-1])   # 8 tiles x 49 cells
    E = real["embedding"].astype(np.float32)
    y, groups = real["logit"], real["groups"]
    fitted = {}

    def recording_fit(V, k, seed):
        fitted[k] = _sk_nmf(V, k, seed)
        return fitted[k]

    ks = (4, 6, 8, 10)
    g = k_grid(cells, E, y, groups, ks, seed=0, nmf_fit=recording_fit)
    assert sorted(fitted) == list(ks)
    assert list(g["ks"]) == list(ks)
    for name in ("nmf_rel_error", "nmf_r2", "nmf_r2_cv", "kmeans_rel_error", "kmeans_r2", "kmeans_r2_cv"):
        assert g[name].shape == (4,) and np.isfinite(g[name]).all(), name
    assert (np.diff(g["nmf_rel_error"]) < 0).all(), g["nmf_rel_error"]   # more concepts, smaller error
    assert ((0 < g["nmf_rel_error"]) & (g["nmf_rel_error"] < 1)).all()
    assert ((0 < g["kmeans_rel_error"]) & (g["kmeans_rel_error"] < 1)).all()
    assert (g["nmf_r2"] <= 1).all() and (g["kmeans_r2"] <= 1).all()

    # independent check at K = 6: errors and R^2 with scipy NNLS and scikit-learn
    i, H = 1, fitted[6]
    V = cells.astype(np.float64)
    Wc = np.stack([nnls(H.T, v)[0] for v in V])
    assert g["nmf_rel_error"][i] == pytest.approx(np.linalg.norm(V - Wc @ H) / np.linalg.norm(V), rel=1e-4)
    Wt = np.stack([nnls(H.T, e)[0] for e in E.astype(np.float64)])
    assert g["nmf_r2"][i] == pytest.approx(LinearRegression().fit(Wt, y).score(Wt, y), abs=1e-4)
    km = KMeans(n_clusters=6, n_init=3, random_state=0).fit(cells)
    assert g["kmeans_rel_error"][i] == pytest.approx(np.sqrt(km.inertia_) / np.linalg.norm(V), rel=1e-5)
    D = km.transform(E)
    assert g["kmeans_r2"][i] == pytest.approx(LinearRegression().fit(D, y).score(D, y), abs=1e-6)

    # the default fit is scikit-learn's NMF with these settings
    g4 = k_grid(cells, E, y, groups, (4,), seed=0)
    assert g4["nmf_rel_error"][0] == pytest.approx(g["nmf_rel_error"][0], rel=1e-9)

    # a K the sample cannot support is NaN, not an error
    few = k_grid(cells[:5], E, y, groups, (4, 6), seed=0)
    assert np.isfinite(few["nmf_rel_error"][0]) and np.isnan(few["nmf_rel_error"][1])
    with pytest.raises(ValueError, match="negative"):
        k_grid(-cells, E, y, groups, (4,))


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def atlas_without_fidelity(atlas_path, tmp_path) -> Path:
    return copy_without_fidelity(atlas_path, tmp_path / "plain.h5")


def test_report_without_fidelity_group_computes_the_regression(real, atlas_without_fidelity):
    with Atlas(atlas_without_fidelity) as atlas:
        assert fidelity_from_atlas(atlas) == {}
    d = report_dict(atlas_without_fidelity)
    ref = output_regression(real["W"], real["log_odds"], real["groups"])
    assert d["source"] == "computed" and d["target"] == "log-odds"
    assert d["output"] == {"index": 8, "name": "TUM"}
    assert d["grouping"] == "patient" and not d["gradcam"] and d["k_grid"] == []
    assert d["regression"]["r2"] == pytest.approx(ref["r2"], abs=1e-12)
    assert d["regression"]["r2_cv"] == pytest.approx(ref["r2_cv"], abs=1e-12)
    assert (d["regression"]["n_folds"], d["regression"]["n_groups"]) == (4, 4)
    assert sum(c["tiles"] for c in d["clusters"]) == d["n_tiles"] == len(real["slide"])
    assert [c["tiles"] for c in d["clusters"]] == np.bincount(real["nmf_cluster"], minlength=6).tolist()
    for c, b in zip(d["clusters"], ref["coef"]):
        assert c["coef"] == pytest.approx(b)
        assert c["direction"] == ("pushes the output up" if b > 0 else "pushes the output down")

    text = format_report(d)
    assert "computed now" in text and "TUM (output index 8" in text
    assert "run with --gradcam to compute it" in text
    assert f"in-sample {ref['r2']:.3f};" in text and f"one fixed assignment gives {ref['r2_cv']:.3f}" in text
    assert "(4 folds" in text
    assert "one patient kept together, 4 patients" in text
    assert "NMF relative reconstruction error" in text


def test_report_reads_stored_fidelity_with_gradcam(real, model_tiles, atlas_without_fidelity):
    """A fidelity group as the run stores it (format: docs/atlas-format.md) is shown as stored."""
    reg = output_regression(real["W"], real["logit"], real["groups"])
    cells = model_tiles["cells"]
    b, h, w, c = cells.shape
    r = cam_cluster_correlation(model_tiles["cam"], _scipy_nnls(cells.reshape(-1, c), real["H"]).reshape(b, h, w, -1))
    cam = summarise_cam_correlation(r, np.ones(b, bool))
    grid = {"ks": np.array([4, 6]), "nmf_rel_error": np.array([0.7, 0.6]), "nmf_r2": np.array([0.5, 0.6]),
            "nmf_r2_cv": np.array([0.1, np.nan]), "kmeans_rel_error": np.array([0.8, 0.7]),
            "kmeans_r2": np.array([0.4, 0.5]), "kmeans_r2_cv": np.array([0.0, 0.2])}
    with h5py.File(atlas_without_fidelity, "a") as f:
        g = f.create_group("fidelity")
        g.attrs.update({"output_index": 8, "output_name": "TUM", "threshold": 0.5, "groups": "patient",
                        "has_gradcam": True, "n_folds": reg["n_folds"]})
        for name, value in {"coef": reg["coef"], "intercept": [reg["intercept"]], "r2": [reg["r2"]],
                            "r2_cv": [reg["r2_cv"]], **{f"cam_{k}": v for k, v in cam.items()}}.items():
            g.create_dataset(name, data=np.asarray(value))
        kg = g.create_group("k_grid")
        for name, value in grid.items():
            kg.create_dataset(name, data=value)

    d = report_dict(atlas_without_fidelity)
    assert d["source"] == "atlas" and d["gradcam"] and d["threshold"] == 0.5
    assert d["regression"]["r2"] == pytest.approx(reg["r2"]) and d["regression"]["n_groups"] == 4
    for k, row in enumerate(d["clusters"]):
        expected = cam["r_mean"][k]
        assert row["cam_r_mean"] is None if np.isnan(expected) else row["cam_r_mean"] == pytest.approx(expected)
        assert row["cam_n"] == cam["n"][k]
    assert [row["k"] for row in d["k_grid"]] == [4, 6] and d["k_grid"][1]["nmf_r2_cv"] is None
    text = format_report(d)
    assert "GradCAM r, all tiles" in text and "--gradcam" not in text
    assert "<- this atlas" in text and "computed now" not in text


def test_report_of_a_run_matches_an_independent_regression(real, atlas_path):
    """`precompute run` stores the TUM regression of the demo model; `report` shows the same numbers."""
    d = report_dict(atlas_path)
    ref = output_regression(real["W"], real["log_odds"], real["groups"])
    assert d["source"] == "atlas" and d["output"]["name"] == "TUM"
    assert d["regression"]["r2"] == pytest.approx(ref["r2"], abs=1e-9)
    assert d["regression"]["r2_cv"] == pytest.approx(ref["r2_cv"], abs=1e-9)
    proc = run_cli("report", str(atlas_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == format_report(d)
