"""Concept regions of each slide as GeoJSON for QuPath (`python -m precompute export ATLAS --geojson DIR`).

Per slide one FeatureCollection in level-0 pixel coordinates (origin top left, y down: QuPath's own
convention), written to DIR/<slide_id>.geojson. The hard map's cells of one concept are merged
into polygons (4-connected cells make one polygon, holes kept); each polygon is a QuPath annotation
whose `classification` is the concept's name (from the notes file, else C1..CK) and colour (the
dashboard's palette, precompute/colors.py, as [r, g, b]), with measurements: the mean soft weight of
the concept over the polygon's cells, the number of cells and the area in um^2 (when the slide's pixel
size is known).
Cells are clipped to the slide's level-0 size. Geometry by shapely; no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage

from . import notes as notes_mod
from .atomic import atomic_path
from .colors import concept_color, rgb
from .store import Atlas


# Boundary tracing. Cell (i, j) is the unit square [j, j+1] x [i, i+1] (x right, y down). Every side of
# a region cell that faces a non-region cell is a directed edge with the cell on its right, so the
# outer boundary runs clockwise on screen and holes run the other way. Directions: 0 +x, 1 +y, 2 -x, 3 -y.
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed boundary edges of `mask` (rows, cols): start vertex (E, 2) as (x, y), direction (E,),
    and the region cell (E, 2) as (row, col) on each edge's right."""
    p = np.pad(mask.astype(bool), 1)
    inner = p[1:-1, 1:-1]
    starts, dirs, cells = [], [], []
    for d, outside, offset in ((0, p[:-2, 1:-1], (0, 0)), (1, p[1:-1, 2:], (1, 0)),
                               (2, p[2:, 1:-1], (1, 1)), (3, p[1:-1, :-2], (0, 1))):
        i, j = np.nonzero(inner & ~outside)
        starts.append(np.stack([j + offset[0], i + offset[1]], axis=1))
        dirs.append(np.full(len(i), d))
        cells.append(np.stack([i, j], axis=1))
    return np.concatenate(starts), np.concatenate(dirs), np.concatenate(cells)


def _next_edges(starts: np.ndarray, dirs: np.ndarray, width: int) -> np.ndarray:
    """Index of the edge that follows each edge. Where two regions touch only at a corner, two edges
    leave the vertex: the right turn is taken, which keeps diagonal neighbours apart (4-connectivity,
    as scipy.ndimage.label counts regions)."""
    key = starts[:, 1] * (width + 2) + starts[:, 0]
    ends = starts + _STEP[dirs]
    end_key = ends[:, 1] * (width + 2) + ends[:, 0]
    order = np.argsort(key, kind="stable")
    lo = np.searchsorted(key[order], end_key, "left")
    hi = np.searchsorted(key[order], end_key, "right")
    first, second = order[lo], order[np.minimum(lo + 1, len(order) - 1)]
    right_turn = dirs[first] == (dirs + 1) % 4
    return np.where((hi - lo == 1) | right_turn, first, second)


