"""Linear regression of one model output on per-tile concept weights, with grouped cross-validation.

Pure numpy (no scikit-learn, no torch), so `report` and the dashboard can use it.

The fit is ordinary least squares with an intercept, computed as scikit-learn's LinearRegression does
(centre X and y, minimum-norm least-squares solution when weights are collinear). Cross-validation
works on per-group sufficient statistics: for each slide or patient g the count n_g and the sums
S_g = Z_g^T Z_g of Z = [1, X, y] (a (K+2, K+2) matrix). A fold's training fit and its test residuals
follow from sums of those matrices, so 20 shuffles x 5 folds over 10^6 tiles cost milliseconds
and never copy the tile table; the residual sum of squares is exact algebra, not an approximation
(the data are centred by their overall means first, which keeps it well conditioned).
"""

from __future__ import annotations

import numpy as np

__all__ = ["CV_REPEATS", "r2_score", "group_folds", "output_regression", "repeated_group_cv", "regress", "tile_groups"]

CV_REPEATS = 20  # shuffles of the group-to-fold assignment in repeated_group_cv


def tile_groups(slide_of_tile: np.ndarray, patients) -> tuple[np.ndarray, str]:
    """Cross-validation group of each tile: (N,) int64 codes and "patient" | "slide".

    Patients when every slide has one (slide_of_tile (N,) indexes `patients` (S,)), else slides. Patient
    codes number the sorted distinct patients, the order np.unique gives the labels themselves, so the
    folds are those of grouping by the patient strings; integer codes keep 10^6 tiles fast to group.
    """
    slide_of_tile = np.asarray(slide_of_tile, dtype=np.int64)
    patients = np.asarray(patients if patients is not None else (), dtype=object)
    if len(patients) and all(patients):
        _, code = np.unique(patients.astype(str), return_inverse=True)
        return code.reshape(-1).astype(np.int64)[slide_of_tile], "patient"
    return slide_of_tile, "slide"


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot around the mean of y; NaN when y is constant (R^2 is undefined)."""
    y = np.asarray(y, dtype=np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(((y - np.asarray(pred, dtype=np.float64)) ** 2).sum()) / ss_tot


def _check(weights: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(weights, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    if X.ndim != 2 or y.shape != (X.shape[0],) or groups.shape != (X.shape[0],):
        raise ValueError(f"weights must be (N, K), y (N,) and groups (N,); got {X.shape}, {y.shape}, "
                         f"{groups.shape}.")
    if X.shape[0] < 2:
        raise ValueError(f"the output regression needs at least 2 tiles, got {X.shape[0]}.")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("weights or outputs contain NaN or infinite values; check the model outputs "
                         "(e.g. fp16 overflow) and the concept weights.")
    return X, y, groups


def _group_stats(X: np.ndarray, y: np.ndarray, codes: np.ndarray, n_groups: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per group: counts (G,) and S (G, K+2, K+2) = sum of z z^T with z = [1, X - mean, y - mean]."""
    n, k = X.shape
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    stats = np.zeros((n_groups, k + 2, k + 2))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
    mx, my = X.mean(axis=0), y.mean()
    for start in range(0, n, 262_144):  # chunks keep the centred copy small (1/4 M tiles at a time)
        rows = order[start:start + 262_144]
        Z = np.empty((len(rows), k + 2))
        Z[:, 0], Z[:, 1:k + 1], Z[:, k + 1] = 1.0, X[rows] - mx, y[rows] - my
        g = codes[rows]
        for gi in np.unique(g):
            lo, hi = max(bounds[gi], start), min(bounds[gi + 1], start + len(rows))
            part = Z[lo - start:hi - start]
            stats[gi] += part.T @ part
    return counts, stats


def _fit(S: np.ndarray) -> np.ndarray:
    """OLS coefficients [intercept, coef...] from the sufficient statistics S of Z = [1, X, y]."""
    k = S.shape[0] - 2
    n = S[0, 0]
    mean = S[0, 1:] / n  # means of X and y over these rows
    cov = S[1:, 1:] - n * np.outer(mean, mean)  # centred cross-products of [X, y]
    coef = np.linalg.pinv(cov[:k, :k], rcond=1e-12, hermitian=True) @ cov[:k, k]
    return np.concatenate([[mean[k] - mean[:k] @ coef], coef])


def _sse(S: np.ndarray, beta: np.ndarray) -> float:
    """Residual sum of squares of y - [1, X] beta over the rows whose statistics are S."""
    b = np.concatenate([beta, [-1.0]])  # residual = z . [beta, -1] (sign irrelevant when squared)
    return max(float(b @ S @ b), 0.0)


def group_folds(codes: np.ndarray, n_groups: int, n_folds: int) -> np.ndarray:
    """Fold of each group (n_groups,), balancing tiles per fold as scikit-learn's GroupKFold does:
    the largest groups first (stable order), each to the fold with the fewest tiles so far."""
    sizes = np.bincount(codes, minlength=n_groups)
    order = np.argsort(sizes, kind="stable")[::-1]
    load = np.zeros(n_folds)
    fold = np.zeros(n_groups, dtype=np.int64)
    for g in order:
        f = int(np.argmin(load))
        load[f] += sizes[g]
        fold[g] = f
    return fold


def _cv_r2(stats: np.ndarray, fold_of_group: np.ndarray, n_folds: int, ss_tot: float) -> float:
    """R^2 of the pooled out-of-fold predictions (around the mean of all y)."""
    total = stats.sum(axis=0)
    sse = 0.0
    for f in range(n_folds):
        test = stats[fold_of_group == f].sum(axis=0)
        sse += _sse(test, _fit(total - test))
    return float("nan") if ss_tot == 0.0 else 1.0 - sse / ss_tot


