"""How faithful are the concepts? Statistics that relate the NMF concepts to the model's behaviour.

Three measurements, after the seed paper's evaluation (docs: DESIGN.md section 2.6):

- output regression: linear regression of one model output (a logit) on the per-tile summed
  concept weights. The signed coefficients say which concepts push the output up or down; R^2 says
  how much of the output the concepts explain, in-sample and cross-validated with all tiles of a
  slide (or patient) in the same fold, so near-duplicate tiles of one slide cannot leak across folds.
- GradCAM agreement: per tile, Pearson r between the GradCAM map and each concept's weight map,
  both at the hooked layer's cell resolution; summarised per concept over all tiles and over the
  tiles the model calls positive.
- K grid: NMF and k-means fitted for a few K on the calibration cells, with reconstruction error and
  output-regression R^2 per K, to help choose K.

The per-tile GradCAM correlations are computed in the full pass (correlation.py), the output regression
in regression.py (numpy); this module fits the K grid with scikit-learn, in the run's fidelity stage
only, and solves its NNLS weights with the run's own solver (nmf.nnls_converged: nnls_rows in float64,
to convergence). The dashboard never imports it: what it shows is read from the atlas (report.py). A
torch NMF can be passed to `k_grid` as a callable.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

from .nmf import nnls_converged
from .regression import output_regression, regress
from .sampling import sample_rows

__all__ = ["k_grid", "k_grid_cells"]

_ROWS = 8192  # rows per chunk when streaming calibration cells, so no (n, C) float64 temporary appears


# ----------------------------------------------------------------------------------------
# Choosing K
# ----------------------------------------------------------------------------------------

def _sq_norm(V: np.ndarray) -> float:
    """||V||_F^2 in float64, chunked."""
    return sum(float(np.square(V[i:i + _ROWS], dtype=np.float64).sum()) for i in range(0, len(V), _ROWS))


def _nmf_rel_error(V: np.ndarray, H: np.ndarray, v_norm: float) -> float:
    """||V - W H||_F / ||V||_F with W = NNLS(V, H), streamed over row chunks."""
    sq = 0.0
    H32 = H.astype(np.float32)
    for i in range(0, len(V), _ROWS):
        chunk = np.asarray(V[i:i + _ROWS], dtype=np.float32)
        resid = chunk - nnls_converged(chunk, H).astype(np.float32) @ H32
        sq += float(np.square(resid, dtype=np.float64).sum())
    return float(np.sqrt(sq) / v_norm)


def _sklearn_nmf(cells: np.ndarray, k: int, seed: int) -> np.ndarray:
    """H (K, C) from scikit-learn's NMF (nndsvd start, Frobenius loss, at most 300 iterations)."""
    with warnings.catch_warnings():
        # An unconverged fit is still a valid point of the grid: its error is measured and reported.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return NMF(n_components=k, init="nndsvd", max_iter=300, random_state=seed).fit(cells).components_


