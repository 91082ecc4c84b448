"""Small atlases built without ../shared: generated pyramidal TIFF slides run through
`python -m precompute run` with the tiny seeded model `seeded_models:tiny_cnn` (a few seconds).

Each slide is `generated.write_slide`'s 768 x 512 px at 0.5 um/px (pink and purple ellipses of 50 to
130 px radii on glass), a tiled TIFF with a 1/4 level.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from generated import write_manifest, write_slide

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
RADII = (50, 130)  # px: the ellipses of the atlas's slides


def cli_env() -> dict:
    """Environment for `python -m precompute` that finds the tiny model (tests/ on the path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


def build_tiny_atlas(folder: Path, n_slides: int = 3, k: int = 3) -> Path:
    """folder/atlas.h5 from `n_slides` generated slides (diagnoses alternate 'benign', 'malignant')."""
    folder.mkdir(parents=True, exist_ok=True)
    atlas = folder / "atlas.h5"
    if atlas.exists():
        return atlas
    rows = [{"slide_id": f"s{i}", "path": str(write_slide(folder / f"slide{i}.tiff", seed=i, radii=RADII)),
             "diagnosis": "benign" if i % 2 == 0 else "malignant", "patient": f"p{i}"} for i in range(n_slides)]
    manifest = write_manifest(folder / "manifest.csv", rows)
    proc = subprocess.run(
        [sys.executable, "-m", "precompute", "run", "--cohort", str(manifest), "--model", "seeded_models:tiny_cnn",
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
