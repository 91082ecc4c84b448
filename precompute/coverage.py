"""How much of a rectangle a mask covers: exact area fractions with partial pixels. numpy only, so the
atlas readers (dashboard, report) can use it without the tissue detector's image libraries."""

from __future__ import annotations

import numpy as np


def _bilinear(img: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """img sampled at fractional (v, u) inside [0, H-1] x [0, W-1], bilinearly."""
    h, w = img.shape
    v0 = np.clip(np.floor(v).astype(np.int64), 0, h - 2)
    u0 = np.clip(np.floor(u).astype(np.int64), 0, w - 2)
    fv, fu = v - v0, u - u0
    top = img[v0, u0] * (1 - fu) + img[v0, u0 + 1] * fu
    bottom = img[v0 + 1, u0] * (1 - fu) + img[v0 + 1, u0 + 1] * fu
    return top * (1 - fv) + bottom * fv


def area_fraction(mask: np.ndarray, u0, v0, u1, v1) -> np.ndarray:
    """Mean of `mask` (h, w) over rectangles [u0, u1) x [v0, v1) given in (fractional) mask px; (n,).

    The summed-area table of a pixel image is bilinear inside each pixel, so bilinear interpolation
    of it at fractional corners gives the exact covered area, partial pixels included.
    """
    if len(u0) == 0:
        return np.zeros(0, np.float64)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.float64)
    sat[1:, 1:] = np.asarray(mask, np.float64).cumsum(0).cumsum(1)
    u0, u1 = np.clip(np.asarray(u0, np.float64), 0, w), np.clip(np.asarray(u1, np.float64), 0, w)
    v0, v1 = np.clip(np.asarray(v0, np.float64), 0, h), np.clip(np.asarray(v1, np.float64), 0, h)
    area = _bilinear(sat, v1, u1) - _bilinear(sat, v0, u1) - _bilinear(sat, v1, u0) + _bilinear(sat, v0, u0)
    return np.clip(area / np.maximum((u1 - u0) * (v1 - v0), 1e-12), 0.0, 1.0)
