"""Tile-level k-means: fit on a seeded sample, assign every row in batches.

A thin layer over scikit-learn's KMeans. Rows are typically pooled tile embeddings (n, d);
fitting on a capped sample keeps the cost independent of the cohort size, and assigning in
batches keeps memory at one batch of float32 rows however the input is stored (numpy,
float16 memmap, h5py dataset).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from .sampling import sample_rows

__all__ = ["KMeansModel", "assign", "assign_labels", "fit_kmeans"]

KMeansModel = KMeans  # a fitted sklearn KMeans; cluster_centers_ (k, d) float32

_MAX_K = np.iinfo(np.int16).max  # labels are stored as int16


def _rows_f32(X: Any, idx: np.ndarray | slice) -> np.ndarray:
    """X[idx] as a float32 array (sorted fancy indexing also works on h5py datasets)."""
    return np.asarray(X[idx], dtype=np.float32)


def fit_kmeans(X: Any, k: int, seed: int = 0, sample: int = 100_000, *, n_init: int = 3) -> KMeansModel:
    """Fit k-means with k clusters on a seeded sample of at most `sample` rows of X (n, d).

    `n_init` k-means++ restarts keep the best inertia (scikit-learn's single "auto" start
    varies more between seeds). Returns the fitted scikit-learn KMeans (float32 centres).
    """
    n = X.shape[0]
    if not 1 <= k <= _MAX_K:
        raise ValueError(f"k must be between 1 and {_MAX_K}, got {k}.")
    idx = sample_rows(n, sample, seed)
    if len(idx) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} rows; got {len(idx)}. Use a smaller k.")
    S = _rows_f32(X, idx)
    if S.ndim != 2:
        raise ValueError(f"X must be a 2-D (rows, features) matrix, got shape {S.shape}.")
    if not np.isfinite(S).all():
        raise ValueError("X contains NaN or infinite values; check the embeddings before clustering.")
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(S)


def assign(model: KMeansModel, X: Any, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre for every row of X (n, d), batch by batch.

    Returns labels (n,) int16 (what `model.predict` gives) and Euclidean distances to every
    centre (n, k) float32.
    """
    n = X.shape[0]
    k = model.n_clusters
    labels = np.empty(n, dtype=np.int16)
    dist = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, batch):
        block = _rows_f32(X, slice(start, start + batch))
        labels[start : start + batch] = model.predict(block)
        dist[start : start + batch] = model.transform(block)
    return labels, dist


def assign_labels(model: KMeansModel, X: Any, out: Any, batch: int = 65536) -> None:
    """Nearest centre of every row of X (n, d) written into out[rows] (int16) batch by batch: the labels
    `assign` gives, without holding all n of them (or the n x k distances) in memory."""
    n = X.shape[0]
    for start in range(0, n, batch):
        block = _rows_f32(X, slice(start, start + batch))
        out[start : start + len(block)] = model.predict(block).astype(np.int16)
