"""The two passes over the cohort, each writing one part file per slide.

calibration: a seeded sample of tissue tiles per slide, forward stopped at the hooked layer, and a
             seeded sample of raw cell vectors kept for fitting the concepts H.
full:        every tissue tile: pooled embedding, model outputs, JPEG thumbnail, per-cell NNLS
             weights against H stitched into slide maps, prototype candidates.
A part is written (atomically) when its slide is complete, so a crash costs only the slides in flight.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .activations import Engine, stream_slides
from .cohort import SlideRecord
from .cellmask import cell_tissue_fraction, mask_glass
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

    def add(self, outcome: "SlideOutcome") -> None:
        self.tiles += outcome.tiles
        if outcome.status == "ok":
            self.ok += 1
        elif outcome.status == "no_tissue":
            self.no_tissue += 1
        else:
            self.failed += 1
            self.failures.append((outcome.slide_id, outcome.info.get("error", "")))


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
                                                      "sq_norm", "importance", "deletion")}
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


@dataclass
class SlideOutcome:
    """What became of one slide in one pass (its part file is written by then)."""

    slide_id: str
    status: str                 # "ok", "no_tissue" or "failed"
    tiles: int = 0
    info: dict = field(default_factory=dict)  # tiles, seconds, warnings; or error


class SlideWork:
    """One slide of one pass: takes the slide's messages in order and writes its part file.

    The single place where a slide's tiles become a part; the local pass (`run_pass`, slides
    interleaved over reading processes) and the per-slide task (`run_slide`, one task per slide on a
    cluster) both drive it, so a part is the same whichever way it was made.
    """

    def __init__(self, kind: str, job: SlideJob, cfg: RunConfig, layer: LayerInfo, folder: Path, key: str,
                 k: int):
        self.kind, self.job, self.cfg, self.layer = kind, job, cfg, layer
        self.path = folder / part_name(job.index, job.record.slide_id)
        self.key, self.k = key, k
        self.acc = None
        self.t0 = time.perf_counter()

    def plan(self, msg: SlidePlan) -> None:
        self.t0 = time.perf_counter()
        if self.kind == "calibration":
            self.acc = _SlideCalibration(msg, self.cfg.calib_cells_per_tile, self.layer.h * self.layer.w,
                                         self.cfg.seed)
        else:
            self.acc = _SlideFull(msg, self.layer, self.cfg, self.k)

    def batch(self, msg: TileBatch, engine: Engine) -> int:
        """Run one batch of the slide's tiles through the engine. Returns the number of tiles."""
        acc = self.acc
        n = len(msg.pixels)
        if self.kind == "calibration":
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
        return n

    def end(self) -> SlideOutcome:
        """The slide's tiles are all in: write its part."""
        acc, rec = self.acc, self.job.record
        n_tiles = len(acc.plan.coords)
        status = "ok" if n_tiles else "no_tissue"
        attrs = _plan_attrs(acc.plan, rec, self.key, status)
        attrs["min_activation"] = None if not np.isfinite(acc.min) else acc.min
        attrs["seconds"] = time.perf_counter() - self.t0
        if self.kind == "calibration":
            arrays = {"cells": np.concatenate(acc.cells) if acc.cells else
                      np.zeros((0, self.layer.channels), np.float16),
                      # the sampled tiles, in the order of the cells (m consecutive cells per tile)
                      "coords": np.asarray(acc.plan.coords, np.int64).reshape(-1, 2)}
        else:
            arrays = _full_arrays(acc, self.layer, self.k)
        save_part(self.path, arrays, attrs)
        return SlideOutcome(rec.slide_id, status, n_tiles, {"tiles": n_tiles, "seconds": round(attrs["seconds"], 3),
                                                             "warnings": acc.plan.warnings})

    def fail(self, error: str) -> SlideOutcome:
        _save_failure(self.path.parent, self.job, self.key, error)
        return SlideOutcome(self.job.record.slide_id, "failed", 0, {"error": error})


