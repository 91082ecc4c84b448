"""Slide images: cluster map, soft concept maps and model-output maps laid over the thumbnail.

Geometry: level-0 px = thumbnail px * thumb_downsample; cluster-map cell (i, j) covers level-0
[j * cell_l0, (j+1) * cell_l0) x [i * cell_l0, (i+1) * cell_l0). Everything is numpy + PIL.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .colors import concept_lut, rgb, viridis


def grid_to_thumb(grid: np.ndarray, cell_l0: float, thumb_downsample: float, size: tuple[int, int],
                  resample=Image.NEAREST) -> np.ndarray:
    """Resample a cell grid (gh, gw[, C]) uint8 onto the thumbnail raster of `size` = (w, h)."""
    gh, gw = grid.shape[:2]
    scale = float(cell_l0) / float(thumb_downsample)  # thumbnail px per cell
    w, h = size
    full = (max(1, round(gw * scale)), max(1, round(gh * scale)))
    img = Image.fromarray(grid).resize(full, resample)
    canvas = Image.new(img.mode, (w, h))
    canvas.paste(img.crop((0, 0, min(w, full[0]), min(h, full[1]))), (0, 0))
    return np.asarray(canvas)


def blend(base: np.ndarray, rgba: np.ndarray, opacity: float) -> np.ndarray:
    """base (h,w,3) uint8 under rgba (h,w,4) uint8 scaled by `opacity` in [0, 1] -> (h,w,3) uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0 * float(opacity)
    out = base.astype(np.float32) * (1 - a) + rgba[..., :3].astype(np.float32) * a
    return out.round().astype(np.uint8)


def hard_rgba(hard: np.ndarray, k: int) -> np.ndarray:
    """(gh, gw) uint8 hard map (0 = no tissue, j+1 = concept j) -> (gh, gw, 4) RGBA, no tissue transparent."""
    return concept_lut(k)[np.minimum(hard, k)]


def soft_rgba(soft: np.ndarray, vmax: float, color: str) -> np.ndarray:
    """One concept's soft map (gh, gw) -> RGBA in the concept's colour, opacity = weight / vmax."""
    a = np.clip(np.nan_to_num(soft.astype(np.float32)) / (vmax if vmax > 0 else 1.0), 0, 1)
    out = np.zeros(soft.shape + (4,), np.uint8)
    out[..., :3] = rgb(color)
    out[..., 3] = (a * 255).round().astype(np.uint8)
    return out


def tile_value_grid(x: np.ndarray, y: np.ndarray, tile_l0: float, values: np.ndarray,
                    thumb_downsample: float, shape: tuple[int, int]) -> np.ndarray:
    """Mean of per-tile `values` over the thumbnail raster (h, w) (overlaps averaged; NaN = no tile)."""
    h, w = shape
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.int32)
    s = float(thumb_downsample)
    x0 = np.clip(np.floor(x / s).astype(int), 0, w)
    y0 = np.clip(np.floor(y / s).astype(int), 0, h)
    x1 = np.clip(np.ceil((x + tile_l0) / s).astype(int), 0, w)
    y1 = np.clip(np.ceil((y + tile_l0) / s).astype(int), 0, h)
    for a, b, c, d, v in zip(y0, y1, x0, x1, values):
        acc[a:b, c:d] += v
        cnt[a:b, c:d] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / cnt, np.nan)


def value_rgba(grid: np.ndarray, vrange: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """(h, w) float (NaN = transparent) -> viridis RGBA."""
    lo, hi = vrange
    out = np.zeros(grid.shape + (4,), np.uint8)
    out[..., :3] = viridis((grid - lo) / (hi - lo if hi > lo else 1.0))
    out[..., 3] = np.where(np.isfinite(grid), 255, 0).astype(np.uint8)
    return out


def encode(img: np.ndarray, fmt: str = "JPEG") -> bytes:
    """uint8 image -> JPEG (quality 88) or PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return buf.getvalue()


def upscale(img: np.ndarray, width: int) -> np.ndarray:
    """Nearest-neighbour upscale of a small grid image to about `width` px wide (for display)."""
    h, w = img.shape[:2]
    f = max(1, width // max(w, 1))
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)
