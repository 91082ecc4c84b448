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

Pure numpy / scikit-learn: no torch here, so the dashboard can import it. The GradCAM maps come from
the full pass; a torch NMF can be passed to `k_grid` as a callable.
"""

from __future__ import annotations

import difflib
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

from .regression import CV_REPEATS, output_regression, r2_score, repeated_group_cv

if TYPE_CHECKING:
    from .store import Atlas

__all__ = [
    "cam_cluster_correlation",
    "choose_output",
    "fidelity_from_atlas",
    "k_grid",
    "k_grid_cells",
    "nnls_batch",
    "output_regression",
    "repeated_group_cv",
    "pearson_rows",
    "positive_tiles",
    "r2_score",
    "summarise_cam_correlation",
]

_ROWS = 8192  # rows per chunk when streaming calibration cells, so no (n, C) float64 temporary appears


# ----------------------------------------------------------------------------------------
# Correlation with GradCAM
# ----------------------------------------------------------------------------------------

def _centre(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre x (N, P, ...) over axis 1 in float64. Returns (centred x, constant mask (N, ...)).

    Constancy is tested exactly (max == min) rather than by a small variance: the float mean of
    identical values need not equal them, which would turn a constant row into noise, not NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    const = x.max(axis=1) == x.min(axis=1)
    return x - x.mean(axis=1, keepdims=True), const


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of a with the same row of b.

    a, b: (N, P). Returns (N,) float64 in [-1, 1]; NaN where either row is constant (r is undefined
    there: e.g. a GradCAM map that is all zero, or a concept absent from the tile) or holds NaN.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"pearson_rows needs two (N, P) arrays of the same shape, got {a.shape} and {b.shape}.")
    ac, a_const = _centre(a)
    bc, b_const = _centre(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc).sum(axis=1) / np.sqrt((ac * ac).sum(axis=1) * (bc * bc).sum(axis=1))
    r[a_const | b_const] = np.nan
    return np.clip(r, -1.0, 1.0)


def cam_cluster_correlation(cam: np.ndarray, cell_weights: np.ndarray) -> np.ndarray:
    """Per tile, Pearson r between the GradCAM map and each concept's weight map.

    cam: (B, h, w) GradCAM at the hooked layer's cells; cell_weights: (B, h, w, K) per-cell NNLS
    weights. Returns (B, K) float32; NaN where the CAM or the concept's map is constant on the tile.
    """
    cam = np.asarray(cam)
    cw = np.asarray(cell_weights)
    if cam.ndim != 3 or cw.ndim != 4 or cam.shape != cw.shape[:3]:
        raise ValueError(f"cam must be (B, h, w) and cell_weights (B, h, w, K) on the same cells; got "
                         f"{cam.shape} and {cw.shape}.")
    b, h, w, k = cw.shape
    cc, c_const = _centre(cam.reshape(b, h * w))           # (B, P), (B,)
    wc, w_const = _centre(cw.reshape(b, h * w, k))         # (B, P, K), (B, K)
    num = np.einsum("bp,bpk->bk", cc, wc)
    den = np.sqrt((cc * cc).sum(axis=1)[:, None] * (wc * wc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[c_const[:, None] | w_const] = np.nan
    return np.clip(r, -1.0, 1.0).astype(np.float32)


def _nan_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column mean, population std (ddof=0) and count of the finite values of x (N, K).
    Mean and std are NaN for a column without finite values (no warning)."""
    ok = np.isfinite(x)
    n = ok.sum(axis=0)
    x0 = np.where(ok, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x0.sum(axis=0) / n
        std = np.sqrt((np.where(ok, x - mean, 0.0) ** 2).sum(axis=0) / n)
    return mean, std, n.astype(np.int64)


def summarise_cam_correlation(r: np.ndarray, positive: np.ndarray) -> dict[str, np.ndarray]:
    """Per-concept summary of per-tile GradCAM correlations.

    r: (N, K) per-tile r (NaN = undefined on that tile, ignored); positive: (N,) bool, the tiles the
    model calls positive. Returns (K,) arrays: r_mean, r_std (population std), n (tiles with a
    defined r) over all tiles, and r_pos_mean, r_pos_std, n_pos over the positive tiles.
    Means and stds are NaN where a concept has no defined r.
    """
    r = np.asarray(r, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if r.ndim != 2 or positive.shape != (r.shape[0],):
        raise ValueError(f"r must be (N, K) and positive (N,); got {r.shape} and {positive.shape}.")
    mean, std, n = _nan_stats(r)
    pmean, pstd, pn = _nan_stats(r[positive])
    return {"r_mean": mean, "r_std": std, "n": n, "r_pos_mean": pmean, "r_pos_std": pstd, "n_pos": pn}


def positive_tiles(outputs: np.ndarray, probs: np.ndarray | None, index: int, threshold: float) -> np.ndarray:
    """Tiles the model calls positive for output `index`: probability >= threshold.

    outputs: (N, O) logits; probs: (N, O) stored probabilities, or None, in which case the
    probability is the sigmoid of the logit. Returns (N,) bool.
    """
    if probs is not None:
        p = np.asarray(probs)[:, index].astype(np.float64)
    else:
        p = 1.0 / (1.0 + np.exp(-np.asarray(outputs)[:, index].astype(np.float64)))
    return p >= threshold


# ----------------------------------------------------------------------------------------
# Output regression
# ----------------------------------------------------------------------------------------

def choose_output(output_names: Sequence[str], probs_available: bool, wanted: str | int | None) -> tuple[int, str]:
    """Resolve which model output to explain. Returns (index, name).

    wanted: an index (int or a string of digits), a name matched case-insensitively (e.g. "TUM"), or
    None, which picks the only output of a single-output model and is an error otherwise (the
    message lists the names). probs_available: whether the atlas stores probabilities; it only
    changes the wording of the error (the positive threshold applies to them).
    """
    names = [str(n) for n in output_names]
    if not names:
        raise ValueError("the model has no outputs to explain (the atlas stores no output columns).")
    listing = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    if wanted is None:
        if len(names) == 1:
            return 0, names[0]
        role = " (its logit is regressed, its probability decides which tiles count as positive)" \
            if probs_available else " (its logit is regressed)"
        raise ValueError(f"the model has {len(names)} outputs; choose the one to explain{role} by name or "
                         f"index: {listing}.")
    if isinstance(wanted, (bool, np.bool_)):
        raise ValueError(f"output must be a name or an index, got {wanted!r}. Outputs: {listing}.")
    if isinstance(wanted, str) and wanted.strip().isdigit():
        wanted = int(wanted.strip())
    if isinstance(wanted, (int, np.integer)):
        if not 0 <= int(wanted) < len(names):
            raise ValueError(f"output index {wanted} is out of range: the model has {len(names)} outputs "
                             f"(0-{len(names) - 1}): {listing}.")
        return int(wanted), names[int(wanted)]
    key = str(wanted).strip().casefold()
    hits = [i for i, n in enumerate(names) if n.casefold() == key]
    if hits:
        return hits[0], names[hits[0]]
    folded = {n.casefold(): n for n in names}
    close = [folded[c] for c in difflib.get_close_matches(key, list(folded), n=3, cutoff=0.5)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"no model output named {wanted!r}.{hint} Outputs: {listing}.")


# ----------------------------------------------------------------------------------------
# Choosing K
# ----------------------------------------------------------------------------------------

def nnls_batch(X: np.ndarray, H: np.ndarray, *, max_iter: int = 500, tol: float = 1e-8) -> np.ndarray:
    """Non-negative least squares of every row of X against fixed H: argmin_{w >= 0} ||x - w H||.

    X: (N, C); H: (K, C). Returns W (N, K) float64. Exact coordinate descent (one column of W at a
    time, all rows together) until the largest update is below tol x the largest weight, or
    max_iter sweeps. Only the (N, K) and (K, K) Gram products are used, so X is read once.
    """
    H = np.asarray(H, dtype=np.float64)
    G = H @ H.T                                              # (K, K)
    X = np.asarray(X)
    # X @ H.T in float64 chunk by chunk: accurate products without a float64 copy of all of X.
    P = np.concatenate([np.asarray(X[i:i + _ROWS], dtype=np.float64) @ H.T for i in range(0, len(X), _ROWS)]
                       or [np.zeros((0, H.shape[0]))])                    # (N, K)
    k = H.shape[0]
    diag = np.where(np.diag(G) > 0, np.diag(G), 1.0)  # an all-zero row of H gets weight 0 anyway
    W = np.zeros_like(P)
    for _ in range(max_iter):
        change = 0.0
        for j in range(k):
            new = np.maximum(W[:, j] + (P[:, j] - W @ G[:, j]) / diag[j], 0.0)
            change = max(change, float(np.abs(new - W[:, j]).max(initial=0.0)))
            W[:, j] = new
        if change <= tol * max(float(W.max(initial=0.0)), 1e-30):
            break
    return W


def _sq_norm(V: np.ndarray) -> float:
    """||V||_F^2 in float64, chunked."""
    return sum(float(np.square(V[i:i + _ROWS], dtype=np.float64).sum()) for i in range(0, len(V), _ROWS))


def _nmf_rel_error(V: np.ndarray, H: np.ndarray, v_norm: float) -> float:
    """||V - W H||_F / ||V||_F with W = NNLS(V, H), streamed over row chunks."""
    sq = 0.0
    H32 = H.astype(np.float32)
    for i in range(0, len(V), _ROWS):
        chunk = np.asarray(V[i:i + _ROWS], dtype=np.float32)
        resid = chunk - nnls_batch(chunk, H).astype(np.float32) @ H32
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
            reg = output_regression(nnls_batch(E, H), y, groups, seed=seed)
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
    return output_regression(X, y, groups, seed=seed)["r2"], repeated_group_cv(X, y, groups, seed=seed)


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
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(len(V), max_fit_cells, replace=False)) if len(V) > max_fit_cells else slice(None)
    Vf = V[fit_rows]
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
            record(i, "nmf", _per_tile_sum(nnls_batch(V, H), tile, n_tiles))
        if k <= len(Vf):
            km = KMeans(n_clusters=int(k), n_init=3, random_state=seed).fit(Vf)
            out["kmeans_rel_error"][i] = float(np.sqrt(km.inertia_) / v_norm)
            onehot = np.eye(int(k))[km.predict(V)]
            record(i, "kmeans", _per_tile_sum(onehot, tile, n_tiles))
            record(i, "kmeans_dist", km.transform(mean_cell.astype(np.float32)))
    return {"ks": ks, **out}


# ----------------------------------------------------------------------------------------
# Reading back
# ----------------------------------------------------------------------------------------

def _scalar(value):
    """A stored (1,) array as a Python number; anything else unchanged."""
    arr = np.asarray(value)
    if arr.dtype.kind in "biuf" and arr.size == 1:
        return arr.reshape(-1)[0].item()
    return value


def fidelity_from_atlas(atlas: "Atlas") -> dict:
    """What the atlas stores under the group `fidelity`, or {} when it has none.

    Returns the group's attrs (output_index, output_name, threshold, groups, has_gradcam, ...),
    its arrays ((1,) arrays such as r2 as Python floats; coef, cam_r_* as (K,) arrays) and
    "k_grid": the arrays of `fidelity/k_grid` ({} when absent) and "k_grid_attrs" its attrs;
    "agreement": arrays and attrs of `fidelity/agreement` ({} when absent, see precompute/agreement.py). The per-tile `gradcam_r` column is
    not read here (it is N x K); read it with `atlas.tiles(["gradcam_r"])`.
    """
    attrs = atlas.group_attrs("fidelity")
    arrays = atlas.group("fidelity")
    if not attrs and not arrays:
        return {}
    out = dict(attrs)
    out.update({name: _scalar(value) for name, value in arrays.items()})
    out["k_grid"] = atlas.group("fidelity/k_grid")
    out["k_grid_attrs"] = atlas.group_attrs("fidelity/k_grid")
    out["agreement"] = {**atlas.group("fidelity/agreement"), **atlas.group_attrs("fidelity/agreement")}
    out["importance"] = {**atlas.group("fidelity/importance"), **atlas.group_attrs("fidelity/importance")}
    return out
