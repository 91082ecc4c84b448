"""Open whole-slide images and plain images behind one small interface, and decide each slide's pixel size.

Coordinates are level-0 pixels everywhere. `Slide.read_region` follows OpenSlide's convention: the
top-left corner is given in level-0 px and the size in px of the level being read. Every read returns
(h, w, 3) uint8 RGB; transparent or out-of-bounds pixels are composited on white, so the tissue
detector and the model see the same blank background whatever the file format.

Readers: OpenSlide for whole-slide formats (SVS, NDPI, MRXS, SCN, BIF, DICOM, tiled TIFF, ...);
Pillow for plain images (PNG, JPEG, strip TIFF) that OpenSlide refuses. A plain image is decoded
once when opened (so a corrupt file fails at open, not half-way through a run) and has one level.

Pixel size (um/px), in order of precedence:
1. The file's own value: OpenSlide's `openslide.mpp-x` / `openslide.mpp-y` (their mean), or, for a
   plain TIFF, its resolution tags when their unit is centimetre or inch.
2. Else the manifest's `mpp` column for that slide.
3. Else the command-line option `--mpp` (one value for every slide that has neither).
4. Else, with `--native-resolution`, no pixel size at all: the slide is tiled at the file's own
   pixels 1:1 (a 224 px tile is 224 px of level 0, whatever `--target-mpp` says). This is
   reported as `PixelSize(mpp=None, source="native")`.
5. Else the slide is refused with a message naming these three ways to supply a value.
A value outside PLAUSIBLE_MPP (0.05-20 um/px), or not a positive number, is never used: it is
reported as a warning and the next source is tried. A manifest or `--mpp` value that disagrees
with a valid file value by more than 10 % is reported too, since the file's value wins.
"""

from __future__ import annotations

import math
import os
import stat
import warnings as _warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, ImageOps, UnidentifiedImageError

from .cohort import PLAUSIBLE_MPP  # one range for the manifest check and for file values

# Suffixes only OpenSlide can read, and suffixes only Pillow can read; anything else (.tif, .tiff,
# unknown) tries OpenSlide first and falls back to Pillow.
_WSI_ONLY = {".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
_PLAIN_ONLY = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}

# Downsample tolerance when choosing a pyramid level: levels of odd-sized images are rounded
# (boxes.tiff: 4.016 for a nominal 4x), and a 1 % upscale is invisible to a CNN.
_LEVEL_TOLERANCE = 1.01

# Above this many level pixels a thumbnail is built band by band, so a huge single-level file
# never has to fit in memory at full resolution.
_THUMB_BAND_PX = 16 * 2**20


# The tissue overview reads at most this many px of one level (~16k x 16k): beyond that a file without
# a pyramid would take minutes to hours per slide, so it is refused with how to make a pyramid.
MAX_OVERVIEW_READ_PX = 2**28


class SlideError(Exception):
    """A slide that cannot be used, with a message that names the file and what to do."""


