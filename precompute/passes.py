"""The two passes over the cohort, each writing one part file per slide.

calibration: a seeded sample of tissue tiles per slide, forward stopped at the hooked layer, and a
             seeded sample of raw cell vectors kept for fitting the concepts H.
full:        every tissue tile: pooled embedding, model outputs, JPEG thumbnail, per-cell NNLS
             weights against H stitched into slide maps, prototype candidates.
A part is written (atomically) when its slide is complete, so a crash costs only the slides in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .activations import Engine, stream_slides
from .cohort import SlideRecord
from .config import RunConfig
from .fidelity import cam_cluster_correlation
from .parts import part_name, save_part
from .stitching import CellCanvas, PrototypeHeap
from .tile_stream import SlideEnd, SlideFailed, SlideJob, SlidePlan, TileBatch, TileStream, TilingOptions


@dataclass
class LayerInfo:
    """Geometry of the hooked layer for one tile: C channels on an h x w cell grid."""

    channels: int
    h: int
    w: int
    tile_px: int

    @property
    def cell_px(self) -> float:
        return self.tile_px / self.h


@dataclass
class PassStats:
    ok: int = 0
    no_tissue: int = 0
    failed: int = 0
    tiles: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def tiling_options(cfg: RunConfig) -> TilingOptions:
    return TilingOptions(tile_px=cfg.tile_px, stride_px=cfg.stride_px, target_mpp=cfg.target_mpp,
                         min_tissue=cfg.min_tissue, cli_mpp=cfg.cli_mpp, native=cfg.native_resolution,
                         thumb_px=cfg.thumb_px, batch_size=cfg.batch_size, seed=cfg.seed)


def _plan_attrs(plan: SlidePlan, rec: SlideRecord, key: str, status: str) -> dict:
    return {"key": key, "status": status, "slide_id": rec.slide_id, "path": str(rec.path),
            "width": plan.width, "height": plan.height, "mpp": plan.mpp, "mpp_source": plan.mpp_source,
            "warnings": plan.warnings, "tile_l0": plan.tile_l0, "stride_l0": plan.stride_l0, "level": plan.level,
            "n_tissue_tiles": plan.n_tissue_tiles, "thumb_downsample": plan.thumb_downsample,
            "mask_downsample": plan.mask_downsample, "grid_shape": list(plan.grid_shape)}


def _save_failure(folder: Path, job: SlideJob, key: str, error: str) -> None:
    save_part(folder / part_name(job.index, job.record.slide_id), {},
              {"key": key, "status": "failed", "error": error, "slide_id": job.record.slide_id,
               "path": str(job.record.path)})


class _SlideCalibration:
    def __init__(self, plan: SlidePlan, cells_per_tile: int, n_cells: int, seed: int):
        self.plan = plan
        self.m = min(cells_per_tile, n_cells)
        self.n_cells = n_cells
        self.rng = np.random.default_rng([seed, plan.index])
        self.cells: list[np.ndarray] = []
        self.min = np.inf

    def cell_index(self, b: int) -> torch.Tensor:
        idx = np.stack([self.rng.choice(self.n_cells, self.m, replace=False) for _ in range(b)])
        return torch.from_numpy(idx.astype(np.int64))


class _SlideFull:
    def __init__(self, plan: SlidePlan, layer: LayerInfo, cfg: RunConfig, k: int):
        self.plan = plan
        self.parts: dict[str, list] = {n: [] for n in ("embedding", "outputs", "probs", "weights", "sq_resid",
                                                      "sq_norm")}
        self.thumbs: list[bytes] = []
        stride_cells = int(round(cfg.stride_px / layer.cell_px))
        cell_l0 = plan.tile_l0 / layer.h
        self.canvas = CellCanvas(plan.width, plan.height, cell_l0, k, (layer.h, layer.w), stride_cells,
                                 cfg.edge_cells)
        self.protos = PrototypeHeap(k, cfg.prototypes_per_cluster)
        self.min = np.inf
        self.cam_canvas = CellCanvas(plan.width, plan.height, cell_l0, 1, (layer.h, layer.w), stride_cells,
                                     cfg.edge_cells) if cfg.gradcam else None
        self.cam_r: list[np.ndarray] = []


def run_pass(kind: str, jobs: list[SlideJob], records_by_index: dict[int, SlideRecord], engine: Engine,
             cfg: RunConfig, layer: LayerInfo, folder: Path, key: str, *,
             on_tiles: Callable[[int], None], on_slide: Callable[[str, str, dict], None]) -> PassStats:
    """Run one pass ('calibration' or 'full') over `jobs`, writing a part per slide into `folder`.

    on_tiles(n) is called as tiles are processed; on_slide(slide_id, status, info) when a slide ends.
    """
    stats = PassStats()
    if not jobs:
        return stats
    stream = TileStream(jobs, tiling_options(cfg))
    open_slides: dict[int, object] = {}
    started: dict[int, float] = {}
    job_of = {j.index: j for j in jobs}
    k = engine.probe.H.shape[0] if engine.probe.H is not None else 0
    for msg in stream_slides(stream, cfg.workers):
        if isinstance(msg, SlidePlan):
            started[msg.index] = time.perf_counter()
            if kind == "calibration":
                open_slides[msg.index] = _SlideCalibration(msg, cfg.calib_cells_per_tile, layer.h * layer.w,
                                                           cfg.seed)
            else:
                open_slides[msg.index] = _SlideFull(msg, layer, cfg, k)
        elif isinstance(msg, TileBatch):
            acc = open_slides[msg.index]
            n = len(msg.pixels)
            if kind == "calibration":
                res = engine.run(msg.pixels, acc.cell_index(n))
                acc.cells.append(res["cells"].reshape(-1, res["cells"].shape[-1]).astype(np.float16))
            else:
                res = engine.run(msg.pixels)
                for name in acc.parts:
                    if name in res:
                        acc.parts[name].append(res[name])
                cw = res["cell_weights"]  # (B, h, w, K)
                acc.parts["weights"].append(cw.sum(axis=(1, 2)))
                acc.thumbs.extend(msg.thumbs)
                acc.canvas.paste(acc.plan.grid_index[msg.start:msg.start + n], cw)
                acc.protos.offer(msg.start, msg.pixels.numpy(), cw)
                if "gradcam" in res:
                    acc.cam_canvas.paste(acc.plan.grid_index[msg.start:msg.start + n], res["gradcam"][..., None])
                    acc.cam_r.append(cam_cluster_correlation(res["gradcam"], cw))
            acc.min = min(acc.min, float(res["min"]))
            on_tiles(n)
        elif isinstance(msg, SlideEnd):
            acc = open_slides.pop(msg.index)
            rec = records_by_index[msg.index]
            n_tiles = len(acc.plan.coords)
            status = "ok" if n_tiles else "no_tissue"
            attrs = _plan_attrs(acc.plan, rec, key, status)
            attrs["min_activation"] = None if not np.isfinite(acc.min) else acc.min
            attrs["seconds"] = time.perf_counter() - started.pop(msg.index)
            if kind == "calibration":
                arrays = {"cells": np.concatenate(acc.cells) if acc.cells else
                          np.zeros((0, layer.channels), np.float16)}
            else:
                arrays = _full_arrays(acc, layer, k)
            save_part(folder / part_name(msg.index, rec.slide_id), arrays, attrs)
            stats.tiles += n_tiles
            if status == "ok":
                stats.ok += 1
            else:
                stats.no_tissue += 1
            on_slide(rec.slide_id, status, {"tiles": n_tiles, "seconds": round(attrs["seconds"], 3),
                                            "warnings": acc.plan.warnings})
        elif isinstance(msg, SlideFailed):
            open_slides.pop(msg.index, None)
            started.pop(msg.index, None)
            rec = records_by_index[msg.index]
            _save_failure(folder, job_of[msg.index], key, msg.error)
            stats.failed += 1
            stats.failures.append((rec.slide_id, msg.error))
            on_slide(rec.slide_id, "failed", {"error": msg.error})
    return stats


def _cat(chunks: list[np.ndarray], width: int, dtype) -> np.ndarray:
    return np.concatenate(chunks).astype(dtype) if chunks else np.zeros((0, width), dtype)


def _full_arrays(acc: _SlideFull, layer: LayerInfo, k: int) -> dict:
    p = acc.parts
    plan = acc.plan
    n_out = p["outputs"][0].shape[1] if p["outputs"] else 0
    weights = _cat(p["weights"], k, np.float32)
    sq_resid = np.concatenate(p["sq_resid"]) if p["sq_resid"] else np.zeros(0)
    sq_norm = np.concatenate(p["sq_norm"]) if p["sq_norm"] else np.zeros(0)
    soft, hard = acc.canvas.finish()
    arrays = {
        "coords": plan.coords.astype(np.int64),
        "tissue_frac": plan.tissue_frac.astype(np.float32),
        "grid_index": plan.grid_index.astype(np.int32),
        "embedding": _cat(p["embedding"], layer.channels, np.float16),
        "outputs": _cat(p["outputs"], n_out, np.float32),
        "weights": weights,
        "sq_resid": sq_resid.astype(np.float64),
        "sq_norm": sq_norm.astype(np.float64),
        "thumbs": acc.thumbs,
        "thumbnail": plan.thumbnail,
        "tissue": plan.mask.astype(bool),
        "soft": soft,
        "hard": hard,
    }
    if p["probs"]:
        arrays["probs"] = _cat(p["probs"], n_out, np.float32)
    if acc.cam_canvas is not None:
        arrays["gradcam"] = acc.cam_canvas.finish()[0][0]
        arrays["gradcam_r"] = _cat(acc.cam_r, k, np.float32)
    for name, value in acc.protos.arrays().items():
        arrays[f"proto_{name}"] = value
    return arrays
