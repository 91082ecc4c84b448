"""The overview scatter at any scale: all tiles as one density image, a bounded sample as points.

Browsers handle about 1e4 interactive Vega marks and Streamlit ships every chart row, so the
scatter draws (a) a 2-D histogram of *all* selected tiles as a PNG (one image mark) and (b) at most
`MAX_POINTS` real points; a brush is resolved against all tiles here, on the server.
Coordinates are the atlas' 2-D projection `proj` (n, 2), in its own units.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from precompute.colors import rgb, viridis

MAX_POINTS = 20_000     # hard cap on points drawn
# default: each drawn point costs the browser ~0.03 ms per redraw on a 2-core machine, on top of
# 0.5-0.75 s for the redraw itself (bench/scatter_redraw.py); the density image already shows every
# tile, so the points only need to be enough to hover and click, and more are one click away
DEFAULT_POINTS = 5_000
POINT_CHOICES = (2_000, 5_000, 10_000, 20_000)
BINS = (320, 220)  # histogram cells along x, y (at most; see `bins_for`)


def bins_for(n: int) -> tuple[int, int]:
    """Histogram size for n points: coarse for small atlases (cells stay visible), BINS from ~45k on."""
    bx = int(np.clip(np.sqrt(max(n, 1)) * 1.5, 48, BINS[0]))
    return bx, max(24, round(bx * BINS[1] / BINS[0]))


def extent(proj: np.ndarray, pad: float = 0.03) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of all finite points, padded by `pad` of the range on each side."""
    p = proj[np.isfinite(proj).all(axis=1)] if len(proj) else proj
    if not len(p):
        return -1.0, 1.0, -1.0, 1.0
    lo, hi = p.min(axis=0).astype(float), p.max(axis=0).astype(float)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    lo, hi = lo - pad * span, hi + pad * span
    return lo[0], hi[0], lo[1], hi[1]


def bin_index(proj: np.ndarray, ext, bins=BINS) -> np.ndarray:
    """Flat histogram cell (row-major, row 0 = top = largest y) of each point; -1 outside."""
    x0, x1, y0, y1 = ext
    bx, by = bins
    ix = np.floor((proj[:, 0] - x0) / (x1 - x0) * bx).astype(np.int64)
    iy = np.floor((y1 - proj[:, 1]) / (y1 - y0) * by).astype(np.int64)
    ok = (ix >= 0) & (ix < bx) & (iy >= 0) & (iy < by)
    return np.where(ok, iy * bx + ix, -1)


def density_rgba(cells: np.ndarray, bins=BINS, *, categories: np.ndarray | None = None,
                 colors: list[str] | None = None, values: np.ndarray | None = None,
                 vrange: tuple[float, float] = (0.0, 1.0), grey: str = "#4d4d4d") -> np.ndarray:
    """(by, bx, 4) uint8 image of points falling in `cells` (from `bin_index`, -1 ignored).

    Opacity grows with log(count). Colour: the most frequent category per cell (`categories` codes
    into `colors`), or the mean of `values` on a viridis ramp over `vrange`, or plain grey.
    """
    bx, by = bins
    keep = cells >= 0
    cells = cells[keep]
    nc = bx * by
    counts = np.bincount(cells, minlength=nc)
    img = np.zeros((nc, 4), np.uint8)
    filled = counts > 0
    if categories is not None and colors:
        ncat = len(colors)
        per = np.bincount(cells * ncat + categories[keep].astype(np.int64), minlength=nc * ncat).reshape(nc, ncat)
        lut = np.array([rgb(c) for c in colors], np.uint8)
        img[:, :3] = lut[per.argmax(axis=1)]
    elif values is not None:
        sums = np.bincount(cells, weights=values[keep].astype(np.float64), minlength=nc)
        mean = np.divide(sums, counts, out=np.zeros(nc), where=filled)
        lo, hi = vrange
        img[:, :3] = viridis((mean - lo) / (hi - lo if hi > lo else 1.0))
    else:
        img[:, :3] = rgb(grey)
    if filled.any():
        level = np.log1p(counts) / np.log1p(counts.max())
        img[:, 3] = np.where(filled, 70 + 185 * level, 0).astype(np.uint8)
    return img.reshape(by, bx, 4)


def png_bytes(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(image).decode("ascii")


def sample_rows(perm: np.ndarray, mask: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Sorted rows of at most `max_points` tiles passing `mask`, taken in the fixed random order `perm`
    (so a tile drawn under one filter stays drawn under a narrower one)."""
    picked = perm[mask[perm]][:max_points]
    return np.sort(picked)


def rows_in_box(proj: np.ndarray, mask: np.ndarray, xr, yr) -> np.ndarray:
    """Rows of ALL tiles passing `mask` whose projection lies in [xr] x [yr] (inclusive)."""
    x0, x1 = sorted(float(v) for v in xr)
    y0, y1 = sorted(float(v) for v in yr)
    px, py = proj[:, 0], proj[:, 1]
    return np.flatnonzero(mask & (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1))

