"""Honest maps: concept maps only where there is tissue, and which concepts sit on glass or tissue edges.

Tiles are kept when at least --min-tissue of them is tissue, so a kept tile can still hold cells of bare
glass, and the model's cells there get a concept like any other. The cluster maps say "no colour = no
tissue", so cells whose tissue fraction (from the slide's stored tissue mask) is below
GLASS_BELOW get no concept: hard map 0 and soft weights 0. Before they are blanked, each concept's
dominant cells are counted as tissue, edge (partly tissue) or glass, so concepts that sit mostly on glass
or edges can be flagged (`concept_tissue_flags`). Pure numpy; no torch.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .coverage import area_fraction

GLASS_BELOW = 0.10  # a cell with less tissue than this is glass: it gets no concept
EDGE_BELOW = 0.50   # a cell with GLASS_BELOW <= tissue < EDGE_BELOW is a tissue edge
FLAG_SHARE = 0.50   # a concept is flagged when more than this share of its cells are glass or edge


def cell_tissue_fraction(mask: np.ndarray, mask_downsample: float, cell_l0: float, shape: tuple[int, int]
                         ) -> np.ndarray:
    """Tissue fraction of each map cell. mask: (h, w) bool at mask_downsample level-0 px per mask px;
    cell_l0: cell side in level-0 px; shape: (rows, cols) of the map. Returns (rows, cols) float32 in [0, 1]."""
    rows, cols = shape
    side = cell_l0 / mask_downsample                       # cell side in mask px
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    u0, v0 = (c * side).ravel(), (r * side).ravel()
    frac = area_fraction(np.asarray(mask, np.float64), u0, v0, u0 + side, v0 + side)
    return frac.reshape(rows, cols).astype(np.float32)


def mask_glass(soft: np.ndarray, hard: np.ndarray, tissue: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """Blank the concept maps on glass and count each concept's dominant cells by tissue class.

    soft: (K, rows, cols); hard: (rows, cols) uint8 (0 = not covered, j + 1 = concept j); tissue:
    (rows, cols) tissue fraction. Returns (soft, hard) with glass cells set to 0, and counts (K, 3) int64:
    per concept, the covered cells it dominated on tissue, edge and glass before blanking."""
    glass = tissue < GLASS_BELOW
    edge = ~glass & (tissue < EDGE_BELOW)
    counts = np.zeros((k, 3), np.int64)
    for col, where in enumerate((~glass & ~edge, edge, glass)):
        counts[:, col] = np.bincount(hard[where & (hard > 0)].astype(np.int64) - 1, minlength=k)[:k]
    soft = np.where(glass[None], 0, soft).astype(soft.dtype)
    hard = np.where(glass, 0, hard).astype(hard.dtype)
    return soft, hard, counts


def concept_tissue_flags(per_slide_counts: Iterable[np.ndarray], k: int) -> list[dict[str, Any]]:
    """Per concept over the cohort: cells (covered cells it dominated), tissue, edge, glass counts, the
    shares of glass and edge, and `flag` True when glass + edge exceed FLAG_SHARE of its cells.
    per_slide_counts: the (K, 3) counts of mask_glass for each slide (slides without them are skipped)."""
    total = np.zeros((k, 3), np.int64)
    for counts in per_slide_counts:
        if counts is not None and np.asarray(counts).shape == (k, 3):
            total += np.asarray(counts, np.int64)
    out = []
    for j in range(k):
        n = int(total[j].sum())
        glass_share = total[j, 2] / n if n else 0.0
        edge_share = total[j, 1] / n if n else 0.0
        out.append({"cluster": j + 1, "cells": n, "tissue": int(total[j, 0]), "edge": int(total[j, 1]),
                    "glass": int(total[j, 2]), "glass_share": float(glass_share), "edge_share": float(edge_share),
                    "flag": bool(n and glass_share + edge_share > FLAG_SHARE)})
    return out
