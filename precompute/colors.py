"""One fixed palette: concept k has the same colour on every chart, overlay, legend and export
(the dashboard, the HTML meeting report and the GeoJSON export all take their colours from here).

Concepts (NMF clusters, 0-based k) use CONCEPT[k % 20]; k-means clusters reuse it by index.
Diagnoses use a separate palette in sorted-name order. Continuous values use a viridis ramp.
"""

from __future__ import annotations

import numpy as np

CONCEPT = [  # Tableau 10, then their light partners (distinct from the diagnosis palette below)
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5",
    "#dbdb8d", "#c7c7c7",
]
DIAGNOSIS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
NO_TISSUE = (0, 0, 0, 0)  # transparent
_VIRIDIS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]


def concept_color(k: int) -> str:
    return CONCEPT[int(k) % len(CONCEPT)]


def concept_colors(k: int) -> list[str]:
    return [concept_color(i) for i in range(k)]


def diagnosis_colors(names: list[str]) -> list[str]:
    return [DIAGNOSIS[i % len(DIAGNOSIS)] for i in range(len(names))]


def rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def concept_lut(k: int) -> np.ndarray:
    """(k+1, 4) uint8 RGBA lookup for hard maps: row 0 = no tissue (transparent), row j+1 = concept j."""
    lut = np.zeros((k + 1, 4), np.uint8)
    lut[0] = NO_TISSUE
    for j in range(k):
        lut[j + 1] = (*rgb(concept_color(j)), 255)
    return lut


def viridis(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape; NaN -> 0) -> RGB uint8 of shape values.shape + (3,)."""
    anchors = np.array([rgb(c) for c in _VIRIDIS], np.float32)
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0, 1) * (len(anchors) - 1)
    i = np.minimum(v.astype(np.int32), len(anchors) - 2)
    f = (v - i)[..., None]
    return (anchors[i] * (1 - f) + anchors[i + 1] * f).round().astype(np.uint8)


VIRIDIS_HEX = _VIRIDIS
