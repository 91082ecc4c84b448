"""Geometry of the slide viewer: which part of a slide is on screen and at what magnification, and the
concept / output / GradCAM layers resampled onto exactly those screen pixels.

A view is a centre (cx, cy) in level-0 px and a scale `s` in level-0 px per screen px. The server
renders RENDER_W x VIEW_H screen px around the centre; the chart shows the middle `width` px of it
(whatever the browser gives the chart, up to RENDER_W), so the same view fills 900 px at 1280 px and
1,600 px at 1920 px without a round trip. Screen px (u, v) of the rendered image show level-0 point
(x0 + (u + 0.5) s, y0 + (v + 0.5) s) with (x0, y0) its top-left corner; map cell (i, j) covers level-0
[j c, (j + 1) c) x [i c, (i + 1) c) with c = cell_l0, so every layer is sampled at the same points as
the pixels and stays aligned at every zoom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VIEW_H = 600       # chart height, screen px (fits a 720-px-high projector with the page header)
RENDER_W = 1760    # screen px rendered per view: wider than the chart on a 1920-px screen
FIT_W = 740        # chart width assumed when fitting a box: the narrowest chart (760 px at 1280 px)
MIN_SCALE = 0.5    # the most magnified view: 2 screen px per level-0 px
ZOOM_STEP = 2.0
NICE_UM = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


@dataclass(frozen=True)
class View:
    """cx, cy: centre, level-0 px; s: level-0 px per screen px (1 = full resolution)."""

    cx: float
    cy: float
    s: float

    def box(self, w: int = RENDER_W, h: int = VIEW_H) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) level-0 px covered by a w x h screen-px image centred on the view."""
        return (self.cx - w * self.s / 2, self.cy - h * self.s / 2, self.cx + w * self.s / 2,
                self.cy + h * self.s / 2)

    def param(self) -> str:
        """URL form 'cx,cy,s' (centre rounded to px, scale to 4 significant digits)."""
        return f"{round(self.cx)},{round(self.cy)},{self.s:.4g}"

    @classmethod
    def parse(cls, text: str | None) -> "View | None":
        try:
            cx, cy, s = (float(v) for v in str(text).split(","))
        except (TypeError, ValueError):
            return None
        return cls(cx, cy, s) if all(map(math.isfinite, (cx, cy, s))) and s > 0 else None


def max_scale(width: float, height: float) -> float:
    """Scale at which the whole slide (level-0 width x height px) fits the narrowest chart."""
    return max(width / FIT_W, height / VIEW_H, MIN_SCALE) * 1.02


def clamp(view: View, width: float, height: float) -> View:
    """Keep the scale between full-resolution x2 and whole-slide, and the centre on the slide."""
    s = float(np.clip(view.s, MIN_SCALE, max_scale(width, height)))
    return View(float(np.clip(view.cx, 0, width)), float(np.clip(view.cy, 0, height)), s)


def fit(width: float, height: float) -> View:
    """The whole slide."""
    return View(width / 2, height / 2, max_scale(width, height))


def zoom(view: View, factor: float, width: float, height: float) -> View:
    """Magnify by `factor` (> 1 zooms in) about the centre."""
    return clamp(View(view.cx, view.cy, view.s / factor), width, height)


def pan(view: View, dx: float, dy: float, width: float, height: float) -> View:
    """Move by dx, dy times the visible (narrowest) chart size."""
    return clamp(View(view.cx + dx * FIT_W * view.s, view.cy + dy * VIEW_H * view.s, view.s), width, height)


def box_view(x0: float, x1: float, y0: float, y1: float, width: float, height: float) -> View:
    """The view that shows the level-0 box [x0, x1] x [y0, y1] whole in the narrowest chart."""
    x0, x1 = sorted((float(x0), float(x1)))
    y0, y1 = sorted((float(y0), float(y1)))
    s = max((x1 - x0) / FIT_W, (y1 - y0) / VIEW_H)
    return clamp(View((x0 + x1) / 2, (y0 + y1) / 2, s), width, height)


def tile_view(x: float, y: float, tile_l0: float, width: float, height: float) -> View:
    """A tile (top-left x, y; side tile_l0, level-0 px) in the centre, a third of the chart high."""
    return clamp(View(x + tile_l0 / 2, y + tile_l0 / 2, 3 * tile_l0 / VIEW_H), width, height)


def contains(view: View, x: float, y: float, tile_l0: float) -> bool:
    """Is the tile wholly inside the narrowest chart's part of the view?"""
    x0, y0, x1, y1 = view.box(FIT_W, VIEW_H)
    return x0 <= x and x + tile_l0 <= x1 and y0 <= y and y + tile_l0 <= y1


def cell_index(view: View, cell_l0: float, grid_shape: tuple[int, int], w: int = RENDER_W,
               h: int = VIEW_H) -> tuple[np.ndarray, np.ndarray]:
    """Map-cell row (h,) and column (w,) under each screen px row / column of the rendered image;
    -1 where the px centre lies outside the map."""
    x0, y0, _, _ = view.box(w, h)
    cols = np.floor((x0 + (np.arange(w) + 0.5) * view.s) / cell_l0).astype(np.int64)
    rows = np.floor((y0 + (np.arange(h) + 0.5) * view.s) / cell_l0).astype(np.int64)
    gh, gw = grid_shape
    return np.where((rows >= 0) & (rows < gh), rows, -1), np.where((cols >= 0) & (cols < gw), cols, -1)


def sample_grid(rgba: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(gh, gw, 4) uint8 cell colours -> (len(rows), len(cols), 4) screen px; transparent outside."""
    # one take per axis: 1.2 ms for a 600 x 1760 view, against 39 ms for one broadcast fancy index
    out = rgba.take(np.maximum(rows, 0), axis=0).take(np.maximum(cols, 0), axis=1)
    out[rows < 0] = 0
    out[:, cols < 0] = 0
    return out


def scale_bar(s: float, mpp: float | None, target_px: float = 160) -> tuple[float, str]:
    """(bar length in screen px, label): a round length close to `target_px` screen px.
    In um when the slide has a pixel size (mpp, um per level-0 px), else in level-0 px."""
    unit_per_px = s * mpp if mpp and math.isfinite(mpp) and mpp > 0 else s
    want = target_px * unit_per_px
    nice = [v for v in NICE_UM if v <= want] or [NICE_UM[0]]
    value = nice[-1] if want >= NICE_UM[0] else want
    if not (mpp and math.isfinite(mpp) and mpp > 0):
        value = 10 ** math.floor(math.log10(max(want, 1e-9)))
        value *= 5 if want / value >= 5 else 2 if want / value >= 2 else 1
        return value / unit_per_px, f"{value:g} px (level 0; no pixel size)"
    label = f"{value / 1000:g} mm" if value >= 1000 else f"{value:g} µm"
    return value / unit_per_px, label
