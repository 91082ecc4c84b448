"""Reading side of the activation pass: DataLoader workers that turn slides into uint8 tile batches.

Each worker takes whole slides (slide i goes to worker i mod n), keeps one open slide handle at a
time, takes the slide's tile plan (tile_plan.py: loaded, or made and kept on first use) and reads the
tiles in grid (file) order. Everything it yields is
small and picklable; failures are yielded as messages so one corrupt slide never stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .cohort import SlideRecord
from .config import RunConfig
from .images import encode_image
from .sampling import sample_rows
from .slides import open_slide
from .tile_plan import slide_plan
from .tissue import read_tile


@dataclass
class SlideJob:
    """One slide to process. `sample_tiles` > 0 reads only a seeded sample of that many tiles.
    `plan_path`: where the slide's tile plan is kept (tile_plan.py), made there when missing."""

    index: int
    record: SlideRecord
    sample_tiles: int = 0
    plan_path: Path | None = None
    plan_key: str = ""


@dataclass
class SlidePlan:
    """What a worker learnt about a slide before reading its tiles."""

    index: int
    slide_id: str
    width: int
    height: int
    mpp: float | None
    mpp_source: str
    warnings: list[str]
    coords: np.ndarray          # (N, 2) int64 level-0 x, y of the tiles that will be read
    rows: np.ndarray            # (N,) int64 row of each tile in the slide's full tissue-tile list
    n_tissue_tiles: int         # tiles in the full tissue grid (N <= this when sampling)
    tissue_frac: np.ndarray     # (N,) float32
    grid_index: np.ndarray      # (N, 2) int32 (row, col) in the full tile grid
    grid_shape: tuple[int, int]
    tile_l0: float
    stride_l0: float
    level: int
    thumbnail: np.ndarray       # (h, w, 3) uint8
    thumb_downsample: float     # level-0 px per thumbnail px
    mask: np.ndarray            # (h, w) bool tissue mask
    mask_downsample: float      # level-0 px per mask px


@dataclass
class TileBatch:
    index: int                  # slide index
    start: int                  # position of the first tile in SlidePlan.coords
    pixels: torch.Tensor        # (B, tile_px, tile_px, 3) uint8
    thumbs: list[bytes] = field(default_factory=list)  # JPEG thumbnails, one per tile

    def pin_memory(self) -> "TileBatch":
        """Page-locked pixels, called by DataLoader(pin_memory=True) on CUDA machines: the engine's
        `.to(device, non_blocking=True)` then copies them while the previous batch computes."""
        self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class SlideEnd:
    index: int


@dataclass
class SlideFailed:
    index: int
    error: str


def jpeg_bytes(rgb: np.ndarray, side: int | None = None, quality: int = 70) -> bytes:
    """Encode an (h, w, 3) uint8 image as JPEG, optionally resized to side x side."""
    return encode_image(rgb, "JPEG", quality, side=side)


class TileStream(IterableDataset):
    """Yields SlidePlan, TileBatch..., SlideEnd (or SlideFailed) for each job of this worker."""

    def __init__(self, jobs: list[SlideJob], cfg: RunConfig):
        self.jobs = jobs
        self.cfg = cfg

    def __iter__(self) -> Iterator[object]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        for job in jobs:
            yield from self._slide(job)

    def _slide(self, job: SlideJob) -> Iterator[object]:
        cfg, rec = self.cfg, job.record
        try:
            with open_slide(rec.path) as slide:
                plan = slide_plan(slide, rec, cfg, job.plan_path, job.plan_key)
                grid = plan.grid
                n_all = len(grid.coords)
                rows = sample_rows(n_all, job.sample_tiles, cfg.seed, key=rec.slide_id) if job.sample_tiles else \
                    np.arange(n_all, dtype=np.int64)
                yield SlidePlan(
                    index=job.index, slide_id=rec.slide_id, width=plan.width, height=plan.height, mpp=plan.mpp,
                    mpp_source=plan.mpp_source, warnings=plan.warnings, coords=grid.coords[rows], rows=rows,
                    n_tissue_tiles=n_all, tissue_frac=grid.tissue_frac[rows], grid_index=grid.grid_index[rows],
                    grid_shape=tuple(grid.grid_shape), tile_l0=float(grid.tile_l0),
                    stride_l0=float(grid.stride_l0), level=int(grid.level), thumbnail=plan.thumbnail,
                    thumb_downsample=plan.thumb_downsample, mask=grid.mask,
                    mask_downsample=float(grid.mask_downsample))
                for start in range(0, len(rows), cfg.batch_size):
                    chunk = rows[start:start + cfg.batch_size]
                    pixels = np.stack([read_tile(slide, grid, int(i)) for i in chunk])
                    thumbs = [] if job.sample_tiles else [jpeg_bytes(p, cfg.thumb_px) for p in pixels]
                    yield TileBatch(job.index, start, torch.from_numpy(pixels), thumbs)
            yield SlideEnd(job.index)
        except Exception as exc:  # one bad slide must not stop the cohort; the reason is recorded
            yield SlideFailed(job.index, _reason(exc))


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return text if name in ("SlideError",) else f"{name}: {text}"
