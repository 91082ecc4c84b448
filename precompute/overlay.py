"""Slide images: cluster map, soft concept maps and model-output maps laid over the thumbnail.

Shared by the atlas's readers: the dashboard's slide viewer and the HTML meeting report.

Geometry: level-0 px = thumbnail px * thumb_downsample; cluster-map cell (i, j) covers level-0
[j * cell_l0, (j+1) * cell_l0) x [i * cell_l0, (i+1) * cell_l0). Everything is numpy + PIL.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .colors import concept_lut, rgb, viridis
from .images import encode_image


def grid_to_thumb(grid: np.ndarray, cell_l0: float, thumb_downsample: float, size: tuple[int, int],
                  resample=Image.NEAREST) -> np.ndarray:
    """Resample a cell grid (gh, gw[, C]) uint8 onto the thumbnail raster of `size` = (w, h)."""
    gh, gw = grid.shape[:2]
    scale = float(cell_l0) / float(thumb_downsample)  # thumbnail px per cell
    w, h = size
    full = (max(1, round(gw * scale)), max(1, round(gh * scale)))
    img = Image.fromarray(grid).resize(full, resample)
    canvas = Image.new(img.mode, (w, h))
    canvas.paste(img.crop((0, 0, min(w, full[0]), min(h, full[1]))), (0, 0))
    return np.asarray(canvas)


def blend(base: np.ndarray, rgba: np.ndarray, opacity: float) -> np.ndarray:
    """base (h,w,3) uint8 under rgba (h,w,4) uint8 scaled by `opacity` in [0, 1] -> (h,w,3) uint8."""
    over = rgba.copy()
    over[..., 3] = (rgba[..., 3].astype(np.uint16) * round(float(opacity) * 256)) >> 8  # alpha x opacity
    # Pillow's alpha compositing in C: the same pixels as the integer formula in numpy, 3x faster on a view
    under = Image.fromarray(np.ascontiguousarray(base), "RGB").convert("RGBA")
    return np.asarray(Image.alpha_composite(under, Image.fromarray(over, "RGBA")).convert("RGB"))


def hard_rgba(hard: np.ndarray, k: int) -> np.ndarray:
    """(gh, gw) uint8 hard map (0 = no tissue, j+1 = concept j) -> (gh, gw, 4) RGBA, no tissue transparent."""
    return concept_lut(k)[np.minimum(hard, k)]


def soft_rgba(soft: np.ndarray, vmax: float, color: str) -> np.ndarray:
    """One concept's soft map (gh, gw) -> RGBA in the concept's colour, opacity = weight / vmax."""
    a = np.clip(np.nan_to_num(soft.astype(np.float32)) / (vmax if vmax > 0 else 1.0), 0, 1)
    out = np.zeros(soft.shape + (4,), np.uint8)
    out[..., :3] = rgb(color)
    out[..., 3] = (a * 255).round().astype(np.uint8)
    return out


def tile_value_grid(x: np.ndarray, y: np.ndarray, tile_l0: float, values: np.ndarray,
                    thumb_downsample: float, shape: tuple[int, int]) -> np.ndarray:
    """Mean of per-tile `values` over the thumbnail raster (h, w) (overlaps averaged; NaN = no tile)."""
    h, w = shape
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.int32)
    s = float(thumb_downsample)
    x0 = np.clip(np.floor(x / s).astype(int), 0, w)
    y0 = np.clip(np.floor(y / s).astype(int), 0, h)
    x1 = np.clip(np.ceil((x + tile_l0) / s).astype(int), 0, w)
    y1 = np.clip(np.ceil((y + tile_l0) / s).astype(int), 0, h)
    for a, b, c, d, v in zip(y0, y1, x0, x1, values):
        acc[a:b, c:d] += v
        cnt[a:b, c:d] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / cnt, np.nan)


def value_rgba(grid: np.ndarray, vrange: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """(h, w) float (NaN = transparent) -> viridis RGBA."""
    lo, hi = vrange
    out = np.zeros(grid.shape + (4,), np.uint8)
    out[..., :3] = viridis((grid - lo) / (hi - lo if hi > lo else 1.0))
    out[..., 3] = np.where(np.isfinite(grid), 255, 0).astype(np.uint8)
    return out


def encode(img: np.ndarray, fmt: str = "JPEG", quality: int = 88) -> bytes:
    """uint8 image -> JPEG (quality 88 unless given) or PNG bytes."""
    return encode_image(img, fmt, quality)


def upscale(img: np.ndarray, width: int) -> np.ndarray:
    """Nearest-neighbour upscale of a small grid image to about `width` px wide (for display)."""
    h, w = img.shape[:2]
    f = max(1, width // max(w, 1))
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def label_font(size: int):
    """(font, has µ): DejaVu Sans Bold when the system has it, else Pillow's built-in font (no µ glyph)."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size), True
    except OSError:
        return ImageFont.load_default(size=size), False


