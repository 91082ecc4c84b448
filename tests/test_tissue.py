"""Tissue mask and tile grid on real slides: what a user checks before trusting a run's tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from precompute.slides import open_slide
from precompute.tissue import plan_tiles, read_tile, tissue_mask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")
SLIDES = DATA / "slides"
KATHER = DATA / "tiles" / "kather-crc"


@pytest.fixture(scope="module")
def cmu():
    with open_slide(SLIDES / "CMU-1-Small-Region.svs") as s:
        yield s


@pytest.fixture(scope="module")
def cmu_grid(cmu):
    return plan_tiles(cmu, cmu.file_mpp, target_mpp=0.5, tile_px=224)


def test_cmu_mask_covers_roughly_the_tissue(cmu_grid, cmu):
    mask = cmu_grid.mask
    assert mask.dtype == bool and max(mask.shape) == 2048
    assert 0.2 < mask.mean() < 0.6  # the slide is roughly 40 % tissue
    # The mask maps back onto the whole slide.
    assert mask.shape[1] * cmu_grid.mask_downsample == pytest.approx(cmu.dimensions[0], rel=0.01)
    assert mask.shape[0] * cmu_grid.mask_downsample == pytest.approx(cmu.dimensions[1], rel=0.01)
    # The left edge half-way down is glass; the lower middle of the section is tissue.
    h, w = mask.shape
    assert not mask[h // 2: h * 6 // 10, : w // 10].any()
    assert mask[int(h * 0.8), int(w * 0.45)]


def test_cmu_grid_geometry(cmu_grid, cmu):
    g = cmu_grid
    W, H = cmu.dimensions
    assert g.tile_l0 == pytest.approx(224 * 0.5 / 0.499)
    assert g.stride_l0 == g.tile_l0 and g.level == 0 and g.read_px == 224 and not g.upsampled
    assert g.grid_shape == (int((H - g.tile_l0) // g.stride_l0) + 1, int((W - g.tile_l0) // g.stride_l0) + 1)
    n = len(g)
    assert 20 < n < g.grid_shape[0] * g.grid_shape[1]  # some tissue tiles, not every grid cell
    assert g.coords.shape == (n, 2) and g.coords.dtype == np.int64
    assert g.grid_index.shape == (n, 2) and g.grid_index.dtype == np.int32
    assert g.tissue_frac.shape == (n,) and g.tissue_frac.dtype == np.float32
    # Every tile lies inside the slide, on the stride lattice, in row-major (file) order.
    assert (g.coords >= 0).all()
    assert (g.coords[:, 0] + g.tile_l0 <= W + 1).all() and (g.coords[:, 1] + g.tile_l0 <= H + 1).all()
    lattice = np.round(g.grid_index[:, ::-1] * g.stride_l0)
    assert (g.coords == lattice).all()
    flat = g.grid_index[:, 0].astype(np.int64) * g.grid_shape[1] + g.grid_index[:, 1]
    assert (np.diff(flat) > 0).all()
    assert (g.tissue_frac >= 0.25).all() and (g.tissue_frac <= 1).all()


def test_cmu_tiles_look_like_tissue(cmu_grid, cmu):
    best = int(np.argmax(cmu_grid.tissue_frac))
    tile = read_tile(cmu, cmu_grid, best)
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    assert tile.mean() < 200  # stained tissue, not glass (glass is ~240-255)
    assert tile.std() > 10
    # A stained H&E tile is pink/purple: red and blue above green on average.
    r, g, b = tile.reshape(-1, 3).mean(0)
    assert r > g and b > g


def test_tissue_fraction_matches_the_mask_under_each_tile(cmu_grid):
    # Recompute a few fractions by brute force on the mask (whole mask pixels) and compare.
    g = cmu_grid
    ds = g.mask_downsample
    for i in range(0, len(g), 7):
        x, y = g.coords[i]
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        x1, y1 = int(round((x + g.tile_l0) / ds)), int(round((y + g.tile_l0) / ds))
        assert g.mask[y0:y1, x0:x1].mean() == pytest.approx(g.tissue_frac[i], abs=0.05)


def test_coarser_target_reads_bigger_footprint_and_shrinks(cmu):
    g = plan_tiles(cmu, cmu.file_mpp, target_mpp=1.0, tile_px=128, stride_px=64)
    assert g.tile_l0 == pytest.approx(128 * 1.0 / 0.499) and g.stride_l0 == pytest.approx(64 / 0.499)
    assert g.read_px == round(g.tile_l0) and g.level == 0
    tile = read_tile(cmu, g, 0)
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8


def test_finer_target_than_the_scan_enlarges(cmu):
    g = plan_tiles(cmu, cmu.file_mpp, target_mpp=0.25, tile_px=64)
    assert g.upsampled and g.read_px == 32
    assert read_tile(cmu, g, 0).shape == (64, 64, 3)


def test_min_tissue_zero_keeps_every_grid_tile(cmu):
    g = plan_tiles(cmu, cmu.file_mpp, min_tissue=0)
    assert len(g) == g.grid_shape[0] * g.grid_shape[1]
    assert (g.tissue_frac == 0).any()  # glass tiles included


def test_small_svs_has_no_tiles_and_no_error():
    with open_slide(SLIDES / "small.svs") as s:
        g = plan_tiles(s, s.file_mpp)
    assert len(g) == 0 and g.coords.shape == (0, 2) and g.grid_index.shape == (0, 2)
    assert g.grid_shape == (0, 0)
    assert g.mask.shape == (16, 16)


def test_kidney_native_resolution_tiles_find_the_small_section():
    with open_slide(SLIDES / "kidney-48-5.tif") as s:
        g = plan_tiles(s, None)  # native: 224 px tiles of the file's own pixels
        assert g.tile_l0 == 224 and g.read_px == 224 and g.level == 0
        assert g.grid_shape == (901 // 224, 1493 // 224)
        # The only tissue is a ~120 x 60 px section near (360, 570): mostly blank slide.
        assert g.mask.mean() < 0.01
        ys, xs = np.nonzero(g.mask)
        assert 250 < np.median(xs) < 450 and 500 < np.median(ys) < 640
        assert len(g) == 0  # the section fills far less than a quarter of any tile
        loose = plan_tiles(s, None, min_tissue=0.05)
        assert loose.grid_index.tolist() == [[2, 1]]
        tile = read_tile(s, loose, 0)
    assert tile.shape == (224, 224, 3) and tile.min() < 150


def test_boxes_tiles_read_from_a_coarser_pyramid_level():
    with open_slide(SLIDES / "boxes.tiff") as s:
        # Pretend 0.125 um/px so that 0.5 um/px tiles need a 4x downsample: level 2 (4.016x).
        g = plan_tiles(s, 0.125, target_mpp=0.5, tile_px=16, min_tissue=0)
        assert g.level == 2 and g.read_px == round(64 / s.level_downsamples[2])
        assert g.tile_l0 == 64 and g.grid_shape == (250 // 64, 300 // 64)
        tile = read_tile(s, g, 0)
    assert tile.shape == (16, 16, 3)


def test_kather_tiles_keep_their_single_tile_with_min_tissue_zero():
    # Pre-cut 224 px tiles at 0.5 um/px: each is exactly one grid tile; adipose is mostly white.
    for path in sorted(KATHER.glob("*.png"))[::4]:
        with open_slide(path) as s:
            g = plan_tiles(s, 0.5, target_mpp=0.5, tile_px=224, min_tissue=0)
            assert len(g) == 1 and g.coords.tolist() == [[0, 0]]
            tile = read_tile(s, g, 0)
            assert (tile == s.read_region((0, 0), 0, (224, 224))).all()


def test_mask_of_blank_and_black_images_is_empty():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(242, 3, (200, 300, 3)), 0, 255).astype(np.uint8)  # noisy blank glass
    assert not tissue_mask(glass).any()
    assert not tissue_mask(np.zeros((50, 50, 3), np.uint8)).any()
    assert not tissue_mask(np.full((50, 50, 3), 255, np.uint8)).any()


def test_mask_keeps_all_tissue_image_whole():
    # An all-tissue tile must not be split into "pale" and "dark" halves.
    with open_slide(KATHER / "STR-TCGA-HGDYLEWM.png") as s:
        rgb = s.read_region((0, 0), 0, s.dimensions)
    assert tissue_mask(rgb).mean() > 0.95


def test_plan_rejects_bad_parameters(cmu):
    with pytest.raises(ValueError, match="min_tissue"):
        plan_tiles(cmu, 0.5, min_tissue=25)
    with pytest.raises(ValueError, match="tile_px"):
        plan_tiles(cmu, 0.5, tile_px=0)
    with pytest.raises(IndexError, match="grid has"):
        read_tile(cmu, plan_tiles(cmu, 0.5), 10_000)
