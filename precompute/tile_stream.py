"""Reading side of the activation pass: DataLoader workers that turn slides into uint8 tile batches.

Each worker takes whole slides (slide i goes to worker i mod n), keeps one open slide handle at a
time, plans the tissue tiles itself and reads them in grid (file) order. Everything it yields is
small and picklable; failures are yielded as messages so one corrupt slide never stops the run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .cohort import SlideRecord
from .slides import open_slide, resolve_pixel_size
from .tissue import plan_tiles, read_tile

SLIDE_THUMB_PX = 1024  # longest side of the stored slide thumbnail
MASK_MAX_PX = 2048     # longest side of the image the tissue mask is computed on


@dataclass
class SlideJob:
    """One slide to process. `sample_tiles` > 0 reads only a seeded sample of that many tiles."""

    index: int
    record: SlideRecord
    sample_tiles: int = 0


@dataclass
class TilingOptions:
    tile_px: int
    stride_px: int
    target_mpp: float
    min_tissue: float
    cli_mpp: float | None
    native: bool
    thumb_px: int
    batch_size: int
    seed: int


@dataclass
class SlidePlan:
    """What a worker learnt about a slide before reading its tiles."""

    index: int
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


@dataclass
class SlideEnd:
    index: int


@dataclass
class SlideFailed:
    index: int
    error: str


def sample_rows(n: int, k: int, seed: int, slide_id: str) -> np.ndarray:
    """Seeded, slide-specific sorted sample of k of n rows (all rows when k >= n)."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, int.from_bytes(slide_id.encode()[:16].ljust(16, b"\0"), "little") % (2**63)])
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def _shrink(rgb: np.ndarray, max_px: int) -> np.ndarray:
    """(h, w, 3) uint8 scaled down so its longest side is at most max_px."""
    h, w = rgb.shape[:2]
    f = max_px / max(h, w)
    if f >= 1:
        return rgb
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def jpeg_bytes(rgb: np.ndarray, side: int | None = None, quality: int = 70) -> bytes:
    """Encode an (h, w, 3) uint8 image as JPEG, optionally resized to side x side."""
    img = Image.fromarray(rgb)
    if side is not None and img.size != (side, side):
        img = img.resize((side, side), Image.Resampling.BOX)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class TileStream(IterableDataset):
    """Yields SlidePlan, TileBatch..., SlideEnd (or SlideFailed) for each job of this worker."""

    def __init__(self, jobs: list[SlideJob], opts: TilingOptions):
        self.jobs = jobs
        self.opts = opts

    def __iter__(self) -> Iterator[object]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        for job in jobs:
            yield from self._slide(job)

    def _slide(self, job: SlideJob) -> Iterator[object]:
        o = self.opts
        rec = job.record
        try:
            with open_slide(rec.path) as slide:
                px, warnings = resolve_pixel_size(rec.slide_id, slide.file_mpp, rec.mpp, o.cli_mpp, native=o.native)
                overview = slide.thumbnail(MASK_MAX_PX)  # read once: tissue mask and stored thumbnail
                grid = plan_tiles(slide, px.mpp, target_mpp=o.target_mpp, tile_px=o.tile_px,
                                  stride_px=o.stride_px, min_tissue=o.min_tissue, thumbnail=overview)
                n_all = len(grid.coords)
                if n_all == 0:
                    warnings = [*warnings, _no_tile_reason(slide, px.mpp, o, overview, grid.mask)]
                rows = sample_rows(n_all, job.sample_tiles, o.seed, rec.slide_id) if job.sample_tiles else \
                    np.arange(n_all, dtype=np.int64)
                thumb = _shrink(overview, SLIDE_THUMB_PX)
                w, h = slide.dimensions
                yield SlidePlan(
                    index=job.index, width=w, height=h, mpp=px.mpp, mpp_source=px.source, warnings=warnings,
                    coords=grid.coords[rows], rows=rows, n_tissue_tiles=n_all,
                    tissue_frac=grid.tissue_frac[rows], grid_index=grid.grid_index[rows],
                    grid_shape=tuple(grid.grid_shape), tile_l0=float(grid.tile_l0),
                    stride_l0=float(grid.stride_l0), level=int(grid.level), thumbnail=thumb,
                    thumb_downsample=max(w / thumb.shape[1], h / thumb.shape[0]),
                    mask=grid.mask, mask_downsample=float(grid.mask_downsample))
                for start in range(0, len(rows), o.batch_size):
                    chunk = rows[start:start + o.batch_size]
                    pixels = np.stack([read_tile(slide, grid, int(i)) for i in chunk])
                    thumbs = [] if job.sample_tiles else [jpeg_bytes(p, o.thumb_px) for p in pixels]
                    yield TileBatch(job.index, start, torch.from_numpy(pixels), thumbs)
            yield SlideEnd(job.index)
        except Exception as exc:  # one bad slide must not stop the cohort; the reason is recorded
            yield SlideFailed(job.index, _reason(exc))


def _no_tile_reason(slide, mpp: float | None, o: TilingOptions, overview: np.ndarray, mask: np.ndarray) -> str:
    """Why a slide has no tile: too small for one tile, or the tissue found and the option to change."""
    every = plan_tiles(slide, mpp, target_mpp=o.target_mpp, tile_px=o.tile_px, stride_px=o.stride_px,
                       min_tissue=0.0, thumbnail=overview)
    if len(every.coords) == 0:
        return (f"0 tiles: the slide ({slide.dimensions[0]} x {slide.dimensions[1]} px) is smaller than one tile "
                f"({every.tile_l0:.0f} px at this pixel size); lower --tile-px or --target-mpp.")
    best = float(every.tissue_frac.max())
    return (f"0 tiles: tissue was found on {100 * float(mask.mean()):.1f} % of the slide and the best tile holds "
            f"{100 * best:.1f} % tissue, below --min-tissue {o.min_tissue:g}; lower --min-tissue (e.g. "
            f"{max(0.0, np.floor(best * 20) / 20):g}, or 0 to keep every tile, as for pre-cut tiles and photos).")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return text if name in ("SlideError",) else f"{name}: {text}"
