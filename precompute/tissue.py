"""Tissue detection and the tile grid of one slide.

Tissue mask (`tissue_mask`), computed on a low-resolution image of the whole slide:
1. Saturation S = (max - min) / max of the RGB channels (HSV saturation). Stained tissue is
   coloured; glass, dust shadows and out-of-focus grey debris are not, whatever their brightness.
2. Threshold: Otsu's threshold of S, clipped to [0.05, 0.10]. Otsu finds the glass/tissue split on
   slides with a lot of background. The floor keeps a blank slide's compression noise (S ~ 0.01-0.03)
   from becoming tissue; the ceiling stops Otsu from splitting an all-tissue image (a pre-cut tile,
   a biopsy photo) into pale and dark tissue and dropping the pale half.
3. Near-white pixels (every channel > 220) and near-black pixels (every channel < 30: scanner
   padding, pen, folds) are never tissue.
4. Clean-up: a closing with a disk of radius 2 px joins nuclei and fibres into one region;
   holes up to 0.1 % of the image are filled (fat cells, small lumina belong to their tissue); objects
   up to 0.02 % of the image are removed (dust, specks). Sizes are relative to the mask image because
   the mask is made at a fixed size (longest side ~2048 px), not at a fixed pixel size.

Tile grid (`plan_tiles`): square tiles of `tile_px` model px at `target_mpp`, i.e. `tile_l0 =
tile_px * target_mpp / mpp` level-0 px (mpp None = native: `tile_l0 = tile_px`), placed at
x = col * stride_l0, y = row * stride_l0 wherever the whole tile fits inside level 0. A tile is kept
when the tissue mask covers at least `min_tissue` of its footprint (0 keeps every tile). Tiles are read
from the coarsest pyramid level that does not need enlarging and resized to `tile_px`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_holes, remove_small_objects

from .coverage import area_fraction
from .slides import Slide

SATURATION_RANGE = (0.05, 0.10)  # clip for the Otsu threshold of saturation (see module docstring)
WHITE_MIN = 220                  # every channel above this: glass
BLACK_MAX = 30                   # every channel below this: padding, pen, folds


def tissue_mask(rgb: np.ndarray, *, closing_radius: int = 2, max_hole_frac: float = 1e-3,
                max_object_frac: float = 2e-4) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (h, w) bool, True on tissue. Method: see the module docstring.

    Holes and objects are measured as fractions of the image area (h * w).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask expects an (h, w, 3) uint8 image, got {rgb.shape} {rgb.dtype}.")
    hi = rgb.max(axis=2)
    lo = rgb.min(axis=2)
    sat = (hi - lo).astype(np.float32) / np.maximum(hi, 1).astype(np.float32)
    # Otsu needs two distinct values; a constant image (blank slide) just gets the floor.
    thr = threshold_otsu(sat) if np.ptp(sat) > 1e-6 else SATURATION_RANGE[0]
    thr = float(np.clip(thr, *SATURATION_RANGE))
    mask = (sat > thr) & (lo <= WHITE_MIN) & (hi >= BLACK_MAX)
    if closing_radius > 0 and mask.any():
        # Pad by edge replication so the closing does not eat tissue touching the image border.
        r = closing_radius
        padded = np.pad(mask, r, mode="edge")
        mask = ndimage.binary_closing(padded, structure=disk(r))[r:-r, r:-r]
    area = mask.size
    mask = remove_small_holes(mask, max_size=int(max_hole_frac * area))
    mask = remove_small_objects(mask, max_size=int(max_object_frac * area))
    return mask


@dataclass
class TileGrid:
    """Tissue tiles of one slide at a target pixel size."""

    coords: np.ndarray        # (N, 2) int64 level-0 (x, y) of each tile's top-left corner
    tissue_frac: np.ndarray   # (N,) float32 tissue fraction of each tile
    tile_px: int              # tile side fed to the model, px
    stride_px: int            # grid step in model px
    tile_l0: float            # tile side in level-0 px
    stride_l0: float          # grid step in level-0 px
    level: int                # pyramid level read from
    read_px: int              # tile side read at that level, px (then resized to tile_px)
    grid_shape: tuple[int, int]  # (rows, cols) of the full grid (tissue or not)
    grid_index: np.ndarray    # (N, 2) int32 (row, col) of each tile in the full grid
    mask: np.ndarray          # (h, w) bool tissue mask of the whole slide
    mask_downsample: float    # level-0 px per mask px

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def upsampled(self) -> bool:
        """True when tiles are enlarged to tile_px (the slide is coarser than the target pixel size)."""
        return self.read_px < self.tile_px


def plan_tiles(slide: Slide, mpp: float | None, *, target_mpp: float = 0.5, tile_px: int = 224,
               stride_px: int | None = None, min_tissue: float = 0.25, mask_max_px: int = 2048,
               thumbnail: np.ndarray | None = None) -> TileGrid:
    """Lay the tile grid over `slide` and keep the tissue tiles.

    mpp: the slide's um/px (None = native: tile at the file's own pixels, target_mpp unused).
    thumbnail: an (h, w, 3) uint8 image of the whole slide, if the caller already has one;
        otherwise one with longest side <= mask_max_px is read. The tissue mask is made from it.
    Slides smaller than one tile, or without tissue, give a grid with N = 0.
    """
    stride_px = tile_px if stride_px is None else stride_px
    if tile_px < 1 or stride_px < 1:
        raise ValueError(f"tile_px and stride_px must be >= 1 px, got {tile_px} and {stride_px}.")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue is a fraction of the tile and must be within 0-1, got {min_tissue}.")
    if target_mpp <= 0 or (mpp is not None and mpp <= 0):
        raise ValueError(f"pixel sizes must be positive, got mpp={mpp}, target_mpp={target_mpp}.")

    scale = 1.0 if mpp is None else target_mpp / mpp  # level-0 px per model px
    tile_l0, stride_l0 = tile_px * scale, stride_px * scale
    level = slide.best_level_for_downsample(scale)
    read_px = max(1, round(tile_l0 / slide.level_downsamples[level]))

    thumb = slide.thumbnail(mask_max_px) if thumbnail is None else thumbnail
    mask = tissue_mask(thumb)
    W, H = slide.dimensions
    sx, sy = W / mask.shape[1], H / mask.shape[0]

    # Number of whole tiles along each axis; the epsilon keeps an exact fit from rounding away.
    def count(extent: int) -> int:
        return 0 if extent < tile_l0 else int(np.floor((extent - tile_l0) / stride_l0 + 1e-9)) + 1

    rows, cols = count(H), count(W)
    gi, gj = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # row-major = file order
    gi, gj = gi.ravel(), gj.ravel()
    x0, y0 = gj * stride_l0, gi * stride_l0
    frac = area_fraction(mask, x0 / sx, y0 / sy, (x0 + tile_l0) / sx, (y0 + tile_l0) / sy)
    keep = frac >= min_tissue
    coords = np.stack([np.round(x0[keep]), np.round(y0[keep])], axis=1).astype(np.int64).reshape(-1, 2)
    return TileGrid(
        coords=coords,
        tissue_frac=frac[keep].astype(np.float32),
        tile_px=int(tile_px), stride_px=int(stride_px),
        tile_l0=float(tile_l0), stride_l0=float(stride_l0),
        level=int(level), read_px=int(read_px),
        grid_shape=(int(rows), int(cols)),
        grid_index=np.stack([gi[keep], gj[keep]], axis=1).astype(np.int32).reshape(-1, 2),
        mask=mask, mask_downsample=float((sx + sy) / 2),
    )


def read_tile(slide: Slide, grid: TileGrid, i: int) -> np.ndarray:
    """Tile `i` of `grid` as (tile_px, tile_px, 3) uint8 RGB.

    Read at grid.level (read_px px) and resized: area-averaged when shrinking, bilinear when enlarging.
    """
    if not 0 <= i < len(grid.coords):
        raise IndexError(f"tile {i} does not exist; the grid has {len(grid.coords)} tiles.")
    x, y = grid.coords[i]
    region = slide.read_region((int(x), int(y)), grid.level, (grid.read_px, grid.read_px))
    if grid.read_px == grid.tile_px:
        return region
    resample = Image.Resampling.BOX if grid.read_px > grid.tile_px else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(region).resize((grid.tile_px, grid.tile_px), resample))
