"""Slide-wide cluster maps at cell resolution, and per-cluster prototype candidates.

Averaging order: each tile's cells are assigned (NNLS against H) first, and the K weights of
overlapping tiles are averaged on the slide grid afterwards. Averaging the C-dimensional
activations first, as the authors do, would need a C x grid canvas per slide (1024 channels x
~10 M cells = 40 GB for a large slide at 32 px cells); averaging K weights needs K x grid
(~240 MB at K = 6). With non-overlapping tiles (the default) both orders give identical maps.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .images import encode_image


class CellCanvas:
    """Sum and count of per-cell weights on a slide grid of (rows, cols) cells of cell_l0 level-0 px."""

    def __init__(self, width: int, height: int, cell_l0: float, k: int, cells_per_tile: tuple[int, int],
                 stride_cells: int, edge_cells: int = 0):
        self.cell_l0 = cell_l0
        self.rows = max(1, math.ceil(height / cell_l0))
        self.cols = max(1, math.ceil(width / cell_l0))
        self.sum = np.zeros((k, self.rows, self.cols), dtype=np.float32)
        self.count = np.zeros((self.rows, self.cols), dtype=np.uint16)
        self.h, self.w = cells_per_tile
        self.stride_cells = stride_cells
        self.e = edge_cells

    def paste(self, grid_index: np.ndarray, weights: np.ndarray) -> None:
        """grid_index: (B, 2) tile (row, col) in the tile grid; weights: (B, h, w, K) per-cell weights."""
        e = self.e
        for (gr, gc), wt in zip(grid_index, weights):
            r0 = int(gr) * self.stride_cells + e
            c0 = int(gc) * self.stride_cells + e
            block = np.moveaxis(wt[e:self.h - e, e:self.w - e], -1, 0)  # (K, h', w')
            r1 = min(r0 + block.shape[1], self.rows)
            c1 = min(c0 + block.shape[2], self.cols)
            self.sum[:, r0:r1, c0:c1] += block[:, : r1 - r0, : c1 - c0]
            self.count[r0:r1, c0:c1] += 1

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Soft maps (K, rows, cols) float16 mean weights, and the hard map (rows, cols) uint8:
        argmax + 1 where any tile covered the cell, 0 elsewhere (no tissue)."""
        covered = self.count > 0
        soft = np.divide(self.sum, np.maximum(self.count, 1)[None], dtype=np.float32)
        hard = np.where(covered, soft.argmax(axis=0) + 1, 0).astype(np.uint8)
        return soft.astype(np.float16), hard


class PrototypeHeap:
    """Keeps, per cluster, the `keep` highest-weight cells of a slide (at most one per tile, so a
    single tile cannot fill a cluster's gallery), each with a JPEG crop of the cell plus context."""

    def __init__(self, k: int, keep: int, crop_context: int = 1, crop_px: int = 96):
        self.k = k
        self.keep = keep
        self.context = crop_context
        self.crop_px = crop_px
        self.items: list[list[tuple[float, int, int, int, bytes]]] = [[] for _ in range(k)]

    def offer(self, first_row: int, pixels: np.ndarray, weights: np.ndarray) -> None:
        """pixels: (B, T, T, 3) uint8 tiles; weights: (B, h, w, K); first_row: tile row of pixels[0]."""
        b, h, w, k = weights.shape
        flat = weights.reshape(b, h * w, k)
        best_cell = flat.argmax(axis=1)            # (B, K)
        best_w = np.take_along_axis(flat, best_cell[:, None, :], axis=1)[:, 0, :]  # (B, K)
        for c in range(k):
            heap = self.items[c]
            floor = heap[-1][0] if len(heap) >= self.keep else -1.0
            order = np.argsort(-best_w[:, c])[: self.keep]
            for t in order:
                wt = float(best_w[t, c])
                if wt <= floor or wt <= 0:
                    break
                cy, cx = divmod(int(best_cell[t, c]), w)
                heap.append((wt, first_row + int(t), cy, cx, self._crop(pixels[t], cy, cx, h, w)))
            heap.sort(key=lambda it: -it[0])
            del heap[self.keep:]

    def _crop(self, tile: np.ndarray, cy: int, cx: int, h: int, w: int) -> bytes:
        side = tile.shape[0]
        cell = side / h
        span = (2 * self.context + 1) * cell
        y0 = int(round(min(max((cy + 0.5) * cell - span / 2, 0), side - span)))
        x0 = int(round(min(max((cx + 0.5) * cell - span / 2, 0), side - span)))
        s = int(round(span))
        return encode_image(tile[y0:y0 + s, x0:x0 + s], "JPEG", 85, side=self.crop_px,
                            resample=Image.Resampling.BICUBIC)

    def arrays(self) -> dict[str, object]:
        """Flat columns: cluster, tile (row within the slide), cell_y, cell_x, weight, crop (JPEG list)."""
        rows = [(c, *it) for c in range(self.k) for it in self.items[c]]
        return {
            "cluster": np.array([r[0] for r in rows], dtype=np.int16),
            "weight": np.array([r[1] for r in rows], dtype=np.float32),
            "tile": np.array([r[2] for r in rows], dtype=np.int64),
            "cell_y": np.array([r[3] for r in rows], dtype=np.int16),
            "cell_x": np.array([r[4] for r in rows], dtype=np.int16),
            "crop": [r[5] for r in rows],
        }
