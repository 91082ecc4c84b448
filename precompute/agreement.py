"""Agreement between each concept's cell map and the GradCAM map, pooled over the cohort's cells.

Reviewers ask "does the concept sit where the model looks?". Per-tile Pearson r answers it badly: r is
undefined on every tile whose CAM is all zero (for a raw-logit target that is most tiles), and an
average of the few defined values over-weights tiles with a single non-zero cell. Here:

- pooled r: one Pearson r per concept over all tissue cells of the cohort (cells whose hard map is
  not 0), and over the cells covered by tiles the model calls positive;
- per-tile r only on tiles whose CAM has at least `min_cam_cells(h, w)` non-zero cells (10 % of the
  tile's cells, at least 3), with the counts of tiles used and excluded;
- 95 % intervals by a bootstrap over slides (percentile, `N_BOOT` draws, seeded); with fewer than
  `MIN_BOOT_SLIDES` slides the tiles are resampled instead, and the unit says so.

Everything is computed from the stored maps (slide_maps/<i>/gradcam, soft, hard) and the tile table,
so anyone can recompute it from the atlas. Pure numpy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 1000
MIN_BOOT_SLIDES = 5  # fewer slides than this cannot support a slide bootstrap: tiles are resampled
MIN_CAM_FRACTION = 0.10  # per-tile r needs this share of the tile's cells with a non-zero CAM ...
MIN_CAM_CELLS = 3         # ... and at least this many


def min_cam_cells(h: int, w: int) -> int:
    """Non-zero CAM cells a tile of h x w cells needs before its per-tile r is used (5 of 7 x 7)."""
    return max(MIN_CAM_CELLS, int(np.ceil(MIN_CAM_FRACTION * h * w)))


@dataclass
class SlideCells:
    """One slide's maps and tiles. cam: (rows, cols); soft: (K, rows, cols); tissue: (rows, cols) bool
    cells that carry a concept; blocks: (n, 4) int (row0, col0, rows, cols) of each tile's cells;
    positive: (n,) bool tiles the model calls positive."""

    cam: np.ndarray
    soft: np.ndarray
    tissue: np.ndarray
    blocks: np.ndarray
    positive: np.ndarray


def tile_blocks(x: np.ndarray, y: np.ndarray, tile_l0: float, cell_l0: float) -> np.ndarray:
    """(n, 4) int (row0, col0, rows, cols) of each tile's cells on its slide's map (level-0 x, y)."""
    side = int(round(tile_l0 / cell_l0))
    r0 = np.rint(np.asarray(y, np.float64) / cell_l0).astype(np.int64)
    c0 = np.rint(np.asarray(x, np.float64) / cell_l0).astype(np.int64)
    return np.stack([r0, c0, np.full_like(r0, side), np.full_like(r0, side)], axis=1)


def _moments(x: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Sufficient statistics of Pearson r: x (n,), Y (n, K) -> (K, 6) [n, Sx, Sy, Sxx, Syy, Sxy]."""
    x = np.asarray(x, np.float64)
    Y = np.asarray(Y, np.float64)
    n = np.full(Y.shape[1], float(len(x)))
    return np.stack([n, np.full_like(n, x.sum()), Y.sum(0), np.full_like(n, (x * x).sum()), (Y * Y).sum(0),
                     x @ Y], axis=1)