def _ring_ids(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycle (ring) id and position along it of every edge, following `nxt` (one pass over the edges)."""
    ring = np.full(len(nxt), -1, np.int64)
    pos = np.zeros(len(nxt), np.int64)
    nxt_list = nxt.tolist()
    ring_list, pos_list = ring.tolist(), pos.tolist()
    r = 0
    for e0 in range(len(nxt_list)):
        if ring_list[e0] >= 0:
            continue
        e, k = e0, 0
        while ring_list[e] < 0:
            ring_list[e], pos_list[e] = r, k
            e, k = nxt_list[e], k + 1
        r += 1
    return np.asarray(ring_list, np.int64), np.asarray(pos_list, np.int64)


def region_polygons(mask: np.ndarray, cell: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Polygons (level-0 px: cell units times `cell`) of the 4-connected regions of True cells, holes
    kept, corners only; and each polygon's region label in scipy.ndimage.label(mask)."""
    comp, n = ndimage.label(mask)
    starts, dirs, cells = _boundary_edges(mask)
    if not n:
        return np.zeros(0, object), np.zeros(0, np.int64)
    nxt = _next_edges(starts, dirs, mask.shape[1])
    ring, pos = _ring_ids(nxt)
    prev = np.empty_like(nxt)
    prev[nxt] = np.arange(len(nxt))
    keep = dirs != dirs[prev]  # a vertex where the direction changes
    label = comp[cells[:, 0], cells[:, 1]]
    # The top edge of a region's first cell in raster order lies on its outer ring (nothing of the
    # region is above that row); every other ring of the region is a hole.
    values, index = np.unique(comp.ravel(), return_index=True)
    first = np.zeros(n + 1, np.int64)
    first[values] = index
    is_first = (dirs == 0) & (np.ravel_multi_index((cells[:, 0], cells[:, 1]), comp.shape) == first[label])
    outer = np.zeros(ring.max() + 1, bool)
    outer[ring[is_first]] = True
    ring_label = np.zeros(len(outer), np.int64)
    ring_label[ring] = label
    e = np.flatnonzero(keep)
    e = e[np.lexsort((pos[e], ring[e]))]  # ring by ring, in walking order
    rings_sorted, starts_idx = np.unique(ring[e], return_index=True)
    lr = shapely.linearrings(starts[e].astype(np.float64) * cell, indices=np.repeat(
        np.arange(len(rings_sorted)), np.diff(np.r_[starts_idx, len(e)])))
    order = np.lexsort((~outer[rings_sorted], ring_label[rings_sorted]))  # per region: outer ring first
    labels_sorted = ring_label[rings_sorted][order]
    polys = shapely.polygons(lr[order], indices=np.unique(labels_sorted, return_inverse=True)[1])
    return polys, np.unique(labels_sorted)


def concept_regions(hard: np.ndarray, soft: np.ndarray | None, concept: int, cell: float, width: float,
                    height: float) -> list[tuple[object, int, float | None]]:
    """(Polygon in level-0 px, cells, mean soft weight) per 4-connected region of the cells whose dominant
    concept is 0-based `concept`: its traced outer ring with its holes, clipped to the slide."""
    mask = hard == concept + 1
    polys, labels = region_polygons(mask, cell)
    if not len(polys):
        return []
    comp, n = ndimage.label(mask)
    cells = np.bincount(comp.ravel(), minlength=n + 1)
    sums = np.bincount(comp.ravel(), weights=soft[concept].astype(np.float64).ravel(), minlength=n + 1) \
        if soft is not None else None
    bad = ~shapely.is_valid(polys)  # a region whose outer ring touches itself at a corner: repaired
    polys[bad] = shapely.make_valid(polys[bad])
    bounds = shapely.box(0, 0, width, height)
    outside = ~shapely.contains(bounds, polys)
    polys[outside] = shapely.intersection(polys[outside], bounds)
    out = []
    for poly, lab in zip(polys, labels):
        for part in (shapely.get_parts(poly) if bad.any() or outside.any() else [poly]):
            if part.geom_type == "Polygon" and part.area > 0:
                out.append((part, int(cells[lab]), float(sums[lab] / cells[lab]) if sums is not None else None))
    return out


def slide_features(hard: np.ndarray, soft: np.ndarray | None, cell: float, width: float, height: float,
                   labels: list[str], mpp: float) -> list[str]:
    """GeoJSON Features (QuPath annotations) of every concept's regions on one slide, as JSON text
    (the geometry is written by GEOS directly: ~5x faster than going through Python dicts)."""
    feats = []
    for j, label in enumerate(labels):
        color = list(rgb(concept_color(j)))
        regions = concept_regions(hard, soft, j, cell, width, height)
        if not regions:
            continue
        geoms = shapely.to_geojson(np.array([p for p, _, _ in regions], dtype=object))
        for geom, (p, n_cells, mean_w) in zip(geoms, regions):
            meas = {"mean weight": mean_w, "cells": n_cells}
            if math.isfinite(mpp) and mpp > 0:
                meas["area um^2"] = float(p.area * mpp * mpp)
            props = {"objectType": "annotation", "name": label, "isLocked": False,
                     "classification": {"name": label, "color": color}, "concept": j + 1,
                     "mean_weight": mean_w, "measurements": meas}
            feats.append(f'{{"type": "Feature", "geometry": {geom}, "properties": '
                         f"{json.dumps(props, ensure_ascii=False)}}}")
    return feats


def safe_file_name(slide_id: str) -> str:
    """A file name for a slide id (ids hold no '/', but may hold characters file systems dislike)."""
    name = re.sub(r"[^\w.+-]+", "_", str(slide_id)).strip("._") or "slide"
    return name[:150]


def export_geojson(atlas_path: str | os.PathLike, out_dir: str | os.PathLike,
                   notes: notes_mod.Notes | None = None) -> list[Path]:
    """Write DIR/<slide>.geojson for every slide with a cluster map; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    with Atlas(atlas_path) as atlas:
        s = atlas.slides()
        labels = notes_mod.labels(atlas.k, notes)
        for i, sid in enumerate(s["slide_id"]):
            maps = atlas.slide_maps(i)
            if maps is None or "hard" not in maps.arrays:
                continue
            feats = slide_features(maps["hard"], maps.get("soft"), float(maps.attrs["cell_l0"]),
                                   float(s["width"][i]), float(s["height"][i]), labels, float(s["mpp"][i]))
            name = safe_file_name(sid)
            while name in used:  # two ids that map to one file name
                name += "_"
            used.add(name)
            props = {"slide_id": str(sid), "atlas": Path(atlas_path).name, "units": "level-0 pixels",
                     "width": int(s["width"][i]), "height": int(s["height"][i])}
            text = (f'{{"type": "FeatureCollection", "properties": {json.dumps(props, ensure_ascii=False)}, '
                    f'"features": [{", ".join(feats)}]}}')
            path = out_dir / f"{name}.geojson"
            with atomic_path(path) as tmp:
                tmp.write_text(text, encoding="utf-8")
            written.append(path)
    return written
