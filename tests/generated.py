"""Generated inputs for tests that must run without ../shared: tissue-like pixels, pyramidal TIFF
slides (OpenSlide reads them as generic tiled TIFFs, pixel size from the resolution tags), PNG images
and tiles, an unreadable file, manifests and small cohorts. The one place tests make slides, images
and cohorts (the seeded models live in tests/seeded_models.py).

Every generator is seeded: a seed always gives the same pixels. Kinds of pixels:
- `slide_pixels`: white glass (245) with pink (eosin-like) and purple (haematoxylin-like) ellipses,
  dark nuclei-like dots on the tissue, Gaussian noise (the default slide).
- `blob_pixels`: glass (242) with four round pink-to-purple blobs of coarse noise (the Dask and stage
  tests' cohort, `write_blob_cohort`).
- `disc_pixels`: one stained disc in the middle of glass (240), its size a fraction of the slide's.
- `stain_blob_pixels`: small images of a few stained blobs of random colour (`write_stain_cohort`).
- `texture`: a smooth pink/purple texture filling the tile, a stand-in for an H&E tile (`tile_images`).
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
                 blobs: int = 6, radii: tuple[float, float] | None = None) -> np.ndarray:
    """(height, width, 3) uint8: glass with `blobs` pink and purple ellipses (none if not tissue),
    nuclei-like dots on the tissue and texture noise. Ellipse radii are drawn in `radii` (px), else in
    10-25 % of the height and width."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    img[:] = WHITE
    if tissue:
        yy, xx = np.mgrid[0:height, 0:width]
        margin_y, margin_x = min(60, height // 4), min(60, width // 4)
        for i in range(blobs):
            cy, cx = rng.uniform(margin_y, height - margin_y), rng.uniform(margin_x, width - margin_x)
            ry, rx = rng.uniform(*radii, size=2) if radii else rng.uniform(0.1, 0.25, size=2) * (height, width)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img[inside] = PINK if i % 2 == 0 else PURPLE
        dots = rng.random((height, width)) < 0.02
        img[dots & (img[..., 0] < 240)] = (70, 30, 110)
    img += rng.normal(0, 6 if tissue else 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def blob_pixels(seed: int, side: int = 512, tissue: bool = True) -> np.ndarray:
    """(side, side, 3) uint8: glass (242) with four round pink-to-purple blobs of coarse noise (none if
    not tissue)."""
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), 242, np.uint8)
    if tissue:
        yy, xx = np.mgrid[0:side, 0:side]
        for _ in range(4):
            cy, cx, r = rng.integers(side // 5, 4 * side // 5, 2).tolist() + [int(rng.integers(side // 6, side // 3))]
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            colour = np.array([200, 80 + rng.integers(0, 60), 170 + rng.integers(0, 40)])
            noise = rng.integers(-30, 30, (side, side, 3))
            img[blob] = np.clip(colour + noise[blob], 0, 255)
    return img


def disc_pixels(seed: int, size: int = 256, blob: float = 0.4) -> np.ndarray:
    """(size, size, 3) uint8: one stained disc of radius blob * size in the middle of glass (240)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 240, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * blob) ** 2
    img[disc] = (rng.integers(0, 60, (int(disc.sum()), 3)) + np.array([150, 60, 140])).astype(np.uint8)
    return img


def stain_blob_pixels(rng: np.random.Generator, side: int) -> np.ndarray:
    """(side, side, 3) uint8: 3 to 6 round blobs of random stain colour and size on glass (245), drawn
    from `rng` (one image after the other from the same generator)."""
    yy, xx = np.mgrid[0:side, 0:side]
    img = np.full((side, side, 3), 245.0)
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0, side, 2)
        r = rng.uniform(10, 40)
        colour = np.array([rng.uniform(120, 230), rng.uniform(30, 120), rng.uniform(120, 220)])
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[blob] = colour + rng.normal(0, 12, (int(blob.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def texture(side: int, seed: int) -> np.ndarray:
    """(side, side, 3) uint8: a smooth pink/purple texture with noise (stands in for an H&E tile)."""
    rng = np.random.default_rng(seed)
    low = rng.random((side // 16 + 2, side // 16 + 2))
    big = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)) / 255.0
    pink, purple = np.array([230, 160, 200]), np.array([110, 60, 150])
    img = pink * (1 - big[..., None]) + purple * big[..., None] + rng.normal(0, 12, (side, side, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiff(path: Path, img: np.ndarray, mpp: float | None = MPP, factors: tuple[int, ...] = (1, 4),
               tile: int = 128, compression: str | None = "zlib", nearest: bool = False) -> Path:
    """Tiled TIFF pyramid of `img` (one level per downsample factor: box mean, or every factor-th pixel
    when `nearest`), with its pixel size in the resolution tags (`mpp=None`: no resolution tags, so the
    file carries no pixel size)."""
    with tifffile.TiffWriter(path) as tif:
        for factor in factors:
            if factor == 1:
                level = img
            else:
                level = img[::factor, ::factor] if nearest else np.asarray(Image.fromarray(img).reduce(factor))
            res = {} if mpp is None else {"resolution": (1e4 / mpp / factor,) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), compression=compression, photometric="rgb",
                      subfiletype=0 if factor == 1 else 1, metadata=None, **res)
    return path


def write_slide(path: Path, seed: int, width: int = 768, height: int = 512, mpp: float | None = MPP,
                tissue: bool = True, factors: tuple[int, ...] = (1, 4), blobs: int = 6,
                radii: tuple[float, float] | None = None) -> Path:
    """A generated pyramidal slide (see `slide_pixels` and `write_tiff`)."""
    return write_tiff(path, slide_pixels(seed, width, height, tissue, blobs, radii), mpp, factors)


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


def write_blob_slide(path: Path, seed: int, side: int = 512, mpp: float = MPP, tissue: bool = True) -> Path:
    """A two-level (1, 1/4 by every 4th pixel) uncompressed tiled TIFF of `blob_pixels`."""
    return write_tiff(path, blob_pixels(seed, side, tissue), mpp, (1, 4), compression=None, nearest=True)


def write_blob_cohort(folder: Path, n_slides: int = 5, blank: bool = True, broken: bool = True) -> Path:
    """n_slides `write_blob_slide` slides s0.. (seed i, diagnoses alternating normal, tumour), plus one
    blank slide and one unreadable file when asked; returns the manifest (slide_id, path, diagnosis)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"slide_id": f"s{i}", "path": str(write_blob_slide(folder / f"s{i}.tiff", seed=i)),
             "diagnosis": "tumour" if i % 2 else "normal"} for i in range(n_slides)]
    if blank:
        rows.append({"slide_id": "blank", "path": str(write_blob_slide(folder / "blank.tiff", 99, tissue=False)),
                     "diagnosis": "normal"})
    if broken:
        rows.append({"slide_id": "broken", "path": str(write_broken(folder / "broken.tiff")), "diagnosis": "tumour"})
    return write_manifest(folder / "manifest.csv", rows)


