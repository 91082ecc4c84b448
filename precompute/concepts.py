"""The concepts H: fitted by NMF on the pooled calibration cells, or reused from an earlier atlas.

No torch at import: assembly and the fidelity stage need only the `Concepts` record; the torch NMF is
imported when concepts are fitted."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .parts import load_part, save_part
from .sampling import sample_rows
from .store import Atlas, AtlasFormatError

CONCEPTS_FILE = "concepts.h5"


@dataclass
class Concepts:
    """NMF concepts the full pass assigns cells to. H: (K, C) float32; optional shift/scale (C,) make
    activations of layers with negative values non-negative: max((a - shift) / scale, 0)."""

    H: np.ndarray
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None


def concepts_sha(c: Concepts) -> str:
    """Fingerprint of the concepts; part files of the full pass are keyed by it."""
    h = hashlib.sha256(np.ascontiguousarray(c.H, dtype=np.float32).tobytes())
    for extra in (c.shift, c.scale):
        if extra is not None:
            h.update(np.ascontiguousarray(extra, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


CALIB_MIN_CELLS = 8  # cells per calibration tile never fewer than this (the sample of the first releases)


def auto_cells_per_tile(cells_in_tile: int, n_slides: int, tiles_per_slide: int, max_cells: int) -> int:
    """Calibration cells kept per tile when --calib-cells is not given: all of the tile's cells while the
    whole calibration sample (n_slides x tiles_per_slide tiles, an upper bound) fits under max_cells,
    else as many as fit, at least CALIB_MIN_CELLS. A fixed 8 cells per tile starves small cohorts: 32
    one-tile slides gave NMF 256 cells, where all 1,568 fit easily."""
    budget = max_cells // max(1, n_slides * tiles_per_slide)
    return int(min(cells_in_tile, max(CALIB_MIN_CELLS, budget)))


def pool_cells(part_paths: list[Path], max_cells: int, seed: int) -> tuple[np.ndarray, float]:
    """Concatenate the calibration cells of all slides and keep a seeded sample of at most max_cells.

    Returns (V (n, C) float32, minimum value seen)."""
    chunks = []
    for path in part_paths:
        arrays, _ = load_part(path)
        if len(arrays.get("cells", ())):
            chunks.append(arrays["cells"])
    if not chunks:
        return np.zeros((0, 0), np.float32), 0.0
    V = np.concatenate(chunks)
    if len(V) > max_cells:
        V = V[sample_rows(len(V), max_cells, seed)]
    V = V.astype(np.float32)
    return V, float(V.min())


class TooFewCells(ValueError):
    """The calibration sample has fewer cells than K: the calibration parts are fine and are kept."""


def fit_concepts(V: np.ndarray, k: int, seed: int, max_iter: int, device: str | None) -> tuple[Concepts, dict]:
    """NMF on the pooled cells V (n, C). Layers with negative values are first shifted by a low
    percentile, scaled by the IQR and clamped at 0 (per channel), and the same transform is kept
    for the full pass. Returns the concepts and fit facts for the atlas."""
    from .nmf import TorchNMF, make_nonnegative  # torch: only a run that fits concepts loads it

    shift = scale = None
    negative = bool((V < 0).any())
    if negative:
        V, stats = make_nonnegative(V)
        shift, scale = np.asarray(stats["shift"], np.float32), np.asarray(stats["scale"], np.float32)
    if k > min(V.shape):
        raise TooFewCells(f"K = {k} clusters but the calibration sample has only {V.shape[0]} cells of "
                          f"{V.shape[1]} channels; lower --k, or sample more (--calib-tiles, --calib-cells). The "
                          f"calibration is kept: the same command with more samples only reads what is new.")
    model = TorchNMF(n_components=k, seed=seed, max_iter=max_iter, device=device).fit(V)
    facts = {"calibration_cells": int(V.shape[0]), "nmf_relative_error": float(model.reconstruction_err_),
             "nmf_iterations": int(model.n_iter_), "negative_activations": negative}
    return Concepts(np.asarray(model.components_, np.float32), shift, scale), facts


def save_concepts(path: Path, c: Concepts, key: str, facts: dict) -> None:
    arrays = {"H": c.H}
    if c.shift is not None:
        arrays.update(shift=c.shift, scale=c.scale)
    save_part(path, arrays, {"key": key, "status": "ok", **facts})


def load_concepts(path: Path) -> tuple[Concepts, dict]:
    arrays, attrs = load_part(path)
    return Concepts(arrays["H"], arrays.get("shift"), arrays.get("scale")), attrs


def concepts_from_atlas(path: Path, channels: int) -> Concepts:
    """H (and the non-negativity transform) of an earlier atlas, checked against the hooked layer."""
    try:
        with Atlas(path) as atlas:
            g = atlas.group("clusters")
    except AtlasFormatError as exc:
        raise ValueError(f"--concepts: {exc}") from exc
    if "H" not in g:
        raise ValueError(f"--concepts {path}: the atlas holds no concepts (clusters/H).")
    H = np.asarray(g["H"], np.float32)
    if H.shape[1] != channels:
        raise ValueError(f"--concepts {path}: its H has {H.shape[1]} channels but the chosen layer gives "
                         f"{channels}. Use the same model and layer as the run that made it.")
    return Concepts(H, g.get("shift"), g.get("scale"))