def annotate_view(img: np.ndarray, outline: tuple[float, float, float] | None, bar_px: float,
                  bar_label: str) -> np.ndarray:
    """Copy of a viewer image (h, w, 3) with a tile outlined (left, top, side in image px; black inside
    white, visible on any stain) and a scale bar at the bottom centre (the part every screen shows)."""
    from PIL import ImageDraw

    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    if outline is not None:
        u, v, side = outline
        d.rectangle((u - 3, v - 3, u + side + 2, v + side + 2), outline="white", width=3)
        d.rectangle((u - 1, v - 1, u + side, v + side), outline="black", width=3)
    h, w = img.shape[:2]
    font, micro = label_font(17)
    bar_label = bar_label if micro else bar_label.replace("µ", "u")
    x0, y = w / 2 - bar_px / 2, h - 34
    d.rectangle((x0 - 4, y - 4, x0 + bar_px + 4, y + 6), fill="white")
    d.rectangle((x0, y - 1, x0 + bar_px, y + 3), fill="black")
    d.text((w / 2, y - 8), bar_label, fill="black", font=font, anchor="mb", stroke_width=3, stroke_fill="white")
    return np.asarray(im)


def legend_png(img: np.ndarray, kind: str, payload, title: str) -> bytes:
    """PNG of an image (h, w, 3) with a title and a legend strip under it. kind/payload as the slide page's
    legend: 'chips' [(label, colour)], 'ramp1' (name, colour), 'ramp' (lo, hi, caption)."""
    from PIL import ImageDraw

    h, w = img.shape[:2]
    font, micro = label_font(15)
    title = title if micro else title.replace("µ", "u")
    sheet = Image.new("RGB", (w, h + 64), "white")
    sheet.paste(Image.fromarray(img), (0, 0))
    d = ImageDraw.Draw(sheet)
    d.text((8, h + 4), title, fill="black", font=font)
    x, y = 8, h + 34
    if kind == "chips":
        for label, color in payload:
            d.rectangle((x, y, x + 16, y + 16), fill=rgb(color), outline="black")
            d.text((x + 22, y - 1), label, fill="black", font=font)
            x += 34 + int(d.textlength(label, font=font))
    else:
        if kind == "ramp1":
            name, color = payload
            lo, hi, cap = "0", "top prototype weight", f"{name} weight"
            t = np.linspace(0, 1, 200)[:, None]
            strip = (255 * (1 - t) + np.array(rgb(color), np.float32) * t).astype(np.uint8)
        else:
            lo, hi, cap = payload
            strip = viridis(np.linspace(0, 1, 200))
        d.text((x, y - 1), f"{cap}: {lo}", fill="black", font=font)
        x += 12 + int(d.textlength(f"{cap}: {lo}", font=font))
        sheet.paste(Image.fromarray(np.repeat(strip[None], 16, axis=0)), (x, y))
        d.text((x + 208, y - 1), hi, fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def tile_with_cell(jpeg: bytes, cell_y: int, cell_x: int, grid: tuple[int, int], size: int = 150) -> np.ndarray:
    """A tile thumbnail enlarged to `size` px with map cell (cell_y, cell_x) of its (gh, gw) grid outlined."""
    from PIL import ImageDraw

    im = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((size, size), Image.BILINEAR)
    gh, gw = grid
    ch, cw = size / gh, size / gw
    d = ImageDraw.Draw(im)
    box = (cell_x * cw, cell_y * ch, (cell_x + 1) * cw - 1, (cell_y + 1) * ch - 1)
    d.rectangle(box, outline="white", width=4)
    d.rectangle(box, outline="black", width=2)
    return np.asarray(im)
