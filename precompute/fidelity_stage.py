"""Fidelity statistics of a run, written into the atlas group `fidelity` (see docs/atlas-format.md).

How much of the explained model output the concepts account for (linear regression of the output on
per-tile summed concept weights, cross-validated with slides or patients kept together), how each
concept's weight map correlates with GradCAM (when computed), and the K grid on the calibration sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from rich.markup import escape

from .concepts import Concepts
from .agreement import SlideCells, cohort_agreement, importance_summary, min_cam_cells, tile_blocks
from .sampling import sample_rows
from .parts import load_part
from .config import RunConfig
from .correlation import summarise_cam_correlation
from .fidelity import k_grid_cells
from .regression import regress
from .regression import tile_groups as group_codes
from .nmf import TorchNMF
from .store import AtlasWriter
from .targets import default_target, target_values

MIN_TILES = 3  # fewer tiles than this cannot support even an in-sample regression on K weights
K_GRID_MAX_CELLS = 20_000  # cells used per K: enough to rank K values, cheap enough to fit several
K_GRID_MAX_TILE_CELLS = 100_000  # cells of whole calibration tiles whose features are compared across K


def tile_groups(w: AtlasWriter) -> tuple[np.ndarray, str]:
    """Per-tile group labels for cross-validation: patients when every slide has one, else slides."""
    return group_codes(w.tile_column("slide"), w.slide_column("patient"))


def write_fidelity(w: AtlasWriter, cfg: RunConfig, concepts: Concepts, calib_parts: list[Path],
                   output_index: int, output_name: str, say: Callable[[str], None]) -> None:
    """Add the fidelity group; skipped with a note when the atlas is too small for a regression."""
    if w.n_tiles < MIN_TILES:
        say(f"note: fidelity statistics skipped: {w.n_tiles} tiles (a regression needs at least {MIN_TILES}); "
            "`python -m precompute report` says the same")
        return
    weights = w.tile_column("weights").astype(np.float64)
    outputs = w.tile_column("outputs")
    target = cfg.target or default_target(cfg.output_activation, outputs.shape[1])
    y = target_values(outputs, output_index, target, cfg.output_activation)
    groups, group_kind = tile_groups(w)
    reg, rep = regress(weights, y, groups, seed=cfg.seed)
    arrays = {"coef": np.asarray(reg["coef"], np.float64), "intercept": np.atleast_1d(reg["intercept"]),
              "r2": np.atleast_1d(reg["r2"]), "r2_cv": np.atleast_1d(reg["r2_cv"]),
              **{key: np.atleast_1d(rep[key]) for key in ("r2_cv_repeats", "r2_cv_median", "r2_cv_p5", "r2_cv_p95")}}
    attrs = {"output_index": output_index, "output_name": output_name, "target": target,
             "threshold": cfg.positive_threshold,
             "groups": group_kind, "n_folds": int(reg.get("n_folds", 0)), "n_groups": int(reg.get("n_groups", 0)),
             "cv_note": reg.get("note", ""), "has_gradcam": bool(cfg.gradcam)}
    if cfg.gradcam:
        r = w.tile_column("gradcam_r")
        try:
            p = w.tile_column("probs")[:, output_index]
        except KeyError:
            p = 1 / (1 + np.exp(-outputs[:, output_index].astype(np.float64)))
        positive = p >= cfg.positive_threshold
        cam = summarise_cam_correlation(r, positive)
        arrays.update({f"cam_{k}": np.asarray(v) for k, v in cam.items()})
    w.put_group("fidelity", arrays, attrs=attrs)
    if cfg.gradcam:
        write_agreement(w, positive, cfg.seed, say)
    if cfg.importance:
        write_importance(w, cfg.seed, say)
    say(f"fidelity: {target} of output {escape(repr(output_name))} ~ concept weights: R^2 {reg['r2']:.3f} in "
        f"sample; cross-validated by {group_kind} {rep['r2_cv_median']:.3f} (median of {rep['n_repeats']} shuffles; "
        f"5-95 % {rep['r2_cv_p5']:.3f} to {rep['r2_cv_p95']:.3f})")

    if calib_parts and cfg.k_grid:
        write_k_grid(w, cfg, concepts, calib_parts, y, groups, say)


def calibration_tile_cells(w: AtlasWriter, parts: list[Path], max_cells: int, seed: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The calibration cells of a seeded sample of whole calibration tiles (at most max_cells cells).

    Returns cells (n, C) float32 as stored (before the non-negativity transform), tile (n,) index into
    rows, and rows (T,) the atlas tile row of each sampled tile. Parts written without tile coordinates
    (older runs) contribute nothing."""
    slide_of = {sid: i for i, sid in enumerate(w.slide_column("slide_id"))}
    key = {(int(s), int(x), int(y)): r for r, (s, x, y) in
           enumerate(zip(w.tile_column("slide"), w.tile_column("x"), w.tile_column("y")))}
    tiles = []  # (part, position in the part, atlas row, cells per tile)
    for path in parts:
        arrays, attrs = load_part(path)
        coords = arrays.get("coords")
        n_cells = len(arrays.get("cells", ()))
        if coords is None or not len(coords) or n_cells % len(coords):
            continue
        s = slide_of.get(attrs.get("slide_id"))
        for j, (x, y) in enumerate(np.asarray(coords).reshape(-1, 2)):
            if (s, int(x), int(y)) in key:
                tiles.append((path, j, key[(s, int(x), int(y))], n_cells // len(coords)))
    if not tiles:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    per = tiles[0][3]
    keep = sorted(sample_rows(len(tiles), max(1, max_cells // max(per, 1)), seed))
    chosen = [tiles[i] for i in keep]
    cells, tile = [], []
    for path in dict.fromkeys(t[0] for t in chosen):
        stored = load_part(path)[0]["cells"]
        for t_index, (p, j, _, m) in enumerate(chosen):
            if p == path:
                cells.append(np.asarray(stored[j * m:(j + 1) * m], np.float32))
                tile.append(np.full(m, t_index))
    return np.concatenate(cells), np.concatenate(tile), np.asarray([t[2] for t in chosen], np.int64)


def write_k_grid(w: AtlasWriter, cfg: RunConfig, concepts: Concepts, calib_parts: list[Path], y: np.ndarray,
                 groups: np.ndarray, say: Callable[[str], None]) -> None:
    """K grid (NMF vs k-means with cells-per-cluster features) on whole calibration tiles -> fidelity/k_grid."""
    cells, tile, rows = calibration_tile_cells(w, calib_parts, K_GRID_MAX_TILE_CELLS, cfg.seed)
    if not len(cells):
        say("note: K grid skipped: the calibration parts carry no tile positions (re-run to recompute them)")
        return
    if concepts.shift is not None:
        cells = np.maximum((cells - concepts.shift) / concepts.scale, 0)
    ks = tuple(k for k in cfg.k_grid if k < min(cells.shape) and k <= len(rows))
    if not ks:
        return
    say(f"fidelity: K grid {list(ks)} on {len(cells)} calibration cells of {len(rows)} tiles")

    def nmf_fit(V, k, seed):
        return TorchNMF(n_components=k, seed=seed, max_iter=cfg.nmf_max_iter).fit(V).components_

    grid = k_grid_cells(cells, tile, y[rows], groups[rows], ks, seed=cfg.seed, max_fit_cells=K_GRID_MAX_CELLS,
                        nmf_fit=nmf_fit)
    w.put_group("fidelity/k_grid", {k: np.asarray(v) for k, v in grid.items()},
                attrs={"n_cells": int(len(cells)), "n_tiles": int(len(rows)), "features": "cells per cluster"})


def agreement_cells(w: AtlasWriter, positive: np.ndarray) -> tuple[list[SlideCells], int]:
    """Per slide with maps: its GradCAM, soft and tissue cells and its tiles' cell blocks. Returns the
    slides and the cells per tile side (h), from the stored maps and tile table."""
    slide = w.tile_column("slide")
    x, y = w.tile_column("x"), w.tile_column("y")
    tile_l0, cell_l0 = w.slide_column("tile_l0"), w.slide_column("cell_l0")
    out, side = [], 1
    for i in range(len(tile_l0)):
        cam = w.slide_map(i, "gradcam")
        rows = np.flatnonzero(slide == i)
        if cam is None or not len(rows):
            continue
        blocks = tile_blocks(x[rows], y[rows], float(tile_l0[i]), float(cell_l0[i]))
        side = int(blocks[0, 2])
        out.append(SlideCells(cam=cam, soft=w.slide_map(i, "soft"), tissue=w.slide_map(i, "hard") > 0,
                              blocks=blocks, positive=positive[rows]))
    return out, side


def write_agreement(w: AtlasWriter, positive: np.ndarray, seed: int, say: Callable[[str], None]) -> None:
    """Pooled and per-tile GradCAM agreement with bootstrap intervals -> group fidelity/agreement."""
    slides, side = agreement_cells(w, positive)
    if not slides:
        return
    res = cohort_agreement(slides, min_cells=min_cam_cells(side, side), seed=seed)
    arrays = {k: np.asarray(v) for k, v in res.items() if isinstance(v, np.ndarray)}
    attrs = {k: v for k, v in res.items() if not isinstance(v, np.ndarray)}
    w.put_group("fidelity/agreement", arrays, attrs=attrs)
    say(f"fidelity: GradCAM agreement pooled over {attrs['n_cells']} cells; per-tile r on {attrs['n_tiles_used']} "
        f"of {attrs['n_tiles']} tiles (CAM non-zero on >= {attrs['min_cam_cells']} cells)")


def write_importance(w: AtlasWriter, seed: int, say: Callable[[str], None]) -> None:
    """Concept importance by removal (intervention.py) summarised -> group fidelity/importance."""
    slide = w.tile_column("slide")
    diagnosis = np.asarray([str(d) for d in w.slide_column("diagnosis")], dtype=object)[slide]
    arrays, attrs = importance_summary(w.tile_column("importance"), w.tile_column("deletion"), slide, diagnosis,
                                       seed=seed)
    w.put_group("fidelity/importance", arrays, attrs=attrs)
    top = int(arrays["order"][0])
    say(f"fidelity: removing concept {top + 1} lowers the target most, by {arrays['mean'][top]:+.3f} on average")
