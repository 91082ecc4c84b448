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

from .activations import Concepts
from .clustering import sample_rows
from .concepts import pool_cells
from .config import RunConfig
from .fidelity import k_grid, output_regression, summarise_cam_correlation
from .nmf import TorchNMF
from .store import AtlasWriter
from .targets import default_target, target_values

MIN_TILES = 3  # fewer tiles than this cannot support even an in-sample regression on K weights
K_GRID_MAX_CELLS = 20_000  # cells used per K: enough to rank K values, cheap enough to fit several
K_GRID_MAX_TILES = 50_000  # tiles whose regression R^2 is compared across K (a seeded sample)


def tile_groups(w: AtlasWriter) -> tuple[np.ndarray, str]:
    """Per-tile group labels for cross-validation: patients when every slide has one, else slides."""
    slide = w.tile_column("slide")
    patients = w.slide_column("patient")
    if patients and all(patients):
        return np.asarray(patients, dtype=object)[slide], "patient"
    return slide.astype(np.int64), "slide"


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
    reg = output_regression(weights, y, groups, seed=cfg.seed)
    arrays = {"coef": np.asarray(reg["coef"], np.float64), "intercept": np.atleast_1d(reg["intercept"]),
              "r2": np.atleast_1d(reg["r2"]), "r2_cv": np.atleast_1d(reg["r2_cv"])}
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
    say(f"fidelity: {target} of output {escape(repr(output_name))} ~ concept weights: R^2 {reg['r2']:.3f} in sample, "
        f"{reg['r2_cv']:.3f} cross-validated by {group_kind}")

    if calib_parts and cfg.k_grid:
        cells, _ = pool_cells(calib_parts, K_GRID_MAX_CELLS, cfg.seed)
        if concepts.shift is not None:
            cells = np.maximum((cells - concepts.shift) / concepts.scale, 0)
        ks = tuple(k for k in cfg.k_grid if k < min(cells.shape) and k <= len(y))
        if ks:
            say(f"fidelity: K grid {list(ks)} on {len(cells)} calibration cells")

            def nmf_fit(V, k, seed):
                return TorchNMF(n_components=k, seed=seed, max_iter=cfg.nmf_max_iter).fit(V).components_

            rows = sample_rows(len(y), K_GRID_MAX_TILES, cfg.seed)
            grid = k_grid(cells, w.tile_column_reader("embedding")[rows].astype(np.float32), y[rows], groups[rows], ks,
                          seed=cfg.seed, nmf_fit=nmf_fit)
            w.put_group("fidelity/k_grid", {k: np.asarray(v) for k, v in grid.items()})

