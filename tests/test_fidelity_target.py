"""The explained target (--target logit | log-odds | contrast) on a generated cohort and a tiny model
whose head after the hooked layer is global average pool + linear, so GradCAM has a closed form:
dy/dA_c is the same at every cell, alpha = (dy/dz) . W[:, c] / (h w). Every figure is recomputed here
with numpy / scipy from the model's own weights and the stored maps, not with Lumen's code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from sklearn.linear_model import LinearRegression

from conftest import REPO, run_cli
from fidelity_inputs import CLASSES, features_of, make_cohort, tile_pixels, tiny_linear_head
from precompute.report import format_report, report_dict
from precompute.store import Atlas

TUM = CLASSES.index("TUM")
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def build(folder: Path, *extra: str) -> Path:
    """Run the CLI on the generated cohort in `folder` (made when absent) with the tiny model."""
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        make_cohort(folder)
    out = folder / f"atlas{'_'.join(extra).replace('-', '')}.h5"
    proc = run_cli("run", "--cohort", str(manifest), "--model", "fidelity_inputs:tiny_linear_head", "--out", str(out),
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
    pixels = np.stack([tile_pixels(folder, s, int(x), int(y)) for s, x, y in zip(t["slide_id"], t["x"], t["y"])])
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
