"""Opening slides and plain images, region reads, level choice, bad inputs, and pixel-size rules.

Generic behaviour is checked on generated files (tests/generated.py), compared pixel for pixel with the
arrays written; facts about the real test files beside the checkout are a second layer that skips
without ../shared/data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import real_data
from generated import slide_pixels, write_broken, write_slide, write_tiff
from precompute.slides import PLAUSIBLE_MPP, PixelSize, SlideError, open_slide, resolve_pixel_size

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLIDES = DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
W, H = 768, 512  # the generated slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A generated 768 x 512 px two-level pyramidal TIFF at 0.5 um/px (seed 1)."""
    return write_slide(tmp_path_factory.mktemp("slides") / "gen.tiff", seed=1, width=W, height=H)


# -- generated slides ----------------------------------------------------------------------------

def test_generated_tiff_opens_with_openslide_and_its_pixel_size(slide):
    with open_slide(slide) as s:
        assert s.backend == "openslide"
        assert s.dimensions == (W, H)
        assert s.level_dimensions == ((W, H), (W // 4, H // 4))
        assert s.file_mpp == pytest.approx(0.5)


def test_read_region_is_the_written_pixels_and_white_outside_the_slide(slide):
    pixels = slide_pixels(1, W, H)
    with open_slide(slide) as s:
        inside = s.read_region((300, 200), 0, (64, 32))
        assert inside.shape == (32, 64, 3) and inside.dtype == np.uint8
        assert (inside == pixels[200:232, 300:364]).all()  # lossless file: exactly what was written
        # Half the region lies right of the slide: that half must be pure white, not black.
        edge = s.read_region((W - 16, 0), 0, (32, 32))
        assert (edge[:, :16] == pixels[:32, W - 16:]).all() and (edge[:, 16:] == 255).all()


def test_thumbnail_keeps_aspect_and_fits_max_px(slide):
    with open_slide(slide) as s:
        th = s.thumbnail(256)
    assert th.dtype == np.uint8 and th.shape == (round(H * 256 / W), 256, 3)
    # It shows the slide, not something else: close to a plain downscale of the written pixels.
    ref = np.asarray(Image.fromarray(slide_pixels(1, W, H)).resize((256, th.shape[0]), Image.BOX))
    assert np.abs(th.astype(int) - ref.astype(int)).mean() < 10


def test_thumbnail_never_enlarges(tmp_path):
    with open_slide(write_slide(tmp_path / "tiny.tiff", 2, 16, 16, factors=(1,))) as s:
        assert s.thumbnail(2048).shape == (16, 16, 3)


def test_pyramid_levels_and_level_choice(tmp_path):
    path = write_tiff(tmp_path / "pyr.tiff", slide_pixels(3, 300, 250), factors=(1, 2, 4, 8), tile=16)
    with open_slide(path) as s:
        assert s.level_dimensions == ((300, 250), (150, 125), (75, 63), (38, 32))  # Pillow's reduce rounds up
        assert s.best_level_for_downsample(1.0) == 0
        assert s.best_level_for_downsample(1.9) == 0   # level 1 would need enlarging
        assert s.best_level_for_downsample(2.0) == 1
        assert s.best_level_for_downsample(3.5) == 1
        assert s.best_level_for_downsample(4.0) == 2   # level 2 is 3.98x: rounding, not a real upscale
        assert s.best_level_for_downsample(100.0) == 3
        assert s.best_level_for_downsample(0.5) == 0
        th = s.thumbnail(40)  # from a coarse level, still the whole slide
        assert th.shape == (33, 40, 3)
        assert s.read_region((0, 0), 3, (38, 32)).shape == (32, 38, 3)


def test_implausible_file_mpp_is_reported_not_used(tmp_path):
    with open_slide(write_slide(tmp_path / "odd.tiff", 4, 64, 64, mpp=352.8, factors=(1,))) as s:
        assert s.file_mpp == pytest.approx(352.8, abs=0.1)
        with pytest.raises(SlideError) as err:
            resolve_pixel_size("odd", s.file_mpp, None, None, native=False)
        assert "352.8" in str(err.value) and "the file" in str(err.value)
        px, warnings = resolve_pixel_size("odd", s.file_mpp, None, 0.5, native=False)
    assert px == PixelSize(0.5, "cli")
    assert len(warnings) == 1 and "352.8" in warnings[0] and "odd" in warnings[0]


def test_plain_tiff_without_tiles_falls_back_to_image_reader_without_mpp(tmp_path):
    pixels = slide_pixels(5, 300, 200)
    path = tmp_path / "plain.tif"
    Image.fromarray(pixels).save(path)  # a strip TIFF without resolution tags
    with open_slide(path) as s:
        assert s.backend == "image" and s.dimensions == (300, 200) and s.level_downsamples == (1.0,)
        assert s.file_mpp is None
        with pytest.raises(SlideError) as err:
            resolve_pixel_size("plain", s.file_mpp, None, None, native=False)
        msg = str(err.value)
        assert "--mpp" in msg and "mpp` column" in msg and "--native-resolution" in msg and "plain" in msg
        px, warnings = resolve_pixel_size("plain", s.file_mpp, None, None, native=True)
        assert px == PixelSize(None, "native") and warnings == []
        assert (s.read_region((10, 20), 0, (30, 40)) == pixels[20:60, 10:40]).all()


def test_png_tile_opens_as_image(tmp_path):
    pixels = slide_pixels(6, 224, 224)
    Image.fromarray(pixels).save(tmp_path / "tile.png")
    with open_slide(tmp_path / "tile.png") as s:
        assert s.backend == "image" and s.dimensions == (224, 224)
        assert (s.read_region((0, 0), 0, (224, 224)) == pixels).all()


def test_closed_slide_refuses_reads(slide):
    s = open_slide(slide)
    s.close()
    s.close()  # closing twice is harmless
    with pytest.raises(SlideError, match="closed"):
        s.read_region((0, 0), 0, (8, 8))


# -- real slides (../shared/data) ----------------------------------------------------------------

@real_data
def test_cmu_opens_with_openslide_and_its_pixel_size():
    with open_slide(CMU) as s:
        assert s.backend == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.level_dimensions == ((2220, 2967),)
        assert s.file_mpp == pytest.approx(0.499, abs=1e-3)
        assert s.read_region((1000, 1500), 0, (64, 32)).mean() < 230  # tissue in the middle of the section


@real_data
def test_real_files_open_with_their_known_geometry():
    with open_slide(SLIDES / "boxes.tiff") as s:
        assert s.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert s.best_level_for_downsample(4.0) == 2   # level 2 is 4.016x
        assert s.file_mpp == pytest.approx(352.8, abs=0.1)
    with open_slide(SLIDES / "kidney-48-5.tif") as s:
        assert s.backend == "image" and s.dimensions == (1493, 901) and s.file_mpp is None
    with open_slide(DATA / "tiles" / "kather-crc" / "ADI-TCGA-EENSRDNW.png") as s:
        assert s.backend == "image" and s.dimensions == (224, 224)


# -- bad inputs ----------------------------------------------------------------------------------

def test_broken_svs_names_file_and_reason(tmp_path):
    path = write_broken(tmp_path / "broken.svs")
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert "broken.svs" in msg and "not a readable slide" in msg
    assert "OpenSlideUnsupportedFormatError" in msg


@real_data
def test_real_broken_and_truncated_files_are_refused(tmp_path):
    with pytest.raises(SlideError, match="not a readable slide") as err:
        open_slide(DATA / "bad" / "broken.svs")
    assert "broken.svs" in str(err.value)
    p = tmp_path / "cut.svs"
    p.write_bytes(CMU.read_bytes()[:1_000_000])
    with pytest.raises(SlideError, match="not a readable slide"):
        open_slide(p)


def test_nonexistent_path(tmp_path):
    with pytest.raises(SlideError, match="not found") as err:
        open_slide(tmp_path / "nope.svs")
    assert "nope.svs" in str(err.value)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.svs"
    p.touch()
    with pytest.raises(SlideError, match=r"empty \(0 bytes\)"):
        open_slide(p)


def test_folder_is_not_a_slide(tmp_path):
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path)


def test_text_file_renamed_svs(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="not a readable slide") as err:
        open_slide(p)
    assert "notes.svs" in str(err.value)


def test_truncated_copy_of_a_slide(slide, tmp_path):
    p = tmp_path / "cut.tiff"
    p.write_bytes(slide.read_bytes()[: slide.stat().st_size // 2])
    with pytest.raises(SlideError, match="not a readable slide"):
        open_slide(p)


def test_corrupt_tile_data_fails_on_read_with_a_reason(slide, tmp_path):
    # Headers intact, compressed tiles zeroed: the file opens, the read must fail clearly.
    data = bytearray(slide.read_bytes())
    data[len(data) // 4: len(data) // 2] = bytes(len(data) // 2 - len(data) // 4)
    p = tmp_path / "zeroed.tiff"
    p.write_bytes(bytes(data))
    with open_slide(p) as s:
        with pytest.raises(SlideError) as err:
            s.read_region((0, 0), 0, s.dimensions)
    assert "zeroed.tiff" in str(err.value) and "corrupt" in str(err.value)


def test_truncated_png(tmp_path):
    src = tmp_path / "whole.png"
    Image.fromarray(slide_pixels(7, 300, 200)).save(src)
    p = tmp_path / "cut.png"
    p.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(SlideError, match="not a readable slide") as err:
        open_slide(p)
    assert "Pillow" in str(err.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file regardless of mode")
def test_unreadable_permissions(slide, tmp_path):
    p = tmp_path / "locked.svs"
    shutil.copy(slide, p)
    p.chmod(0)
    try:
        with pytest.raises(SlideError, match="permission"):
            open_slide(p)
    finally:
        p.chmod(0o600)


def test_grayscale_png_becomes_rgb(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))  # 20 x 25
    p = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(p)
    with open_slide(p) as s:
        rgb = s.read_region((0, 0), 0, (25, 20))
    assert rgb.shape == (20, 25, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == gray).all() and (rgb[..., 1] == gray).all() and (rgb[..., 2] == gray).all()


def test_rgba_png_transparent_pixels_are_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200                     # red everywhere
    rgba[:, :5, 3] = 255                   # left half opaque
    rgba[:, 5:, 3] = 0                     # right half transparent
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    with open_slide(p) as s:
        rgb = s.read_region((0, 0), 0, (10, 10))
    assert (rgb[:, :5] == (200, 0, 0)).all()
    assert (rgb[:, 5:] == 255).all()


def test_16bit_grayscale_png_is_scaled_to_8bit(tmp_path):
    a = np.array([[0, 65535], [32768, 257]], np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    with open_slide(p) as s:
        rgb = s.read_region((0, 0), 0, (2, 2))
    assert rgb[..., 0].tolist() == [[0, 255], [128, 1]]


def test_float_tiff_is_refused_with_advice(tmp_path):
    p = tmp_path / "float.tif"
    Image.fromarray(np.ones((8, 8), np.float32)).save(p)
    with pytest.raises(SlideError, match="8-bit RGB") as err:
        open_slide(p)
    assert "float.tif" in str(err.value)


def test_plain_tiff_resolution_tags_give_file_mpp(tmp_path):
    # 20,000 px per cm = 0.5 um/px.
    p = tmp_path / "scan.tif"
    Image.new("RGB", (8, 8), "white").save(p, resolution=20000.0, resolution_unit=3)
    with open_slide(p) as s:
        assert s.file_mpp == pytest.approx(0.5)


# -- pixel-size rules ----------------------------------------------------------------------------

def test_pixel_size_precedence_file_manifest_cli():
    assert resolve_pixel_size("a", 0.25, 0.5, 1.0, native=False) == (PixelSize(0.25, "file"), [
        "slide 'a': the manifest's mpp column says 0.5 um/px but the file says 0.25 um/px; using the file's value.",
        "slide 'a': --mpp says 1 um/px but the file says 0.25 um/px; using the file's value."])
    assert resolve_pixel_size("a", None, 0.5, 1.0, native=False) == (PixelSize(0.5, "manifest"), [])
    assert resolve_pixel_size("a", None, None, 1.0, native=True) == (PixelSize(1.0, "cli"), [])
    # Agreement within 10 % is not worth a warning.
    assert resolve_pixel_size("a", 0.499, 0.5, None, native=False) == (PixelSize(0.499, "file"), [])


def test_implausible_values_fall_through_to_next_source_or_native():
    px, warnings = resolve_pixel_size("a", 352.8, 0.0001, 0.5, native=False)
    assert px == PixelSize(0.5, "cli")
    assert len(warnings) == 2 and "352.8" in warnings[0] and "0.0001" in warnings[1]
    px, warnings = resolve_pixel_size("a", float("nan"), None, None, native=True)
    assert px == PixelSize(None, "native") and len(warnings) == 1
    with pytest.raises(SlideError, match=r"25 um/px from --mpp"):
        resolve_pixel_size("a", None, None, 25.0, native=False)
    lo, hi = PLAUSIBLE_MPP
    assert resolve_pixel_size("a", lo, None, None, native=False)[0].mpp == lo
    assert resolve_pixel_size("a", hi, None, None, native=False)[0].mpp == hi


def test_thumbnail_of_a_huge_level_is_built_in_bands_without_seams(slide, monkeypatch):
    # Force band-by-band reading (as for a level too large for memory) and compare with one piece.
    import precompute.slides as slides_mod

    with open_slide(slide) as s:
        whole = s.thumbnail(700)
        monkeypatch.setattr(slides_mod, "_THUMB_BAND_PX", W * 97)  # bands of ~97 level rows
        banded = s.thumbnail(700)
    assert banded.shape == whole.shape
    diff = np.abs(banded.astype(int) - whole.astype(int))
    # Pillow rounds filter windows per call, so an odd row may differ; a seam would shift whole bands.
    assert diff.mean() < 0.1
    assert (diff.max(axis=(1, 2)) > 2).sum() <= 0.01 * len(diff)