def r_from_moments(m: np.ndarray) -> np.ndarray:
    """Pearson r from summed moments (..., K, 6); NaN where either side is constant or n < 2."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(m, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        vx = n * sxx - sx * sx
        vy = n * syy - sy * sy
        r = (n * sxy - sx * sy) / np.sqrt(vx * vy)
    # relative tolerance: a constant side leaves only rounding in its variance
    bad = (n < 2) | (vx <= 1e-12 * np.maximum(n * sxx, 1e-300)) | (vy <= 1e-12 * np.maximum(n * syy, 1e-300))
    return np.clip(np.where(bad, np.nan, r), -1.0, 1.0)


def _block(arr: np.ndarray, b: np.ndarray) -> np.ndarray:
    r0, c0, h, w = (int(v) for v in b)
    return arr[..., r0:r0 + h, c0:c0 + w]


def slide_statistics(s: SlideCells, min_cells: int) -> dict[str, np.ndarray]:
    """Moments of one slide: 'all' and 'pos' (K, 6) over its tissue cells (all / under positive tiles),
    per tile 'tile_all' and 'tile_pos' (n, K, 6) over the tile's tissue cells, and per-tile r (n, K) with
    NaN where the tile has fewer than min_cells non-zero CAM cells ('tile_used' (n,) bool)."""
    k = s.soft.shape[0]
    cam = np.asarray(s.cam, np.float64)
    soft = np.asarray(s.soft, np.float64)
    under_pos = np.zeros(cam.shape, bool)
    n = len(s.blocks)
    tile_m = np.zeros((n, k, 6))
    tile_r = np.full((n, k), np.nan)
    used = np.zeros(n, bool)
    for i, b in enumerate(s.blocks):
        if s.positive[i]:
            _block(under_pos, b)[...] = True
        t = _block(s.tissue, b)
        c, y = _block(cam, b)[t], _block(soft, b)[:, t].T
        tile_m[i] = _moments(c, y)
        used[i] = int((c > 0).sum()) >= min_cells  # non-zero CAM on the tile's tissue cells
        if used[i]:
            tile_r[i] = r_from_moments(tile_m[i])
    pos = s.tissue & under_pos
    return {"all": _moments(cam[s.tissue], soft[:, s.tissue].T), "pos": _moments(cam[pos], soft[:, pos].T),
            "tile_all": tile_m, "tile_pos": tile_m * s.positive[:, None, None], "tile_r": tile_r, "tile_used": used,
            "positive": np.asarray(s.positive, bool)}


def _interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles over axis 0, ignoring NaN draws (NaN when all are NaN)."""
    ok = np.isfinite(draws).any(axis=0)
    safe = np.where(np.isfinite(draws), draws, np.nan)
    lo = np.full(draws.shape[1:], np.nan)
    hi = lo.copy()
    if ok.any():
        lo[ok] = np.nanpercentile(safe[:, ok], 2.5, axis=0)
        hi[ok] = np.nanpercentile(safe[:, ok], 97.5, axis=0)
    return lo, hi


def _unit_arrays(stats: list[dict], by_slide: bool) -> dict[str, np.ndarray]:
    """Per bootstrap unit (slide or tile): moments 'all', 'pos' (U, K, 6); per-tile r sums and counts
    over all tiles ('r_sum', 'r_n') and positive tiles ('rp_sum', 'rp_n'), (U, K)."""
    def rsum(st, pos_only):
        r = st["tile_r"] if not pos_only else np.where(st["positive"][:, None], st["tile_r"], np.nan)
        return np.where(np.isfinite(r), r, 0.0), np.isfinite(r).astype(np.float64)

    cols: dict[str, list[np.ndarray]] = {n: [] for n in ("all", "pos", "r_sum", "r_n", "rp_sum", "rp_n")}
    for st in stats:
        (s, c), (sp, cp) = rsum(st, False), rsum(st, True)
        if by_slide:
            parts = (st["all"][None], st["pos"][None], s.sum(0)[None], c.sum(0)[None], sp.sum(0)[None], cp.sum(0)[None])
        else:
            parts = (st["tile_all"], st["tile_pos"], s, c, sp, cp)
        for name, value in zip(cols, parts):
            cols[name].append(value)
    return {n: np.concatenate(v) for n, v in cols.items()}