class _Grouped:
    """weights, target and groups prepared once: group codes and per-group sufficient statistics."""

    def __init__(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray):
        self.X, self.y = X, y
        _, codes = np.unique(groups, return_inverse=True)
        self.codes = codes.reshape(-1)
        self.n_groups = int(self.codes.max()) + 1 if len(self.codes) else 0
        _, self.stats = _group_stats(X, y, self.codes, self.n_groups)
        total = self.stats.sum(axis=0)
        self.ss_tot = float(total[-1, -1] - total[0, -1] ** 2 / max(len(y), 1))


def _single_split(g: _Grouped, n_splits: int, seed: int) -> dict:
    X, y, n = g.X, g.y, g.X.shape[0]
    beta = _fit(g.stats.sum(axis=0))
    beta[0] += y.mean() - X.mean(axis=0) @ beta[1:]  # back from centred to the original units
    notes = []
    r2 = r2_score(y, beta[0] + X @ beta[1:])
    if np.isnan(r2):
        notes.append("the output is the same on every tile, so R^2 is undefined")
    fold = np.full(n, -1, dtype=np.int64)
    r2_cv, n_folds = float("nan"), 0
    if g.n_groups < 2:
        notes.append(f"cross-validation needs tiles from at least 2 groups (slides or patients); "
                     f"all {n} tiles come from one")
    else:
        n_folds = min(int(n_splits), g.n_groups)
        # Relabel groups in a seeded order first: the balancing sorts groups stably by size, so this
        # only decides which of two equally large groups goes to which fold.
        relabel = np.random.default_rng(seed).permutation(g.n_groups)
        fold_of_group = group_folds(relabel[g.codes], g.n_groups, n_folds)[relabel]
        fold = fold_of_group[g.codes]
        r2_cv = _cv_r2(g.stats, fold_of_group, n_folds, g.ss_tot)
    return {"coef": beta[1:].copy(), "intercept": float(beta[0]), "r2": r2, "r2_cv": r2_cv, "n_folds": n_folds,
            "n_groups": g.n_groups, "n_tiles": n, "fold": fold, "note": "; ".join(notes)}


def _repeated(g: _Grouped, n_repeats: int, n_splits: int, seed: int) -> dict:
    r2s = np.full(int(n_repeats), np.nan)
    if g.n_groups >= 2:
        n_folds = min(int(n_splits), g.n_groups)
        rng = np.random.default_rng(seed)
        for rep in range(int(n_repeats)):
            fold_of_group = np.empty(g.n_groups, dtype=np.int64)
            fold_of_group[rng.permutation(g.n_groups)] = np.arange(g.n_groups) % n_folds
            r2s[rep] = _cv_r2(g.stats, fold_of_group, n_folds, g.ss_tot)
    ok = r2s[np.isfinite(r2s)]
    med, p5, p95 = (np.percentile(ok, q) for q in (50, 5, 95)) if len(ok) else (np.nan,) * 3
    return {"r2_cv_repeats": r2s, "r2_cv_median": float(med), "r2_cv_p5": float(p5), "r2_cv_p95": float(p95),
            "n_repeats": int(n_repeats)}


def output_regression(weights: np.ndarray, y: np.ndarray, groups: np.ndarray, *, n_splits: int = 5,
                      seed: int = 0) -> dict:
    """Linear regression (with intercept) of a model output on per-tile concept weights.

    weights: (N, K) per-tile summed concept weights; y: (N,) the explained target; groups: (N,) slide
    or patient id per tile (any hashable values).

    Cross-validation: min(n_splits, n_groups) folds with all tiles of one group in the same test fold;
    groups are balanced by tile count (group_folds), and `seed` breaks ties between equally large
    groups. r2_cv is the R^2 of the pooled out-of-fold predictions (one R^2 over all tiles, around the
    mean of all y), so it can be negative when the fit does not generalise.

    Returns coef (K,), intercept, r2 (in-sample), r2_cv, n_folds, n_groups, n_tiles, fold (N,) int
    (each tile's test fold, -1 without CV) and note ("" or why r2 / r2_cv is NaN).
    """
    return _single_split(_Grouped(*_check(weights, y, groups)), n_splits, seed)


def repeated_group_cv(weights: np.ndarray, y: np.ndarray, groups: np.ndarray, *, n_repeats: int = CV_REPEATS,
                      n_splits: int = 5, seed: int = 0) -> dict:
    """Cross-validated R^2 over `n_repeats` random assignments of whole groups to folds.

    One assignment is one draw: on small cohorts the R^2 of a single split depends on which slides
    land together. Per repeat the groups are shuffled (seeded) and dealt to min(n_splits, n_groups)
    folds in turn; the R^2 of the pooled out-of-fold predictions of a linear regression (with
    intercept) is recorded. weights: (N, K); y: (N,); groups: (N,).

    Returns r2_cv_repeats (n_repeats,) (NaN where undefined), r2_cv_median, r2_cv_p5, r2_cv_p95 (the
    5th and 95th percentiles over repeats) and n_repeats; the summaries are NaN with fewer than 2 groups.
    """
    X, y = np.asarray(weights, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return _repeated(_Grouped(X, y, np.asarray(groups)), n_repeats, n_splits, seed)


def regress(weights: np.ndarray, y: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> tuple[dict, dict]:
    """(output_regression, repeated_group_cv) of the same data, its group statistics computed once."""
    g = _Grouped(*_check(weights, y, groups))
    return _single_split(g, 5, seed), _repeated(g, CV_REPEATS, 5, seed)
