"""A slide's tile plan: its pixel size, tissue mask, tile grid and thumbnail, made once per slide and
tiling settings and reused by both passes.

Making a plan reads an overview of the whole slide and computes the tissue mask; reading the tiles
afterwards needs only the grid. The calibration pass makes the plan and keeps it beside the parts
(`<atlas>.parts/plans/`, one small file per slide, keyed like a part); the full pass, and a resumed run,
load it instead of masking and tiling the slide again. A Dask task gets the plan's path, so a plan is
made on whichever worker first needs it and read from the shared parts folder by the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .cohort import SlideRecord
from .config import PLAN, RunConfig
from .parts import load_part, save_part
from .slides import resolve_pixel_size
from .tissue import TileGrid, plan_tiles

SLIDE_THUMB_PX = 1024  # longest side of the stored slide thumbnail
MASK_MAX_PX = 2048     # longest side of the image the tissue mask is computed on

_GRID_ATTRS = ("tile_px", "stride_px", "tile_l0", "stride_l0", "level", "read_px", "mask_downsample")


@dataclass
class TilePlan:
    """What is known of a slide before reading its tiles (level-0 px unless named otherwise)."""

    width: int
    height: int
    mpp: float | None           # um/px (None: tiled at the file's own pixels)
    mpp_source: str
    warnings: list[str]
    grid: TileGrid              # every tissue tile of the slide, the tissue mask
    thumbnail: np.ndarray       # (h, w, 3) uint8, longest side <= SLIDE_THUMB_PX
    thumb_downsample: float     # level-0 px per thumbnail px


def make_plan(slide, rec: SlideRecord, cfg: RunConfig) -> TilePlan:
    """Resolve the pixel size, mask the tissue and lay the tile grid over an open slide (SlideError when
    the pixel size is unknown and native tiling is off)."""
    px, warnings = resolve_pixel_size(rec.slide_id, slide.file_mpp, rec.mpp, cfg.cli_mpp,
                                      native=cfg.native_resolution)
    overview = slide.thumbnail(MASK_MAX_PX)  # read once: tissue mask and stored thumbnail
    grid = plan_tiles(slide, px.mpp, target_mpp=cfg.target_mpp, tile_px=cfg.tile_px, stride_px=cfg.stride_px,
                      min_tissue=cfg.min_tissue, thumbnail=overview)
    if len(grid.coords) == 0:
        warnings = [*warnings, no_tile_reason(slide, px.mpp, cfg, overview, grid.mask)]
    thumb = _shrink(overview, SLIDE_THUMB_PX)
    w, h = slide.dimensions
    return TilePlan(w, h, px.mpp, px.source, warnings, grid, thumb,
                    max(w / thumb.shape[1], h / thumb.shape[0]))


def plan_key(cfg: RunConfig, rec: SlideRecord) -> str:
    """What a slide's plan depends on: the tiling settings, the file and the manifest's pixel size."""
    return cfg._key(cfg.key_names(PLAN), {"path": str(rec.path), "manifest_mpp": rec.mpp})


def save_plan(path: Path, plan: TilePlan, key: str) -> None:
    g = plan.grid
    arrays = {"coords": g.coords, "tissue_frac": g.tissue_frac, "grid_index": g.grid_index, "mask": g.mask,
              "thumbnail": plan.thumbnail}
    attrs = {"key": key, "status": "ok", "width": plan.width, "height": plan.height, "mpp": plan.mpp,
             "mpp_source": plan.mpp_source, "warnings": plan.warnings, "thumb_downsample": plan.thumb_downsample,
             "grid_shape": list(g.grid_shape), **{n: getattr(g, n) for n in _GRID_ATTRS}}
    save_part(path, arrays, attrs)


def load_plan(path: Path, key: str) -> TilePlan | None:
    """The plan saved at `path` with `key`, or None (missing, unreadable or made with other settings)."""
    try:
        arrays, attrs = load_part(path)
    except (OSError, KeyError, ValueError):
        return None
    if attrs.get("key") != key:
        return None
    grid = TileGrid(coords=arrays["coords"], tissue_frac=arrays["tissue_frac"], grid_index=arrays["grid_index"],
                    mask=arrays["mask"], grid_shape=tuple(attrs["grid_shape"]), **{n: attrs[n] for n in _GRID_ATTRS})
    return TilePlan(attrs["width"], attrs["height"], attrs["mpp"], attrs["mpp_source"], attrs["warnings"], grid,
                    arrays["thumbnail"], attrs["thumb_downsample"])


def slide_plan(slide, rec: SlideRecord, cfg: RunConfig, path: Path | None, key: str) -> TilePlan:
    """The slide's plan: loaded from `path` when made before with `key`, else made (and saved there)."""
    plan = load_plan(path, key) if path is not None else None
    if plan is None:
        plan = make_plan(slide, rec, cfg)
        if path is not None:
            try:
                save_plan(path, plan, key)
            except OSError:
                pass  # a cache: the slide's part, written next, reports a full disk or lost permission

    return plan


def _shrink(rgb: np.ndarray, max_px: int) -> np.ndarray:
    """(h, w, 3) uint8 scaled down so its longest side is at most max_px."""
    h, w = rgb.shape[:2]
    f = max_px / max(h, w)
    if f >= 1:
        return rgb
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def no_tile_reason(slide, mpp: float | None, cfg: RunConfig, overview: np.ndarray, mask: np.ndarray) -> str:
    """Why a slide has no tile: too small for one tile, or the tissue found and the option to change."""
    every = plan_tiles(slide, mpp, target_mpp=cfg.target_mpp, tile_px=cfg.tile_px, stride_px=cfg.stride_px,
                       min_tissue=0.0, thumbnail=overview)
    if len(every.coords) == 0:
        return (f"0 tiles: the slide ({slide.dimensions[0]} x {slide.dimensions[1]} px) is smaller than one tile "
                f"({every.tile_l0:.0f} px at this pixel size); lower --tile-px or --target-mpp.")
    best = float(every.tissue_frac.max())
    return (f"0 tiles: tissue was found on {100 * float(mask.mean()):.1f} % of the slide and the best tile holds "
            f"{100 * best:.1f} % tissue, below --min-tissue {cfg.min_tissue:g}; lower --min-tissue (e.g. "
            f"{max(0.0, np.floor(best * 20) / 20):g}, or 0 to keep every tile, as for pre-cut tiles and photos).")
