"""2-D projection of pooled tile embeddings for the dashboard scatter (PCA or UMAP).

Both methods fit on a seeded, capped sample of rows and then map every row, so the cost of the
fit does not grow with the cohort. PCA maps rows in float32 batches (no float64 copy of X);
UMAP keeps the fitted embedding for sampled rows and `transform`s the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA

from .sampling import sample_rows

__all__ = ["project"]

PCA_FIT_SAMPLE = 200_000
UMAP_FIT_SAMPLE = 50_000
UMAP_NEIGHBORS = 15
UMAP_MIN_DIST = 0.1
_MIN_UMAP_ROWS = 10  # below this a neighbour graph is meaningless; PCA is used instead


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _load(X: Any, rows: Any) -> np.ndarray:
    """X[rows] as float32, refusing NaN/inf (they would silently poison every coordinate)."""
    block = np.asarray(X[rows], dtype=np.float32)
    if not np.isfinite(block).all():
        raise ValueError("X contains NaN or infinite values; check the embeddings before projecting.")
    return block


def _pca(X: Any, idx: np.ndarray, seed: int, batch_rows: int, coords: Any) -> tuple[Any, dict]:
    n, d = X.shape
    n_comp = min(2, len(idx) - 1, d)  # n rows span at most n - 1 directions once centred
    params: dict = {"method": "pca", "fit_rows": int(len(idx)), "n_rows": int(n), "seed": int(seed)}
    if n_comp < 1:
        params["explained_variance_ratio"] = [0.0, 0.0]
        return coords, params
    S = _load(X, idx)
    # The covariance route costs one d x d product on the sample: seconds for 2e5 x 1024, exact
    # and seed-independent; beyond a few thousand features the randomized solver is cheaper.
    solver = "covariance_eigh" if d <= 4096 else "randomized"
    pca = PCA(n_components=n_comp, svd_solver=solver, random_state=seed).fit(S)
    del S
    comps = pca.components_.astype(np.float32)  # (n_comp, d)
    offset = pca.mean_.astype(np.float32) @ comps.T  # centre after projecting: no (rows, d) temporary
    for sl in _batches(n, batch_rows):
        block = np.asarray(X[sl], dtype=np.float32)
        xy = np.zeros((len(block), 2), np.float32)
        xy[:, :n_comp] = block @ comps.T - offset
        if not np.isfinite(xy).all():  # NaN/inf in a row always reach its coordinates
            raise ValueError("X contains NaN or infinite values; check the embeddings before projecting.")
        coords[sl] = xy
    evr = [float(v) for v in pca.explained_variance_ratio_] + [0.0] * (2 - n_comp)
    params["explained_variance_ratio"] = evr
    return coords, params


def _umap(X: Any, idx: np.ndarray, seed: int, batch_rows: int, coords: Any) -> tuple[Any, dict]:
    import umap  # slow import (numba); only pay for it when asked

    n = X.shape[0]
    n_neighbors = min(UMAP_NEIGHBORS, len(idx) - 1)
    reducer = umap.UMAP(
        n_components=2, n_neighbors=n_neighbors, min_dist=UMAP_MIN_DIST, random_state=seed,
        n_jobs=1,  # a seeded UMAP runs single-threaded anyway; saying so avoids its warning
    )
    reducer.fit(_load(X, idx))
    coords[idx] = reducer.embedding_
    rest = np.setdiff1d(np.arange(n), idx, assume_unique=True)
    for start in range(0, len(rest), batch_rows):
        rows = rest[start : start + batch_rows]
        coords[rows] = reducer.transform(_load(X, rows))
    params = {
        "method": "umap",
        "fit_rows": int(len(idx)),
        "n_rows": int(n),
        "seed": int(seed),
        "n_neighbors": int(n_neighbors),
        "min_dist": UMAP_MIN_DIST,
    }
    return coords, params


def project(
    X: Any,
    method: str = "pca",
    seed: int = 0,
    fit_sample: int | None = None,
    *,
    batch_rows: int = 65536,
    out: Any = None,
) -> tuple[Any, dict]:
    """Project rows of X (n, d) to 2-D.

    method: "pca" (default fit sample 200,000 rows) or "umap" (n_neighbors 15, min_dist 0.1,
    default fit sample 50,000 rows; rows outside the sample are placed by `transform`).
    X may be any float array-like with shape and slicing (numpy, memmap, store.TileColumn).
    `out` (n, 2), when given, receives the coordinates batch by batch (e.g. a store.ColumnWriter, so
    they never sit in memory whole) and is returned in place of a new array.
    Returns coords (n, 2) float32 and params (method, fit_rows, n_rows, seed, and
    explained_variance_ratio for PCA). Fewer than 3 rows give zeros; too few rows for UMAP fall
    back to PCA, which params["method"] then records.
    """
    if method not in ("pca", "umap"):
        raise ValueError(f"Unknown projection method {method!r}; use 'pca' or 'umap'.")
    if len(X.shape) != 2:
        raise ValueError(f"X must be a 2-D (rows, features) matrix, got shape {tuple(X.shape)}.")
    n = X.shape[0]
    if fit_sample is None:
        fit_sample = PCA_FIT_SAMPLE if method == "pca" else UMAP_FIT_SAMPLE
    if fit_sample < 1:
        raise ValueError(f"fit_sample must be >= 1, got {fit_sample}.")
    idx = sample_rows(n, fit_sample, seed)
    coords = np.zeros((n, 2), dtype=np.float32) if out is None else out
    if method == "umap" and len(idx) >= _MIN_UMAP_ROWS:
        return _umap(X, idx, seed, batch_rows, coords)
    coords, params = _pca(X, idx, seed, batch_rows, coords)
    if method == "umap":
        params["note"] = f"UMAP needs at least {_MIN_UMAP_ROWS} rows; PCA used instead"
    return coords, params
