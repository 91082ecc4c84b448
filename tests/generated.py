"""Generated inputs for tests that must run without ../shared: tissue-like pixels, pyramidal TIFF
slides (OpenSlide reads them as generic tiled TIFFs, pixel size from the resolution tags), an
unreadable file, manifests and small cohorts. The one place tests make slides and cohorts.

Pixels: white glass (245) with pink (eosin-like) and purple (haematoxylin-like) ellipses, dark
nuclei-like dots on the tissue, Gaussian noise; seeded, so a seed always gives the same slide.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

MPP = 0.5
PINK, PURPLE, WHITE = (232, 150, 190), (120, 60, 150), (245, 245, 245)
BROKEN_BYTES = b"II*\x00" + b"\x00" * 64  # a TIFF header with nothing behind it


def slide_pixels(seed: int, width: int = 768, height: int = 512, tissue: bool = True,
                 blobs: int = 6) -> np.ndarray:
    """(height, width, 3) uint8: glass with `blobs` pink and purple ellipses (none if not tissue),
    nuclei-like dots on the tissue and texture noise."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    img[:] = WHITE
    if tissue:
        yy, xx = np.mgrid[0:height, 0:width]
        margin_y, margin_x = min(60, height // 4), min(60, width // 4)
        for i in range(blobs):
            cy, cx = rng.uniform(margin_y, height - margin_y), rng.uniform(margin_x, width - margin_x)
            ry, rx = rng.uniform(0.1, 0.25, size=2) * (height, width)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img[inside] = PINK if i % 2 == 0 else PURPLE
        dots = rng.random((height, width)) < 0.02
        img[dots & (img[..., 0] < 240)] = (70, 30, 110)
    img += rng.normal(0, 6 if tissue else 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiff(path: Path, img: np.ndarray, mpp: float | None = MPP, factors: tuple[int, ...] = (1, 4),
               tile: int = 128) -> Path:
    """Tiled TIFF pyramid of `img` (one level per downsample factor, deflate), with its pixel size in
    the resolution tags (`mpp=None`: no resolution tags, so the file carries no pixel size)."""
    with tifffile.TiffWriter(path) as tif:
        for factor in factors:
            level = img if factor == 1 else np.asarray(Image.fromarray(img).reduce(factor))
            res = {} if mpp is None else {"resolution": (1e4 / mpp / factor,) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), compression="zlib", photometric="rgb",
                      subfiletype=0 if factor == 1 else 1, metadata=None, **res)
    return path


def write_slide(path: Path, seed: int, width: int = 768, height: int = 512, mpp: float | None = MPP,
                tissue: bool = True, factors: tuple[int, ...] = (1, 4), blobs: int = 6) -> Path:
    """A generated pyramidal slide (see `slide_pixels` and `write_tiff`)."""
    return write_tiff(path, slide_pixels(seed, width, height, tissue, blobs), mpp, factors)


def write_broken(path: Path) -> Path:
    """A file with a slide's name that no reader can open (a TIFF header and nothing else)."""
    path.write_bytes(BROKEN_BYTES)
    return path


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """CSV manifest with the columns of the first row (slide_id, path, ...)."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_cohort(folder: Path, n_slides: int = 5, blank: bool = True, broken: bool = True,
                 diagnoses: tuple[str, str] = ("normal", "tumour"), side: int = 512) -> Path:
    """n_slides tissue slides (side x side px, diagnoses alternating, two slides per patient), plus
    one blank slide and one unreadable file when asked; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"slide_id": f"s{i}", "path": str(write_slide(folder / f"s{i}.tiff", i, side, side)),
             "diagnosis": diagnoses[i % 2], "patient": f"p{i // 2}"} for i in range(n_slides)]
    if blank:
        rows.append({"slide_id": "blank", "diagnosis": diagnoses[0], "patient": "pb",
                     "path": str(write_slide(folder / "blank.tiff", 99, side, side, tissue=False))})
    if broken:
        rows.append({"slide_id": "broken", "path": str(write_broken(folder / "broken.tiff")),
                     "diagnosis": diagnoses[1], "patient": "pb"})
    return write_manifest(folder / "manifest.csv", rows)


def write_review_cohort(folder: Path) -> Path:
    """The 11-slide review cohort of the dashboard tests, generated: 4 benign + 4 malignant images
    (two patients, four subtypes), 'cmu' (squamous, a larger slide of 30 tiles), 'small' (squamous, blank and
    smaller than one tile: ends as "no tissue") and 'broken' (broken.svs, unreadable: ends as "failed")."""
    folder.mkdir(parents=True, exist_ok=True)
    subtypes = {"benign": ("adenosis", "fibroadenoma"), "malignant": ("ductal_carcinoma", "lobular_carcinoma")}
    rows = []
    for d, diagnosis in enumerate(("benign", "malignant")):
        for i in range(4):
            sid = f"{diagnosis[0]}{i}"
            path = write_slide(folder / f"{sid}.tiff", seed=10 * d + i, width=448, height=448)
            rows.append({"slide_id": sid, "path": str(path), "diagnosis": diagnosis,
                         "subtype": subtypes[diagnosis][i // 2], "patient": f"{diagnosis}-{i // 2}"})
    cmu = write_slide(folder / "cmu.tiff", seed=7, width=1344, height=1120, blobs=14)  # 6 x 5 tiles, ~75 % tissue
    small = write_slide(folder / "small.tiff", seed=8, width=96, height=96, tissue=False, factors=(1,))
    for sid, path in (("cmu", cmu), ("small", small), ("broken", write_broken(folder / "broken.svs"))):
        rows.append({"slide_id": sid, "path": str(path), "diagnosis": "squamous", "subtype": "epithelium",
                     "patient": "cmu"})
    return write_manifest(folder / "manifest.csv", rows)