class Slide:
    """One open slide. Level-0 px coordinates everywhere.

    Attributes:
        path: the file.
        backend: "openslide" or "image" (Pillow, one level).
        dimensions: (width, height) of level 0, px.
        level_dimensions: (width, height) of each level, finest first.
        level_downsamples: level-0 px per level px, for each level.
        file_mpp: pixel size stored in the file, um/px (None if absent; not checked for plausibility).
    """

    def __init__(self, path: Path, backend: str, reader, level_dimensions, level_downsamples,
                 file_mpp: float | None):
        self.path = path
        self.backend = backend
        self._reader = reader
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.dimensions = self.level_dimensions[0]
        self.file_mpp = file_mpp

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, file_mpp={self.file_mpp})")

    def read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Pixels of `level`, top-left at level-0 `xy`, `size` = (w, h) px of that level.

        Returns (h, w, 3) uint8 RGB; parts outside the slide are white.
        """
        if self._reader is None:
            raise SlideError(f"{self.path}: slide is closed; open it again with open_slide().")
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (levels 0-{self.level_count - 1}).")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}.")
        return self._reader.read((int(xy[0]), int(xy[1])), level, (w, h))

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample <= `downsample` (within 1 %), so reads shrink, never enlarge."""
        ds = self.level_downsamples
        fitting = [i for i, d in enumerate(ds) if d <= downsample * _LEVEL_TOLERANCE]
        return max(fitting, key=lambda i: ds[i]) if fitting else 0

    def thumbnail(self, max_px: int) -> np.ndarray:
        """The whole slide as (h, w, 3) uint8, longest side = min(max_px, longest level-0 side).

        Read from the coarsest level at least as fine as the thumbnail, then area-averaged.
        """
        if max_px < 1:
            raise ValueError(f"thumbnail size must be >= 1 px, got {max_px}.")
        W, H = self.dimensions
        scale = min(1.0, max_px / max(W, H))  # never enlarge
        out_w = min(max_px, max(1, round(W * scale)))
        out_h = min(max_px, max(1, round(H * scale)))
        level = self.best_level_for_downsample(max(W / out_w, H / out_h))
        _check_thumbnail_read(self, level)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        if (lw, lh) == (out_w, out_h):
            return self.read_region((0, 0), level, (lw, lh))
        # Output row r covers level rows [r * fy, (r + 1) * fy). Bands of output rows are read and
        # resized with Pillow's fractional `box`, so the bands join without seams or drift.
        fx, fy = lw / out_w, lh / out_h
        rows_per_band = max(1, int(_THUMB_BAND_PX / max(1, lw) / fy))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for r0 in range(0, out_h, rows_per_band):
            r1 = min(out_h, r0 + rows_per_band)
            y0 = math.floor(r0 * fy)
            y1 = min(lh, math.ceil(r1 * fy))
            band = Image.fromarray(self.read_region((0, round(y0 * ds)), level, (lw, y1 - y0)))
            box = (0.0, r0 * fy - y0, out_w * fx, r1 * fy - y0)
            out[r0:r1] = np.asarray(band.resize((out_w, r1 - r0), Image.Resampling.BOX, box=box))
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path) -> Slide:
    """Open a slide with OpenSlide, or as a plain image; any failure is a SlideError naming the file and why."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found.")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide file.")
    if not os.access(path, os.R_OK):
        raise SlideError(f"{path}: cannot be read (permission denied); check the file's permissions.")
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise SlideError(f"{path}: not a regular file (a FIFO, socket or device); give the slide file itself.")
    if st.st_size == 0:
        raise SlideError(f"{path}: file is empty (0 bytes); copy or export it again.")
    _refuse_non_brightfield(path)
    suffix = path.suffix.lower()
    reasons = []
    if suffix not in _PLAIN_ONLY:
        try:
            return _open_openslide(path)
        except (openslide.OpenSlideError, OSError, ValueError) as exc:  # incl. OpenSlideUnsupportedFormatError
            reasons.append(f"OpenSlide: {type(exc).__name__}: {exc}")
    if suffix not in _WSI_ONLY:
        try:
            return _open_image(path)
        except _ImageRefused as exc:
            raise SlideError(f"{path}: {exc}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            reasons.append(f"Pillow: {type(exc).__name__}: {exc}")
    raise SlideError(
        f"{path}: not a readable slide ({'; '.join(reasons)}). Check that the file is complete "
        f"(compare its size or checksum with the original) and in a format OpenSlide or Pillow reads.")


def _refuse_non_brightfield(path: Path) -> None:
    """SlideError for a TIFF that holds fluorescence or multiplexed channels instead of RGB brightfield:
    read as RGB it would show one channel (often DAPI) as grey and find no tissue."""
    import tifffile

    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
                return
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            grey = page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
            same = sum(1 for p in tf.pages if p.shape[:2] == page.shape[:2] and p.photometric == page.photometric)
            channels = max(page.samplesperpixel, same if grey else 1)
            dtype = page.dtype
    except Exception:  # not a TIFF tifffile can parse: OpenSlide and Pillow give the reason next
        return
    if (grey and channels > 1) or channels > 4:
        raise SlideError(
            f"{path}: a {channels}-channel fluorescence or multiplexed image ({dtype} grey channels, not RGB); "
            "Lumen explains brightfield RGB scans (H&E, IHC), and reading one channel as grey would give "
            "meaningless tiles. Give the brightfield scan of this tissue instead.")


def _check_thumbnail_read(slide: "Slide", level: int) -> None:
    """SlideError when the tissue overview would have to read a whole huge level (no pyramid)."""
    lw, lh = slide.level_dimensions[level]
    if slide.backend == "openslide" and lw * lh > MAX_OVERVIEW_READ_PX:
        raise SlideError(
            f"{slide.path}: its coarsest level is {lw} x {lh} px ({lw * lh / 1e6:,.0f} Mpx) and the file has no "
            f"lower-resolution levels, so finding the tissue would read every pixel. Convert it to a pyramidal "
            f"TIFF first, e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90` or "
            f"`bfconvert -pyramid-resolutions 6 -pyramid-scale 2 -tilex 512 -tiley 512 IN OUT.ome.tif`.")


# -- OpenSlide backend ---------------------------------------------------------------------------

def _open_openslide(path: Path) -> Slide:
    osr = openslide.OpenSlide(str(path))
    props = osr.properties
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            values.append(float(props[key]))
        except (KeyError, ValueError):
            pass
    file_mpp = float(np.mean(values)) if values else None
    return Slide(path, "openslide", _OpenSlideReader(osr, path), osr.level_dimensions,
                 osr.level_downsamples, file_mpp)


class _OpenSlideReader:
    def __init__(self, osr: openslide.OpenSlide, path: Path):
        self._osr = osr
        self._path = path

    def read(self, xy, level, size) -> np.ndarray:
        try:
            rgba = np.asarray(self._osr.read_region(xy, level, size))
        except openslide.OpenSlideError as exc:
            # OpenSlide handles stay in an error state after a failed read, so the slide is done for.
            raise SlideError(f"{self._path}: cannot read region at {xy} (level {level}, {size[0]}x{size[1]} px): "
                             f"{type(exc).__name__}: {exc}. The file is probably corrupt.") from None
        return _composite_on_white(rgba)

    def close(self) -> None:
        self._osr.close()


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 straight-alpha RGBA -> (h, w, 3) uint8 RGB over white."""
    alpha = rgba[..., 3:]
    if alpha.min() == 255:  # the usual case inside a slide: skip the arithmetic
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


