"""Tissue mask and tile grid: what a user checks before trusting a run's tiles. Generic rules on a
generated slide whose tissue is known pixel for pixel; facts about the real slides beside the checkout
as a second layer (skipped without ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import real_data
from generated import slide_pixels, write_slide, write_tiff
from precompute.slides import open_slide
from precompute.tissue import plan_tiles, read_tile, tissue_mask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLIDES = DATA / "slides"
KATHER = DATA / "tiles" / "kather-crc"
W, H = 768, 512  # the generated slide, 0.5 um/px


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    with open_slide(write_slide(tmp_path_factory.mktemp("tissue") / "gen.tiff", seed=1, width=W, height=H)) as s:
        yield s


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """(H, W) bool: where the generated slide has stained tissue (not glass), from its own pixels."""
    return slide_pixels(1, W, H).astype(int).sum(axis=2) < 3 * 225


@pytest.fixture(scope="module")
def grid(gen):
    return plan_tiles(gen, gen.file_mpp, target_mpp=0.5, tile_px=64)


def test_mask_matches_the_generated_tissue(grid, truth):
    assert grid.mask.dtype == bool and grid.mask.shape == truth.shape and grid.mask_downsample == 1
    assert (grid.mask == truth).mean() > 0.99


def test_grid_geometry(grid, gen, truth):
    g = grid
    assert g.tile_l0 == 64 and g.stride_l0 == 64 and g.level == 0 and g.read_px == 64 and not g.upsampled
    assert g.grid_shape == (H // 64, W // 64)
    # Kept tiles: exactly those whose tissue fraction (from the true tissue) is at least 0.25.
    frac = truth.reshape(H // 64, 64, W // 64, 64).mean(axis=(1, 3))
    expect = np.argwhere(frac >= 0.25)
    assert len(g) == len(expect) and abs(np.abs(g.grid_index - expect).sum()) <= 2  # borderline tiles may differ
    assert g.coords.shape == (len(g), 2) and g.coords.dtype == np.int64
    assert g.grid_index.dtype == np.int32 and g.tissue_frac.dtype == np.float32
    assert (g.coords == g.grid_index[:, ::-1] * 64).all()  # on the lattice, (x, y) order
    flat = g.grid_index[:, 0].astype(np.int64) * g.grid_shape[1] + g.grid_index[:, 1]
    assert (np.diff(flat) > 0).all()  # row-major (file) order
    np.testing.assert_allclose(g.tissue_frac, frac[tuple(g.grid_index.T)], atol=0.02)


def test_tiles_are_the_slide_pixels(grid, gen):
    pixels = slide_pixels(1, W, H)
    best = int(np.argmax(grid.tissue_frac))
    x, y = grid.coords[best]
    tile = read_tile(gen, grid, best)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    assert (tile == pixels[y:y + 64, x:x + 64]).all()
    r, g, b = tile.reshape(-1, 3).mean(0)
    assert tile.mean() < 220 and r > g and b > g  # stained pink/purple, not glass


def test_coarser_target_reads_a_coarser_level_and_shrinks(gen):
    g = plan_tiles(gen, gen.file_mpp, target_mpp=2.0, tile_px=64)
    assert g.tile_l0 == 256 and g.level == 1 and g.read_px == 64  # level 1 is the 1/4 level
    tile = read_tile(gen, g, 0)
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8


def test_finer_target_than_the_scan_enlarges(gen):
    g = plan_tiles(gen, gen.file_mpp, target_mpp=0.25, tile_px=64)
    assert g.upsampled and g.read_px == 32
    assert read_tile(gen, g, 0).shape == (64, 64, 3)


def test_min_tissue_zero_keeps_every_grid_tile(gen):
    g = plan_tiles(gen, gen.file_mpp, tile_px=64, min_tissue=0)
    assert len(g) == g.grid_shape[0] * g.grid_shape[1]
    assert (g.tissue_frac == 0).any()  # glass tiles included


def test_slide_smaller_than_a_tile_has_no_tiles_and_no_error(tmp_path):
    with open_slide(write_slide(tmp_path / "small.tiff", 2, 16, 16, factors=(1,))) as s:
        g = plan_tiles(s, s.file_mpp)
    assert len(g) == 0 and g.coords.shape == (0, 2) and g.grid_index.shape == (0, 2)
    assert g.grid_shape == (0, 0) and g.mask.shape == (16, 16)


def test_tiles_read_from_a_coarser_pyramid_level(tmp_path):
    path = write_tiff(tmp_path / "pyr.tiff", slide_pixels(3, 300, 250), factors=(1, 2, 4, 8), tile=16)
    with open_slide(path) as s:
        # Pretend 0.125 um/px so that 0.5 um/px tiles need a 4x downsample: level 2.
        g = plan_tiles(s, 0.125, target_mpp=0.5, tile_px=16, min_tissue=0)
        assert g.level == 2 and g.read_px == round(64 / s.level_downsamples[2])
        assert g.tile_l0 == 64 and g.grid_shape == (250 // 64, 300 // 64)
        assert read_tile(s, g, 0).shape == (16, 16, 3)


def test_mask_keeps_all_tissue_image_whole():
    # An all-tissue tile (pale pink and dark purple halves) must not be split into "pale" and "dark".
    rng = np.random.default_rng(1)
    img = np.empty((224, 224, 3), float)
    img[:, :112], img[:, 112:] = (232, 150, 190), (120, 60, 150)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    assert tissue_mask(img).mean() > 0.95


def test_plan_rejects_bad_parameters(gen):
    with pytest.raises(ValueError, match="min_tissue"):
        plan_tiles(gen, 0.5, min_tissue=25)
    with pytest.raises(ValueError, match="tile_px"):
        plan_tiles(gen, 0.5, tile_px=0)
    with pytest.raises(IndexError, match="grid has"):
        read_tile(gen, plan_tiles(gen, 0.5, tile_px=64), 10_000)


# -- real slides (../shared/data) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def cmu():
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (a plain clone has no ../shared/data)")
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


@real_data
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


@real_data
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


@real_data
def test_mask_keeps_a_real_all_tissue_tile_whole():
    with open_slide(KATHER / "STR-TCGA-HGDYLEWM.png") as s:
        rgb = s.read_region((0, 0), 0, s.dimensions)
    assert tissue_mask(rgb).mean() > 0.95


