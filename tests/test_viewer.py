"""The slide viewer's pixels and geometry on a generated pyramidal TIFF (no ../shared needed): a view
shows the slide's own pixels at the right place and level, the concept layers land on the same
level-0 points at every zoom, the stored thumbnail stands in (and says why) when the file is gone,
and links carry an atlas fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dashboard import viewport as vp
from dashboard.links import fingerprint
from dashboard.pixels import Pixels
from generated import write_tiff

W, H = 2048, 1536  # level-0 px of the generated slide
FACTOR = 4         # level 1 = level 0 / 4


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """Uncompressed tiled 2-level TIFF (OpenSlide generic-tiff) of seeded noise, 0.5 um/px; returns
    (path, level 0 array, level 1 array)."""
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    level1 = np.asarray(Image.fromarray(level0).reduce(FACTOR))
    path = write_tiff(tmp_path_factory.mktemp("viewer") / "noise.tiff", level0, mpp=0.5, factors=(1, FACTOR),
                      tile=256, compression=None)
    return path, level0, level1


def _pixels(slide, path=None) -> Pixels:
    p, level0, level1 = slide
    thumb = level1[::4, ::4]  # 16 level-0 px per thumbnail px
    return Pixels.open(str(path or p), thumb, 16.0, W, H)


def test_full_resolution_view_is_the_slide_itself(slide):
    pix = _pixels(slide)
    view = vp.View(1000, 700, 1.0)
    kind, level, _ = pix.source(view)
    assert (kind, level) == ("slide", 0)
    img = pix.render(view, w=400, h=300)
    x0, y0, _, _ = view.box(400, 300)
    assert np.array_equal(img, slide[1][int(y0):int(y0) + 300, int(x0):int(x0) + 400])


def test_magnified_view_repeats_each_slide_pixel(slide):
    img = _pixels(slide).render(vp.View(1000, 700, 0.5), w=400, h=300)  # 2 screen px per level-0 px
    x0, y0, _, _ = vp.View(1000, 700, 0.5).box(400, 300)
    ref = slide[1][int(y0):int(y0) + 150, int(x0):int(x0) + 200]
    assert np.array_equal(img, np.repeat(np.repeat(ref, 2, axis=0), 2, axis=1))


def test_a_coarse_view_reads_the_coarser_level(slide):
    pix = _pixels(slide)
    view = vp.View(1024, 768, 4.0)
    kind, level, ds = pix.source(view)
    assert (kind, level, ds) == ("slide", 1, 4.0)
    img = pix.render(view, w=200, h=100)
    x0, y0, _, _ = view.box(200, 100)
    ref = slide[2][int(y0) // 4:int(y0) // 4 + 100, int(x0) // 4:int(x0) // 4 + 200]
    assert np.array_equal(img, ref)


def test_outside_the_slide_is_white(slide):
    img = _pixels(slide).render(vp.View(0, 0, 1.0), w=200, h=100)  # centre on the corner
    assert (img[:50] == 255).all() and (img[:, :100] == 255).all()
    assert np.array_equal(img[50:, 100:], slide[1][:50, :100])


def test_missing_file_falls_back_to_the_thumbnail_and_says_so(slide, tmp_path):
    gone = tmp_path / "moved.tiff"
    pix = _pixels(slide, gone)
    assert pix.slide is None and str(gone) in pix.why
    view = vp.View(1024, 768, 1.0)
    assert pix.source(view)[0] == "thumbnail"
    img = pix.render(view, w=64, h=64)
    assert img.shape == (64, 64, 3)
    x0, y0, _, _ = view.box(64, 64)  # each thumbnail px fills 16 x 16 screen px (nearest)
    thumb_px = pix.thumbnail[int(y0 + 8) // 16, int(x0 + 8) // 16]
    assert np.array_equal(img[8, 8], thumb_px)


def test_a_thumbnail_smaller_than_the_slide_leaves_the_rest_white():
    """A stored thumbnail that covers only the left half of the slide's stated size: a view there shows it,
    a view past it is white (it raised "box can't be empty" before), and it is never stretched."""
    thumb = np.full((96, 64, 3), 40, np.uint8)  # 16 level-0 px per px: 1,024 x 1,536 of a 2,048 x 1,536 slide
    pix = Pixels(thumb, 16.0, float(W), float(H))
    past = pix.render(vp.View(1800, 768, 2.0), w=64, h=64)
    assert (past == 255).all()
    across = pix.render(vp.View(1024, 768, 4.0), w=64, h=64)  # level-0 x 896..1152: the edge at screen x 32
    assert (across[:, :31] == 40).all() and (across[:, 33:] == 255).all()


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0, 7.3])
def test_layer_cells_are_sampled_at_the_pixels_points(s):
    """Cell under each screen px = floor(level-0 point / cell), the point that px shows."""
    cell, grid = 32.0, (H // 32, W // 32)
    view = vp.View(777.7, 512.3, s)
    rows, cols = vp.cell_index(view, cell, grid, w=300, h=200)
    x0, y0, _, _ = view.box(300, 200)
    for u in (0, 37, 150, 299):
        x = x0 + (u + 0.5) * s
        want = int(x // cell) if 0 <= x < W else -1
        assert cols[u] == want
    for v in (0, 99, 199):
        y = y0 + (v + 0.5) * s
        assert rows[v] == (int(y // cell) if 0 <= y < H else -1)
    lut = np.arange(grid[0] * grid[1] * 4, dtype=np.uint32).reshape(grid + (4,)).astype(np.uint8)
    out = vp.sample_grid(lut, rows, cols)
    r, c = rows[100], cols[150]
    assert np.array_equal(out[100, 150], lut[r, c])


def test_view_operations_keep_the_slide_in_sight():
    whole = vp.fit(W, H)
    assert whole.s == pytest.approx(vp.max_scale(W, H))
    x0, y0, x1, y1 = whole.box(vp.FIT_W, vp.VIEW_H)
    assert x0 <= 0 and y0 <= 0 and x1 >= W and y1 >= H
    z = vp.zoom(whole, 2.0, W, H)
    assert z.s == pytest.approx(whole.s / 2)
    assert vp.zoom(vp.View(10, 10, 0.6), 4, W, H).s == vp.MIN_SCALE
    box = vp.box_view(100, 400, 200, 350, W, H)
    assert vp.contains(box, 100, 200, 150) and vp.contains(box, 250, 200, 150)
    t = vp.tile_view(500, 600, 224, W, H)
    assert vp.contains(t, 500, 600, 224) and (t.cx, t.cy) == (612, 712)
    assert vp.View.parse(t.param()) == vp.View(612, 712, float(f"{t.s:.4g}"))
    assert vp.View.parse("nan,1,2") is None and vp.View.parse("a,b") is None and vp.View.parse(None) is None


def test_scale_bar_is_a_round_length_in_micrometres():
    length, label = vp.scale_bar(1.0, 0.5, target_px=160)  # 0.5 um per screen px: 80 um wanted
    assert label == "50 µm" and length == pytest.approx(100)
    length, label = vp.scale_bar(40.0, 0.25)
    assert label == "1 mm" and length == pytest.approx(100)
    _, label = vp.scale_bar(1.0, None)
    assert "px" in label


def test_fingerprint_names_the_atlas():
    a = {"created_utc": "2026-01-01T00:00:00", "command_line": "run", "n_tiles": 10, "config": {"k": 6}}
    assert fingerprint(a) == fingerprint(dict(a))
    assert len(fingerprint(a)) == 8
    assert fingerprint({**a, "created_utc": "2026-01-02T00:00:00"}) != fingerprint(a)
    assert fingerprint({**a, "config": {"k": 8}}) != fingerprint(a)


def test_blend_is_the_alpha_formula():
    """overlay.blend: base under rgba at an opacity, rounded as out = (base(255-a) + c a + 127) // 255
    with a = alpha x opacity (the formula computed here in numpy, the code composites with Pillow)."""
    from precompute.overlay import blend

    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    for opacity in (0.0, 0.3, 0.55, 1.0):
        a = (rgba[..., 3:4].astype(np.uint32) * round(opacity * 256)) // 256
        want = ((base.astype(np.uint32) * (255 - a) + rgba[..., :3].astype(np.uint32) * a + 127) // 255)
        np.testing.assert_array_equal(blend(base, rgba, opacity), want.astype(np.uint8))