def write_disc_slide(path: Path, *, size: int = 256, mpp: float | None = MPP, blob: float = 0.4, seed: int = 0,
                     pyramid: bool = True) -> Path:
    """A tiled TIFF (64-px tiles, deflate) of `disc_pixels`, with a 1/4 level (every 4th pixel) if asked."""
    return write_tiff(path, disc_pixels(seed, size, blob), mpp, (1, 4) if pyramid else (1,), tile=64, nearest=True)


def write_stain_cohort(folder: Path, n_slides: int = 8, side: int = 128, seed: int = 3) -> Path:
    """n_slides PNG images s0.. of `stain_blob_pixels` (side x side px, one generator seeded `seed`),
    2 per patient, diagnoses alternating normal, tumour; the manifest's paths are relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_slides):
        Image.fromarray(stain_blob_pixels(rng, side)).save(folder / f"s{i}.png")
        rows.append({"slide_id": f"s{i}", "path": f"s{i}.png", "diagnosis": "tumour" if i % 2 else "normal",
                     "patient": f"p{i // 2}"})
    return write_manifest(folder / "manifest.csv", rows)


def png_tile(folder: Path, slide_id: str, x: int, y: int, px: int) -> np.ndarray:
    """(px, px, 3) uint8 pixels at (x, y) of the generated PNG folder/slide_id.png (native resolution)."""
    img = np.asarray(Image.open(folder / f"{slide_id}.png").convert("RGB"))
    return img[y:y + px, x:x + px]


def tile_images(n: int, real: Path | None = None) -> list[np.ndarray]:
    """n RGB tiles (224 px): every 4th PNG of the folder `real` when it exists, else seeded textures."""
    if real is not None and real.is_dir():
        files = sorted(real.glob("*.png"))[::4][:n]
        return [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return [texture(224, seed) for seed in range(n)]


def write_tile_folder(folder: Path, tiles: list[np.ndarray], side: int | None = None) -> Path:
    """A folder of PNG "slides" tile0.png.. (each one tile, resized to side px when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(tiles):
        im = Image.fromarray(img)
        if side is not None:
            im = im.resize((side, side), Image.BICUBIC)
        im.save(folder / f"tile{i}.png")
    return folder


def write_mosaic(folder: Path, tiles: list[np.ndarray], side: int) -> Path:
    """A folder with one side x side PNG "slide", mosaic.png: the 224-px tiles repeated row by row."""
    folder.mkdir(parents=True, exist_ok=True)
    per_row = -(-side // 224)
    rows = [np.concatenate([tiles[(r * per_row + c) % len(tiles)] for c in range(per_row)], axis=1)
            for r in range(per_row)]
    Image.fromarray(np.concatenate(rows, axis=0)[:side, :side]).save(folder / "mosaic.png")
    return folder
