"""Small atlases built without ../shared: generated pyramidal TIFF slides run through
`python -m precompute run` with the tiny seeded model of tests/lumen_tiny.py (a few seconds).

Each slide is 768 x 512 px at 0.5 um/px: white background with pink (eosin-like) and purple
(haematoxylin-like) tissue regions of random shape, stored as a tiled TIFF with a 1/4 level,
which OpenSlide reads as a generic tiled TIFF with its pixel size from the resolution tags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from generated import write_tiff

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SLIDE_W, SLIDE_H, MPP = 768, 512, 0.5
PINK, PURPLE, WHITE = (232, 150, 190), (120, 60, 150), (245, 245, 245)


def slide_pixels(seed: int) -> np.ndarray:
    """(SLIDE_H, SLIDE_W, 3) uint8: background with a few pink and purple blobs plus texture noise."""
    rng = np.random.default_rng(seed)
    img = np.empty((SLIDE_H, SLIDE_W, 3), np.float32)
    img[:] = WHITE
    yy, xx = np.mgrid[0:SLIDE_H, 0:SLIDE_W]
    for i in range(6):
        cy, cx = rng.uniform(60, SLIDE_H - 60), rng.uniform(60, SLIDE_W - 60)
        ry, rx = rng.uniform(50, 130, size=2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[inside] = PINK if i % 2 == 0 else PURPLE
    dots = rng.random((SLIDE_H, SLIDE_W)) < 0.02
    img[dots & (img[..., 0] < 240)] = (70, 30, 110)  # nuclei-like dots on tissue
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_slide(path: Path, seed: int) -> Path:
    """Pyramidal tiled TIFF (levels 1 and 1/4, 128-px tiles, deflate) with its pixel size."""
    return write_tiff(path, slide_pixels(seed), mpp=MPP)


def cli_env() -> dict:
    """Environment for `python -m precompute` that finds the tiny model (tests/ on the path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


def build_tiny_atlas(folder: Path, n_slides: int = 3, k: int = 3) -> Path:
    """folder/atlas.h5 from `n_slides` generated slides (diagnoses alternate 'benign', 'malignant')."""
    folder.mkdir(parents=True, exist_ok=True)
    atlas = folder / "atlas.h5"
    if atlas.exists():
        return atlas
    rows = ["slide_id,path,diagnosis,patient"]
    for i in range(n_slides):
        path = write_slide(folder / f"slide{i}.tiff", seed=i)
        rows.append(f"s{i},{path},{'benign' if i % 2 == 0 else 'malignant'},p{i}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "precompute", "run", "--cohort", str(manifest), "--model", "lumen_tiny:factory",
         "--out", str(atlas), "--k", str(k), "--workers", "0", "--calib-tiles", "24", "--k-grid", "",
         "--no-progress", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0 and atlas.exists(), proc.stdout + proc.stderr
    return atlas


@pytest.fixture(scope="session")
def tiny_atlas(tmp_path_factory) -> Path:
    """A 3-slide atlas of generated slides and the tiny model (built once per session, no ../shared;
    LUMEN_TINY_TEST_ATLAS=/path/atlas.h5 reuses one built by `build_tiny_atlas` while iterating)."""
    given = os.environ.get("LUMEN_TINY_TEST_ATLAS")
    if given:
        return Path(given)
    return build_tiny_atlas(tmp_path_factory.getbasetemp() / "tiny-atlas")