def make_engine(kind: str, module: torch.nn.Module, spec, layer_module: torch.nn.Module, device: torch.device,
                cfg: RunConfig, concepts=None) -> Engine:
    """The engine of one pass: calibration samples raw cells and stops at the layer; the full pass
    assigns cells to `concepts` and runs the whole model (and GradCAM when asked for)."""
    if kind == "calibration":
        return Engine(module, spec, layer_module, device, relu=cfg.relu, concepts=None,
                      calib_cells=cfg.calib_cells_per_tile, output_activation=cfg.output_activation)
    return Engine(module, spec, layer_module, device, relu=cfg.relu, concepts=concepts,
                  output_activation=cfg.output_activation,
                  gradcam_output=cfg.explain_output if cfg.gradcam else None, gradcam_target=cfg.target,
                  importance_output=cfg.explain_output if cfg.importance else None)


def _concepts_k(engine: Engine) -> int:
    return engine.probe.H.shape[0] if engine.probe.H is not None else 0


def run_pass(kind: str, jobs: list[SlideJob], records_by_index: dict[int, SlideRecord], engine: Engine,
             cfg: RunConfig, layer: LayerInfo, folder: Path, key: str, *,
             on_tiles: Callable[[int], None], on_slide: Callable[[str, str, dict], None]) -> PassStats:
    """Run one pass ('calibration' or 'full') over `jobs` in this process (slides read by `cfg.workers`
    reading processes), writing a part per slide into `folder`.

    on_tiles(n) is called as tiles are processed; on_slide(slide_id, status, info) when a slide ends.
    """
    stats = PassStats()
    if not jobs:
        return stats
    stream = TileStream(jobs, tiling_options(cfg))
    k = _concepts_k(engine)
    works = {j.index: SlideWork(kind, j, cfg, layer, folder, key, k) for j in jobs}
    for msg in stream_slides(stream, cfg.workers):
        work = works[msg.index]
        if isinstance(msg, SlidePlan):
            work.plan(msg)
        elif isinstance(msg, TileBatch):
            on_tiles(work.batch(msg, engine))
        elif isinstance(msg, (SlideEnd, SlideFailed)):
            outcome = work.end() if isinstance(msg, SlideEnd) else work.fail(msg.error)
            stats.add(outcome)
            on_slide(outcome.slide_id, outcome.status, outcome.info)
    return stats


def run_slide(kind: str, job: SlideJob, engine: Engine, cfg: RunConfig, layer: LayerInfo, folder: Path,
              key: str, on_tiles: Callable[[int], None] = lambda n: None) -> SlideOutcome:
    """One slide of one pass, read in this process (a background thread reads the next batch while
    the model runs), its part written into `folder`. The unit of work of a cluster task."""
    work = SlideWork(kind, job, cfg, layer, folder, key, _concepts_k(engine))
    outcome = None
    for msg in prefetch(iter(TileStream([job], tiling_options(cfg))), depth=2):
        if isinstance(msg, SlidePlan):
            work.plan(msg)
        elif isinstance(msg, TileBatch):
            on_tiles(work.batch(msg, engine))
        elif isinstance(msg, SlideEnd):
            outcome = work.end()
        elif isinstance(msg, SlideFailed):
            outcome = work.fail(msg.error)
    assert outcome is not None
    return outcome


_DONE = object()


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` produced by a background thread, at most `depth` ahead (slide reading releases
    the GIL, so reading overlaps the model). Stops the thread when the consumer stops early."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="lumen-slide-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


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
    cell_tissue = cell_tissue_fraction(plan.mask, plan.mask_downsample, acc.canvas.cell_l0, hard.shape)
    soft, hard, concept_cells = mask_glass(soft, hard, cell_tissue, k)  # no concept on glass (cellmask.py)
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
        "cell_tissue": cell_tissue.astype(np.float16),
        "concept_cells": concept_cells,
    }
    if p["probs"]:
        arrays["probs"] = _cat(p["probs"], n_out, np.float32)
    if p["importance"]:  # --importance (intervention.py)
        arrays["importance"] = _cat(p["importance"], k, np.float32)
        arrays["deletion"] = _cat(p["deletion"], k + 1, np.float32)
    if acc.cam_canvas is not None:
        arrays["gradcam"] = acc.cam_canvas.finish()[0][0]
        arrays["gradcam_r"] = _cat(acc.cam_r, k, np.float32)
    for name, value in acc.protos.arrays().items():
        arrays[f"proto_{name}"] = value
    return arrays