def k_grid(cells: np.ndarray, tile_embeddings: np.ndarray, y: np.ndarray, groups: np.ndarray,
           ks: Sequence[int] = (4, 6, 8, 10), *, seed: int = 0,
           nmf_fit: Callable[[np.ndarray, int, int], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """NMF and k-means for each K on the calibration cells: reconstruction error and output R^2.

    cells: (n, C) >= 0 calibration cell vectors (after the same non-negativity transform as the
    concepts); tile_embeddings: (N, C) per-tile mean of its cell vectors; y: (N,) the explained output;
    groups: (N,) slide or patient ids for the cross-validation (see `output_regression`).
    nmf_fit(cells, K, seed) -> H (K, C); default: scikit-learn NMF(init="nndsvd", max_iter=300).

    NMF: relative error ||V - W H||_F / ||V||_F with W = NNLS(V, H). The tile features approximate the
    per-tile summed cell weights by NNLS of the tile's mean cell vector against H: the sum would be
    that times the number of cells, which rescales the coefficients but leaves R^2 unchanged. NNLS is
    not linear, so this is an approximation of the sum of per-cell weights, not equal to it (exact
    where no weight is clipped at zero).
    k-means (scikit-learn, n_init=3, seeded): relative error sqrt(inertia) / ||V||_F; tile features are
    the distances of the tile's mean cell vector to the K centres.

    Returns (len(ks),) arrays: ks, nmf_rel_error, nmf_r2, nmf_r2_cv, kmeans_rel_error, kmeans_r2,
    kmeans_r2_cv. A K larger than the sample allows (K > min(n, C) for NMF, K > n for k-means) gets NaN.
    """
    V = np.asarray(cells, dtype=np.float32)
    E = np.asarray(tile_embeddings, dtype=np.float32)
    if V.ndim != 2 or E.ndim != 2 or V.shape[1] != E.shape[1]:
        raise ValueError(f"cells (n, C) and tile_embeddings (N, C) must share C; got {V.shape} and {E.shape}.")
    if not (np.isfinite(V).all() and np.isfinite(E).all()):
        raise ValueError("cells or tile embeddings contain NaN or infinite values.")
    if V.size and V.min() < 0:
        raise ValueError("cells contain negative values; NMF needs non-negative input. Apply the same "
                         "non-negativity transform as the concepts (precompute.nmf.make_nonnegative) first.")
    v_norm = float(np.sqrt(_sq_norm(V)))
    if v_norm == 0.0:
        raise ValueError("all calibration cells are zero; there is nothing to factorise.")
    fit = nmf_fit or _sklearn_nmf
    ks = np.asarray([int(k) for k in ks], dtype=np.int64)
    out = {name: np.full(len(ks), np.nan) for name in
           ("nmf_rel_error", "nmf_r2", "nmf_r2_cv", "kmeans_rel_error", "kmeans_r2", "kmeans_r2_cv")}
    for i, k in enumerate(ks):
        if k < 1:
            raise ValueError(f"K must be at least 1, got {k}.")
        if k <= min(V.shape):
            H = np.asarray(fit(V, int(k), seed), dtype=np.float64)
            if H.shape != (k, V.shape[1]):
                raise ValueError(f"nmf_fit returned H of shape {H.shape}, expected ({k}, {V.shape[1]}).")
            out["nmf_rel_error"][i] = _nmf_rel_error(V, H, v_norm)
            reg = output_regression(nnls_converged(E, H), y, groups, seed=seed)
            out["nmf_r2"][i], out["nmf_r2_cv"][i] = reg["r2"], reg["r2_cv"]
        if k <= V.shape[0]:
            km = KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit(V)
            out["kmeans_rel_error"][i] = float(np.sqrt(km.inertia_) / v_norm)
            reg = output_regression(km.transform(E), y, groups, seed=seed)
            out["kmeans_r2"][i], out["kmeans_r2_cv"][i] = reg["r2"], reg["r2_cv"]
    return {"ks": ks, **out}


def _per_tile_sum(values: np.ndarray, tile: np.ndarray, n_tiles: int) -> np.ndarray:
    """Sum of the rows of values (n, K) per tile index (n,) -> (n_tiles, K)."""
    out = np.zeros((n_tiles, values.shape[1]))
    np.add.at(out, tile, values)
    return out


def _fit_r2(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> tuple[float, dict]:
    """In-sample R^2 of a linear fit and the repeated grouped CV summary."""
    reg, rep = regress(X, y, groups, seed=seed)
    return reg["r2"], rep


GRID_FEATURES = ("nmf", "kmeans", "kmeans_dist")


def k_grid_cells(cells: np.ndarray, tile: np.ndarray, y: np.ndarray, groups: np.ndarray,
                 ks: Sequence[int] = (4, 6, 8, 10), *, seed: int = 0, max_fit_cells: int = 20_000,
                 nmf_fit: Callable[[np.ndarray, int, int], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """NMF against k-means for each K on the same calibration cells, as in the method's paper.

    cells: (n, C) >= 0 calibration cells (after the concepts' non-negativity transform); tile: (n,) index
    of each cell's tile in y; y: (T,) the explained target of those tiles; groups: (T,) slide or patient.
    Both methods are fitted on the same seeded sample of at most max_fit_cells cells; the tile features
    then use every given cell of each tile:
      nmf:         per tile, the sum of its cells' NNLS weights against H (the atlas's own tile weights);
      kmeans:      per tile, the number of its cells in each cluster (cells per cluster, the paper's analogue);
      kmeans_dist: distances of the tile's mean cell to the K centres (an older feature, own label only).
    Errors: ||V - W H||_F / ||V||_F for NMF, sqrt(inertia) / ||V||_F for k-means, on the fit sample.
    R^2 in-sample and cross-validated (repeated_group_cv: median and 5-95 % band over shuffles).

    Returns (len(ks),) arrays: ks, {nmf,kmeans}_rel_error, and for each of GRID_FEATURES f: f_r2,
    f_r2_cv (median), f_r2_cv_p5, f_r2_cv_p95; NaN where K exceeds what the sample allows.
    """
    V = np.asarray(cells, dtype=np.float32)
    tile = np.asarray(tile, dtype=np.int64)
    y = np.asarray(y, dtype=np.float64)
    if V.ndim != 2 or tile.shape != (len(V),) or (len(tile) and (tile.min() < 0 or tile.max() >= len(y))):
        raise ValueError(f"cells must be (n, C) with a tile index in [0, {len(y)}) per cell; got {V.shape}, "
                         f"{tile.shape}.")
    if V.size and V.min() < 0:
        raise ValueError("cells contain negative values; apply the concepts' non-negativity transform first.")
    Vf = V[sample_rows(len(V), max_fit_cells, seed)] if len(V) > max_fit_cells else V
    v_norm = float(np.sqrt(_sq_norm(Vf)))
    if v_norm == 0.0:
        raise ValueError("all calibration cells are zero; there is nothing to factorise.")
    n_tiles = len(y)
    counts = np.bincount(tile, minlength=n_tiles).astype(np.float64)
    mean_cell = _per_tile_sum(V.astype(np.float64), tile, n_tiles) / np.maximum(counts, 1)[:, None]
    ks = np.asarray([int(k) for k in ks], dtype=np.int64)
    names = ["nmf_rel_error", "kmeans_rel_error"] + [f"{f}_{m}" for f in GRID_FEATURES
                                                     for m in ("r2", "r2_cv", "r2_cv_p5", "r2_cv_p95")]
    out = {name: np.full(len(ks), np.nan) for name in names}

    def record(i: int, prefix: str, X: np.ndarray) -> None:
        r2, cv = _fit_r2(X, y, groups, seed)
        out[f"{prefix}_r2"][i] = r2
        for m in ("median", "p5", "p95"):
            out[f"{prefix}_r2_cv" + ("" if m == "median" else f"_{m}")][i] = cv[f"r2_cv_{m}"]

    for i, k in enumerate(ks):
        if k <= min(Vf.shape):
            H = np.asarray((nmf_fit or _sklearn_nmf)(Vf, int(k), seed), dtype=np.float64)
            out["nmf_rel_error"][i] = _nmf_rel_error(Vf, H, v_norm)
            record(i, "nmf", _per_tile_sum(nnls_converged(V, H), tile, n_tiles))
        if k <= len(Vf):
            km = KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit(Vf)
            out["kmeans_rel_error"][i] = float(np.sqrt(km.inertia_) / v_norm)
            onehot = np.eye(int(k))[km.predict(V)]
            record(i, "kmeans", _per_tile_sum(onehot, tile, n_tiles))
            record(i, "kmeans_dist", km.transform(mean_cell.astype(np.float32)))
    return {"ks": ks, **out}
