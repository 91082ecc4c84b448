"""The two passes over the cohort (CalibrationPass, FullPass), each writing one part file per slide.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .activations import Concepts, Engine, stream_slides
from .cohort import SlideRecord
from .cellmask import cell_tissue_fraction, mask_glass
from .config import RunConfig
from .correlation import cam_cluster_correlation
from .interrupt import check as check_interrupt
from .models import find_layer
from .parts import part_name, save_part
from .sampling import CELL_STREAM, generator
from .stitching import CellCanvas, PrototypeHeap
from .tile_stream import SlideEnd, SlideFailed, SlideJob, SlidePlan, TileBatch, TileStream


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
    """A slide's calibration sample in the making: m of the n cells of each sampled tile."""

    def __init__(self, plan: SlidePlan, cells_per_tile: int, n_cells: int, seed: int):
        self.plan = plan
        self.m = min(cells_per_tile, n_cells)
        self.n_cells = n_cells
        self.rng = generator(seed, plan.slide_id, CELL_STREAM)  # by the slide's id, not its place in the cohort
        self.cells: list[np.ndarray] = []
        self.min = np.inf

    def cell_index(self, b: int) -> torch.Tensor:
        idx = np.stack([self.rng.choice(self.n_cells, self.m, replace=False) for _ in range(b)])
        return torch.from_numpy(idx.astype(np.int64))


class _SlideFull:
    """A slide's full-pass result in the making: per-tile rows, stitched cell maps, prototypes."""

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


def _engine(cfg: RunConfig, module: torch.nn.Module, spec, layer_module: torch.nn.Module, device: torch.device,
            **kw) -> Engine:
    """The engine set-up both passes share (ReLU and output activation from the settings)."""
    return Engine(module, spec, layer_module, device, relu=cfg.relu, output_activation=cfg.output_activation, **kw)


@dataclass(frozen=True)
class CalibrationPass:
    """A seeded sample of tissue tiles per slide, forward stopped at the hooked layer, and a seeded sample
    of raw cell vectors per tile kept for fitting the concepts H."""

    cfg: RunConfig
    layer: LayerInfo
    name = "calibration"
    k = 0

    def engine(self, module: torch.nn.Module, spec, layer_module: torch.nn.Module, device: torch.device) -> Engine:
        return _engine(self.cfg, module, spec, layer_module, device, concepts=None,
                       calib_cells=self.cfg.calib_cells_per_tile)

    def start(self, plan: SlidePlan) -> _SlideCalibration:
        return _SlideCalibration(plan, self.cfg.calib_cells_per_tile, self.layer.h * self.layer.w, self.cfg.seed)

    def batch(self, acc: _SlideCalibration, msg: TileBatch, engine: Engine) -> dict:
        res = engine.run(msg.pixels, acc.cell_index(len(msg.pixels)))
        acc.cells.append(res["cells"].reshape(-1, res["cells"].shape[-1]).astype(np.float16))
        return res

    def arrays(self, acc: _SlideCalibration) -> dict:
        return {"cells": np.concatenate(acc.cells) if acc.cells else np.zeros((0, self.layer.channels), np.float16),
                # the sampled tiles, in the order of the cells (m consecutive cells per tile)
                "coords": np.asarray(acc.plan.coords, np.int64).reshape(-1, 2)}


@dataclass(frozen=True)
class FullPass:
    """Every tissue tile: pooled embedding, model outputs, JPEG thumbnail, per-cell NNLS weights against
    the concepts H stitched into slide maps, prototype candidates (and GradCAM, importance when asked)."""

    cfg: RunConfig
    layer: LayerInfo
    concepts: Concepts
    name = "full"

    @property
    def k(self) -> int:
        return int(self.concepts.H.shape[0])

    def engine(self, module: torch.nn.Module, spec, layer_module: torch.nn.Module, device: torch.device) -> Engine:
        cfg = self.cfg
        return _engine(cfg, module, spec, layer_module, device, concepts=self.concepts,
                       gradcam_output=cfg.explain_output if cfg.gradcam else None, gradcam_target=cfg.target,
                       importance_output=cfg.explain_output if cfg.importance else None)

    def start(self, plan: SlidePlan) -> _SlideFull:
        return _SlideFull(plan, self.layer, self.cfg, self.k)

    def batch(self, acc: _SlideFull, msg: TileBatch, engine: Engine) -> dict:
        res = engine.run(msg.pixels)
        for name in acc.parts:
            if name in res:
                acc.parts[name].append(res[name])
        cw = res["cell_weights"]  # (B, h, w, K)
        acc.parts["weights"].append(cw.sum(axis=(1, 2)))
        acc.thumbs.extend(msg.thumbs)
        where = acc.plan.grid_index[msg.start:msg.start + len(msg.pixels)]
        acc.canvas.paste(where, cw)
        acc.protos.offer(msg.start, msg.pixels.numpy(), cw)
        if "gradcam" in res:
            acc.cam_canvas.paste(where, res["gradcam"][..., None])
            acc.cam_r.append(cam_cluster_correlation(res["gradcam"], cw))
        return res

    def arrays(self, acc: _SlideFull) -> dict:
        return _full_arrays(acc, self.layer, self.k)


