"""Slide pixels for the viewer: read from the original slide (OpenSlide, or Pillow for plain images,
through precompute.slides) when its file is reachable, else from the thumbnail stored in the atlas.

`Pixels.render(view)` returns the RENDER_W x VIEW_H screen px of a `viewport.View`: each screen px
shows level-0 point x0 + (u + 0.5) s (see dashboard/viewport.py). Reads use the coarsest pyramid
level at least as fine as the view (never upscaled from a coarser level), and the stored thumbnail
whenever the view is no finer than it (the same pixels, already in memory). Outside the slide: white.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from precompute.slides import Slide, SlideError, open_slide

from .viewport import RENDER_W, VIEW_H, View


@dataclass
class Pixels:
    """One slide's pixel source. `slide` is None when the original file cannot be opened (`why` says why);
    thumbnail (h, w, 3) uint8 with thumb_ds level-0 px per px; width, height: level-0 size."""

    thumbnail: np.ndarray
    thumb_ds: float
    width: float
    height: float
    slide: Slide | None = None
    why: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, path: str, thumbnail: np.ndarray, thumb_ds: float, width: float, height: float) -> "Pixels":
        """Try the original file at `path`; fall back to the thumbnail, recording why."""
        slide, why = None, ""
        try:
            slide = open_slide(Path(path))
        except SlideError as exc:
            why = str(exc)
        except Exception as exc:  # noqa: BLE001 - any reader failure means "use the thumbnail"
            why = f"{path}: {type(exc).__name__}: {exc}"
        return cls(thumbnail, float(thumb_ds), float(width), float(height), slide, why)

    def source(self, view: View) -> tuple[str, int | None, float]:
        """('slide' or 'thumbnail', pyramid level or None, its level-0 px per px) used for `view`."""
        if self.slide is None or view.s >= self.thumb_ds * 0.999:
            return "thumbnail", None, self.thumb_ds
        level = self.slide.best_level_for_downsample(view.s)
        return "slide", level, self.slide.level_downsamples[level]

    def render(self, view: View, w: int = RENDER_W, h: int = VIEW_H) -> np.ndarray:
        """(h, w, 3) uint8: the slide around the view's centre, one screen px = view.s level-0 px."""
        kind, level, ds = self.source(view)
        x0, y0, x1, y1 = view.box(w, h)
        canvas = Image.new("RGB", (w, h), "white")
        # the part of the box on the slide, in level-0 px, and where it lands on the canvas; a thumbnail
        # can cover less than the slide's stated size (rounding, or an atlas from another reader): white there
        right, bottom = self.width, self.height
        if kind == "thumbnail":
            right, bottom = min(right, self.thumbnail.shape[1] * ds), min(bottom, self.thumbnail.shape[0] * ds)
        bx0, by0 = max(x0, 0.0), max(y0, 0.0)
        bx1, by1 = min(x1, right), min(y1, bottom)
        if bx1 <= bx0 or by1 <= by0:
            return np.asarray(canvas)
        u0, v0 = (bx0 - x0) / view.s, (by0 - y0) / view.s
        u1, v1 = (bx1 - x0) / view.s, (by1 - y0) / view.s
        dest = (round(u0), round(v0), max(round(u0) + 1, round(u1)), max(round(v0) + 1, round(v1)))
        # source box in the source's own px, widened to whole px and read with Pillow's fractional box
        if kind == "thumbnail":
            img = Image.fromarray(self.thumbnail)
            sx0, sy0 = bx0 / ds, by0 / ds
            src_box = (sx0, sy0, bx1 / ds, by1 / ds)
        else:
            lx0, ly0 = math.floor(bx0 / ds), math.floor(by0 / ds)
            lx1, ly1 = math.ceil(bx1 / ds), math.ceil(by1 / ds)
            with self._lock:  # one reader handle per slide; reads are short
                region = self.slide.read_region((round(lx0 * ds), round(ly0 * ds)), level,
                                                (max(1, lx1 - lx0), max(1, ly1 - ly0)))
            img = Image.fromarray(region)
            src_box = (bx0 / ds - lx0, by0 / ds - ly0, bx1 / ds - lx0, by1 / ds - ly0)
        size = (dest[2] - dest[0], dest[3] - dest[1])
        resample = Image.Resampling.NEAREST if ds / view.s >= 1.5 else Image.Resampling.BILINEAR
        canvas.paste(img.resize(size, resample, box=src_box), dest[:2])
        return np.asarray(canvas)

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()
