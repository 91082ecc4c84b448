"""GradCAM agreement statistics per tile and per concept: Pearson r between a tile's GradCAM map and
each concept's weight map at the hooked layer's cells, and their summaries over tiles.

numpy only: the full pass (passes.py) computes them per batch; the fidelity stage summarises them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cam_cluster_correlation", "pearson_rows", "positive_tiles", "summarise_cam_correlation"]


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