Pass = CalibrationPass | FullPass


@contextmanager
def pass_engine(kind: Pass, module: torch.nn.Module, spec, layer_name: str, device: torch.device):
    """The engine of one pass on `module` (hooked at `layer_name`), closed (hook removed) afterwards."""
    engine = kind.engine(module, spec, find_layer(module, layer_name), device)
    try:
        yield engine
    finally:
        engine.close()


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

    def __init__(self, kind: Pass, job: SlideJob, folder: Path, key: str):
        self.kind, self.job = kind, job
        self.path = folder / part_name(job.index, job.record.slide_id)
        self.key = key
        self.acc = None
        self.t0 = time.perf_counter()

    def plan(self, msg: SlidePlan) -> None:
        self.t0 = time.perf_counter()
        self.acc = self.kind.start(msg)

    def batch(self, msg: TileBatch, engine: Engine) -> int:
        """Run one batch of the slide's tiles through the engine. Returns the number of tiles."""
        res = self.kind.batch(self.acc, msg, engine)
        self.acc.min = min(self.acc.min, float(res["min"]))
        return len(msg.pixels)

    def end(self) -> SlideOutcome:
        """The slide's tiles are all in: write its part."""
        acc, rec = self.acc, self.job.record
        n_tiles = len(acc.plan.coords)
        status = "ok" if n_tiles else "no_tissue"
        attrs = _plan_attrs(acc.plan, rec, self.key, status)
        attrs["min_activation"] = None if not np.isfinite(acc.min) else acc.min
        attrs["seconds"] = time.perf_counter() - self.t0
        save_part(self.path, self.kind.arrays(acc), attrs)
        return SlideOutcome(rec.slide_id, status, n_tiles, {"tiles": n_tiles, "seconds": round(attrs["seconds"], 3),
                                                             "warnings": acc.plan.warnings})

    def fail(self, error: str) -> SlideOutcome:
        _save_failure(self.path.parent, self.job, self.key, error)
        return SlideOutcome(self.job.record.slide_id, "failed", 0, {"error": error})

    def take(self, msg, engine: Engine, on_tiles: Callable[[int], None]) -> SlideOutcome | None:
        """Handle one message of this slide; the outcome when the slide has ended."""
        if isinstance(msg, SlidePlan):
            self.plan(msg)
        elif isinstance(msg, TileBatch):
            on_tiles(self.batch(msg, engine))
        elif isinstance(msg, SlideEnd):
            return self.end()
        elif isinstance(msg, SlideFailed):
            return self.fail(msg.error)
        return None


def run_pass(kind: Pass, jobs: list[SlideJob], engine: Engine, folder: Path, key: str, *,
             on_tiles: Callable[[int], None], on_slide: Callable[[str, str, dict], None]) -> PassStats:
    """Run one pass over `jobs` in this process (slides read by `cfg.workers` reading processes),
    writing a part per slide into `folder`.

    on_tiles(n) is called as tiles are processed; on_slide(slide_id, status, info) when a slide ends.
    """
    stats = PassStats()
    if not jobs:
        return stats
    works = {j.index: SlideWork(kind, j, folder, key) for j in jobs}
    for msg in stream_slides(TileStream(jobs, kind.cfg), kind.cfg.workers):
        check_interrupt()
        outcome = works[msg.index].take(msg, engine, on_tiles)
        if outcome is not None:
            stats.add(outcome)
            on_slide(outcome.slide_id, outcome.status, outcome.info)
    return stats


def run_slide(kind: Pass, job: SlideJob, engine: Engine, folder: Path, key: str,
              on_tiles: Callable[[int], None] = lambda n: None) -> SlideOutcome:
    """One slide of one pass, read in this process (a background thread reads the next batch while
    the model runs), its part written into `folder`. The unit of work of a cluster task."""
    work = SlideWork(kind, job, folder, key)
    outcome = None
    for msg in prefetch(iter(TileStream([job], kind.cfg)), depth=2):
        check_interrupt()
        outcome = work.take(msg, engine, on_tiles) or outcome
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