def cohort_agreement(slides: list[SlideCells], *, min_cells: int, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Pooled and per-tile agreement of K concept maps with GradCAM over a cohort, with 95 % intervals.

    Returns (K,) arrays: pooled_r (all tissue cells), pooled_pos_r (cells under positive tiles) and
    tile_r_mean, tile_pos_r_mean (mean per-tile r over used tiles), each with _lo/_hi; tile_n, tile_pos_n (tiles with a defined r per concept); and scalars n_tiles,
    n_tiles_used, n_tiles_excluded (CAM rule), n_pos_tiles, min_cam_cells, unit ('slide' | 'tile'),
    n_units, n_boot.
    """
    stats = [slide_statistics(s, min_cells) for s in slides]
    by_slide = len(slides) >= MIN_BOOT_SLIDES
    u = _unit_arrays(stats, by_slide)
    k = u["all"].shape[1]
    out: dict = {}

    def estimate(w: np.ndarray) -> dict[str, np.ndarray]:  # w: (B, U) unit weights
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"pooled_r": r_from_moments(np.einsum("bu,ukm->bkm", w, u["all"])),
                    "pooled_pos_r": r_from_moments(np.einsum("bu,ukm->bkm", w, u["pos"])),
                    "tile_r_mean": (w @ u["r_sum"]) / (w @ u["r_n"]),
                    "tile_pos_r_mean": (w @ u["rp_sum"]) / (w @ u["rp_n"])}

    n_units = len(u["r_sum"])
    point = estimate(np.ones((1, n_units)))
    rng = np.random.default_rng(seed)
    chunks: list[dict[str, np.ndarray]] = []
    per = max(1, min(n_boot, 2_000_000 // max(n_units, 1)))  # draws per chunk: bounded (draws x units) memory
    for start in range(0, n_boot if n_units else 0, per):
        draws = rng.integers(0, n_units, size=(min(per, n_boot - start), n_units))
        chunks.append(estimate(np.stack([np.bincount(d, minlength=n_units) for d in draws]).astype(np.float64)))
    boot = {key: np.concatenate([c[key] for c in chunks]) if chunks else np.full((n_boot, k), np.nan)
            for key in point}
    for key, value in point.items():
        out[key] = value[0]
        out[key + "_lo"], out[key + "_hi"] = _interval(boot[key])
    used = np.concatenate([st["tile_used"] for st in stats]) if stats else np.zeros(0, bool)
    positive = np.concatenate([s.positive for s in slides]) if slides else np.zeros(0, bool)
    n_cells = sum(int(st["all"][0, 0]) for st in stats) if k else 0
    n_pos_cells = sum(int(st["pos"][0, 0]) for st in stats) if k else 0
    out.update({"n_cells": n_cells, "n_pos_cells": n_pos_cells,
                "tile_n": u["r_n"].sum(0), "tile_pos_n": u["rp_n"].sum(0),
                "n_tiles": int(len(used)), "n_tiles_used": int(used.sum()), "n_tiles_excluded": int((~used).sum()),
                "n_pos_tiles": int(positive.sum()), "n_pos_tiles_used": int((used & positive).sum()),
                "min_cam_cells": int(min_cells), "unit": "slide" if by_slide else "tile", "n_units": int(n_units),
                "n_boot": int(n_boot)})
    return out


def mean_with_interval(values: np.ndarray, units: np.ndarray, *, seed: int = 0, n_boot: int = N_BOOT
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means of values (N, M) with 95 % percentile intervals from a bootstrap over `units` (N,)
    (slides; every row of a drawn unit comes along). Returns mean, lo, hi (M,); NaN without rows."""
    values = np.asarray(values, np.float64)
    _, codes = np.unique(np.asarray(units), return_inverse=True)
    n_units = int(codes.max()) + 1 if len(codes) else 0
    if not n_units:
        nan = np.full(values.shape[1], np.nan)
        return nan, nan.copy(), nan.copy()
    sums = np.zeros((n_units, values.shape[1]))
    np.add.at(sums, codes, values)
    counts = np.bincount(codes, minlength=n_units).astype(np.float64)
    rng = np.random.default_rng(seed)
    w = np.stack([np.bincount(d, minlength=n_units) for d in rng.integers(0, n_units, (n_boot, n_units))])
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = (w @ sums) / (w @ counts)[:, None]
    lo, hi = _interval(draws)
    return sums.sum(0) / counts.sum(), lo, hi


def importance_summary(importance: np.ndarray, deletion: np.ndarray, slide: np.ndarray, diagnosis: np.ndarray,
                       *, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Cohort, per-diagnosis and per-slide summaries of per-tile concept importance.

    importance: (N, K) drop of the target when each concept is removed; deletion: (N, K + 1) target after
    removing a tile's 0..K most important concepts; slide: (N,) slide row; diagnosis: (N,) per tile.
    Intervals: bootstrap over slides (cohort, diagnoses; tiles when there are fewer than MIN_BOOT_SLIDES),
    normal approximation mean +- 1.96 SD / sqrt(n) over the tiles of a slide. Returns (arrays, attrs)."""
    slide = np.asarray(slide)
    unit = slide if len(np.unique(slide)) >= MIN_BOOT_SLIDES else np.arange(len(slide))
    mean, lo, hi = mean_with_interval(importance, unit, seed=seed)
    d_mean, d_lo, d_hi = mean_with_interval(deletion, unit, seed=seed)
    arrays = {"mean": mean, "lo": lo, "hi": hi, "deletion_mean": d_mean, "deletion_lo": d_lo, "deletion_hi": d_hi,
              "order": np.argsort(-mean)}
    names = sorted({str(d) for d in diagnosis})
    per = [mean_with_interval(importance[diagnosis == d], unit[diagnosis == d], seed=seed) for d in names]
    for i, key in enumerate(("by_diagnosis_mean", "by_diagnosis_lo", "by_diagnosis_hi")):
        arrays[key] = np.stack([p[i] for p in per]) if per else np.zeros((0, importance.shape[1]))
    slides = np.unique(slide)
    sm = np.stack([importance[slide == s].mean(0) for s in slides])
    half = np.stack([1.96 * importance[slide == s].std(0, ddof=1) / np.sqrt((slide == s).sum())
                     if (slide == s).sum() > 1 else np.full(importance.shape[1], np.nan) for s in slides])
    arrays.update({"slides": slides.astype(np.int64), "by_slide_mean": sm, "by_slide_lo": sm - half,
                   "by_slide_hi": sm + half})
    return arrays, {"diagnoses": names, "unit": "slide" if unit is slide else "tile", "n_boot": N_BOOT}
