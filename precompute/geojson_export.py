"""Concept regions of each slide as GeoJSON for QuPath (`python -m precompute export ATLAS --geojson DIR`).

Per slide one FeatureCollection in level-0 pixel coordinates (origin top left, y down: QuPath's own
convention), written to DIR/<slide_id>.geojson. The hard map's cells of one concept are merged
into polygons (4-connected cells make one polygon, holes kept); each polygon is a QuPath annotation
whose `classification` is the concept's name (from the notes file, else C1..CK) and colour (the
dashboard's palette, as [r, g, b]), with measurements: the mean soft weight of the concept over the
polygon's cells, the number of cells and the area in um^2 (when the slide's pixel size is known).
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

from dashboard.colors import concept_color, rgb

from . import notes as notes_mod
from .atomic import atomic_path
from .store import Atlas


def run_boxes(mask: np.ndarray, cell: float, width: float, height: float) -> np.ndarray:
    """One shapely box per horizontal run of True cells in `mask` (rows, cols), in level-0 px,
    clipped to [0, width] x [0, height]. Returns an array of Polygons (possibly empty)."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    r0, c0 = np.nonzero(d == 1)   # run starts (row-major, so starts and ends pair up in order)
    _, c1 = np.nonzero(d == -1)   # run ends (exclusive)
    x0 = np.minimum(c0 * cell, width)
    x1 = np.minimum(c1 * cell, width)
    y0 = np.minimum(r0 * cell, height)
    y1 = np.minimum((r0 + 1) * cell, height)
    keep = (x1 > x0) & (y1 > y0)
    return shapely.box(x0[keep], y0[keep], x1[keep], y1[keep])


def concept_polygons(hard: np.ndarray, concept: int, cell: float, width: float, height: float) -> list:
    """Polygons (level-0 px) of the cells whose dominant concept is 0-based `concept`."""
    boxes = run_boxes(hard == concept + 1, cell, width, height)
    if not len(boxes):
        return []
    merged = shapely.union_all(boxes, grid_size=None)
    if not merged.is_valid:  # union output is valid in practice; repair rather than export a broken shape
        merged = shapely.make_valid(merged)
    return [g for g in shapely.get_parts(merged) if g.geom_type == "Polygon" and g.area > 0]


def _measure(polys: list, hard: np.ndarray, soft: np.ndarray | None, concept: int, cell: float) -> list[dict]:
    """Per polygon: cells and mean soft weight of the concept, via its 4-connected component of cells."""
    comp, _ = ndimage.label(hard == concept + 1)
    n = int(comp.max()) + 1
    cells = np.bincount(comp.ravel(), minlength=n)
    sums = np.bincount(comp.ravel(), weights=soft[concept].astype(np.float64).ravel(), minlength=n) \
        if soft is not None else None
    out = []
    for p in polys:
        pt = p.representative_point()  # strictly inside, so inside one cell of this component
        r = min(int(pt.y // cell), hard.shape[0] - 1)
        c = min(int(pt.x // cell), hard.shape[1] - 1)
        lab = int(comp[r, c])
        out.append({"cells": int(cells[lab]), "mean_weight": float(sums[lab] / cells[lab]) if sums is not None and
                    cells[lab] else None})
    return out


def _geometry(poly) -> dict:
    return json.loads(shapely.to_geojson(poly))


def slide_features(hard: np.ndarray, soft: np.ndarray | None, cell: float, width: float, height: float,
                   labels: list[str], mpp: float) -> list[dict]:
    """GeoJSON Features (QuPath annotations) of every concept's regions on one slide."""
    feats = []
    for j, label in enumerate(labels):
        polys = concept_polygons(hard, j, cell, width, height)
        if not polys:
            continue
        color = list(rgb(concept_color(j)))
        for p, m in zip(polys, _measure(polys, hard, soft, j, cell)):
            meas = {"mean weight": m["mean_weight"], "cells": m["cells"]}
            if math.isfinite(mpp) and mpp > 0:
                meas["area um^2"] = float(p.area * mpp * mpp)
            feats.append({"type": "Feature", "geometry": _geometry(p), "properties": {
                "objectType": "annotation", "name": label, "isLocked": False,
                "classification": {"name": label, "color": color}, "concept": j + 1,
                "mean_weight": m["mean_weight"], "measurements": meas}})
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
            fc = {"type": "FeatureCollection", "features": feats,
                  "properties": {"slide_id": str(sid), "atlas": Path(atlas_path).name,
                                 "units": "level-0 pixels", "width": int(s["width"][i]),
                                 "height": int(s["height"][i])}}
            path = out_dir / f"{name}.geojson"
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(fc, ensure_ascii=False), encoding="utf-8")
            written.append(path)
    return written
