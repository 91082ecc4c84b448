"""The one image encoder: uint8 arrays or PIL images -> JPEG or PNG bytes (tile thumbnails, prototype
crops, report pictures, the dashboard's overlays and downloads). Pillow only, no torch."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_image(img: np.ndarray | Image.Image, fmt: str = "JPEG", quality: int = 85,
                 side: int | None = None, resample: Image.Resampling = Image.Resampling.BOX) -> bytes:
    """(h, w, 3|4) uint8 array or PIL image -> bytes in `fmt` ("JPEG" at `quality`, or "PNG").
    side: resize to side x side px first (with `resample`) unless it already is that size."""
    im = img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img))
    if side is not None and im.size != (side, side):
        im = im.resize((side, side), resample)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": int(quality)} if fmt.upper() in ("JPEG", "JPG") else {}))
    return buf.getvalue()