# -- plain-image backend -------------------------------------------------------------------------

class _ImageRefused(Exception):
    """A readable image that cannot be used as a slide (message says why and what to do)."""


def _open_image(path: Path) -> Slide:
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not mid-run
                file_mpp = _tiff_mpp(img)
                rgb = _to_rgb(ImageOps.exif_transpose(img))  # camera JPEGs may be stored rotated
    except Image.DecompressionBombError:
        raise _ImageRefused(
            "plain image too large to decode in memory; convert it to a tiled pyramidal TIFF "
            "(e.g. `vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`) so OpenSlide reads it "
            "tile by tile.") from None
    h, w = rgb.shape[:2]
    return Slide(path, "image", _ImageReader(rgb), ((w, h),), (1.0,), file_mpp)


def _tiff_mpp(img: Image.Image) -> float | None:
    """um/px from TIFF XResolution/YResolution when ResolutionUnit is inch (2) or centimetre (3)."""
    tags = getattr(img, "tag_v2", None)
    if tags is None or 296 not in tags:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(tags[296]))
    values = [float(tags[t]) for t in (282, 283) if t in tags]
    values = [v for v in values if v > 0]
    if um_per_unit is None or not values:
        return None
    return float(np.mean([um_per_unit / v for v in values]))


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow image mode -> (h, w, 3) uint8 RGB; transparency over white, 16-bit scaled to 8-bit."""
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(np.asarray(img.convert("RGBA")))
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise _ImageRefused(f"{mode} image with values outside 0-65535; convert it to 8-bit RGB.")
        # Full 16-bit range maps linearly onto 0-255; an 8-bit image stored as "I" stays as it is.
        if mode.startswith("I;16") or (a.size and a.max() > 255):
            a = (a * 255 + 32767) // 65535
        return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        raise _ImageRefused("32-bit floating-point image; convert it to 8-bit RGB.")
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError:
        raise _ImageRefused(f"image mode {mode!r} cannot be converted to RGB; convert it to 8-bit RGB.") from None


class _ImageReader:
    def __init__(self, rgb: np.ndarray):
        self._rgb = rgb

    def read(self, xy, level, size) -> np.ndarray:
        x, y = xy
        w, h = size
        H, W = self._rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._rgb[y0:y1, x0:x1].copy()
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._rgb[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._rgb = None


# -- pixel size ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PixelSize:
    """Pixel size used to tile a slide. mpp in um/px, or None with source "native" (tile at file pixels)."""

    mpp: float | None
    source: str  # "file", "manifest", "cli" or "native"


_SOURCE_TEXT = {"file": "the file", "manifest": "the manifest's mpp column", "cli": "--mpp"}


def _plausible(v: float) -> bool:
    return math.isfinite(v) and PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1]


def resolve_pixel_size(slide_id: str, file_mpp: float | None, manifest_mpp: float | None,
                       cli_mpp: float | None, *, native: bool) -> tuple[PixelSize, list[str]]:
    """Pick a slide's pixel size by the rules in this module's docstring.

    Returns (PixelSize, warnings); raises SlideError when no usable value exists and native is False.
    """
    warnings: list[str] = []
    rejected: list[str] = []
    chosen: PixelSize | None = None
    for source, value in (("file", file_mpp), ("manifest", manifest_mpp), ("cli", cli_mpp)):
        if value is None:
            continue
        value = float(value)
        if not _plausible(value):
            text = f"{value:.4g} um/px from {_SOURCE_TEXT[source]}"
            rejected.append(text)
            warnings.append(f"slide {slide_id!r}: ignoring pixel size {text}: outside the plausible range "
                            f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px.")
            continue
        if chosen is None:
            chosen = PixelSize(value, source)
        elif chosen.source == "file" and abs(value / chosen.mpp - 1) > 0.10:
            warnings.append(f"slide {slide_id!r}: {_SOURCE_TEXT[source]} says {value:.4g} um/px but the file says "
                            f"{chosen.mpp:.4g} um/px; using the file's value.")
    if chosen is not None:
        return chosen, warnings
    if native:
        return PixelSize(None, "native"), warnings
    how = ("add an `mpp` column to the manifest (e.g. 0.5 for a 20x scan), pass `--mpp 0.5` to use one "
           "value for every slide without its own, or pass `--native-resolution` to tile at the file's own pixels.")
    if rejected:
        raise SlideError(f"slide {slide_id!r}: no usable pixel size (rejected {'; '.join(rejected)}; plausible "
                         f"range {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} um/px). To supply one, {how}")
    raise SlideError(f"slide {slide_id!r}: the pixel size (um/px) is unknown: the file does not store it and "
                     f"neither the manifest nor the command line gives it. To supply it, {how}")
