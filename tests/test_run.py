"""`precompute run` end to end as a user runs it (subprocess, CPU): cohort mistakes and mixed cohorts on
generated slides; facts about the real CMU and BreakHis runs with ../shared/data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from PIL import Image

from conftest import DATA, REPO, run_cli
from generated import slide_pixels, write_broken, write_manifest, write_slide
from precompute.store import Atlas


def _events(atlas: Path) -> list[dict]:
    log = atlas.with_name(atlas.name + ".log.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()]


def _manifest(tmp_path: Path, rows: list[tuple[str, str, str]], extra_header: str = "") -> Path:
    path = tmp_path / "manifest.csv"
    lines = ["slide_id,path,diagnosis" + extra_header] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A generated 768 x 512 px pyramidal TIFF that carries its pixel size (0.5 um/px)."""
    return write_slide(tmp_path_factory.mktemp("run") / "gen.tiff", seed=1)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A generated plain (strip) TIFF without a pixel size: read by the image fallback."""
    path = tmp_path_factory.mktemp("plain") / "plain.tif"
    Image.fromarray(slide_pixels(2, 448, 448)).save(path)
    return path


def test_cmu_slide_end_to_end(cmu_atlas):
    with Atlas(cmu_atlas) as atlas:
        slides = atlas.slides()
        assert list(slides["status"]) == ["ok"]
        assert slides["mpp_source"][0] == "file"
        assert abs(slides["mpp"][0] - 0.499) < 0.01
        n = atlas.n_tiles
        # ~40 % tissue on a 2220 x 2967 slide in 224-px tiles at ~0.5 um/px: a few dozen tiles
        assert 20 <= n <= 130, n
        t = atlas.tiles(["x", "y", "embedding", "outputs", "probs"])
        w, h = slides["width"][0], slides["height"][0]
        tile_l0 = slides["tile_l0"][0]
        assert (t["x"] >= 0).all() and (t["x"] + tile_l0 <= w + 1).all()
        assert (t["y"] >= 0).all() and (t["y"] + tile_l0 <= h + 1).all()
        assert t["embedding"].shape == (n, 1024) and t["embedding"].dtype == np.float16
        assert (t["embedding"] >= 0).all()  # post-ReLU DenseNet features
        assert t["outputs"].shape == (n, 24)
        np.testing.assert_allclose(t["probs"].sum(axis=1), 1.0, rtol=1e-4)
        # squamous epithelium and stroma: the demo model should mostly see tissue classes, not background
        names = atlas.output_names
        top = [names[i] for i in t["probs"].argmax(axis=1)]
        assert sum(name != "BACK" for name in top) > n / 2
        thumbs = atlas.thumbnails([0, n - 1])
        assert all(b[:2] == b"\xff\xd8" for b in thumbs)  # JPEG
    events = _events(cmu_atlas)
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    assert events[-1]["exit_code"] == 0


@pytest.mark.slow
def test_mixed_cohort_reports_broken_and_empty_slides(slide, plain, tmp_path):
    """An unreadable file fails with its reason, a slide smaller than a tile ends with 0 tiles, a plain
    TIFF goes through the image fallback at native resolution; the exit code says 'finished with failures'."""
    small = write_slide(tmp_path / "small.tiff", 3, 96, 96, tissue=False, factors=(1,))
    manifest = _manifest(tmp_path, [("gen", str(slide), "normal"), ("small", str(small), "normal"),
                                    ("plain", str(plain), "kidney"),
                                    ("broken", str(write_broken(tmp_path / "broken.svs")), "normal")])
    out = tmp_path / "atlas.h5"
    proc = run_cli("run", "--cohort", str(manifest), "--model", "capricorn-crc", "--out", str(out),
                   "--native-resolution", "--min-tissue", "0.05", "--workers", "1", "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert "broken" in proc.stderr and "failed" in proc.stderr
    with Atlas(out) as atlas:
        sl = atlas.slides()
        status = dict(zip(sl["slide_id"], sl["status"]))
        assert status == {"gen": "ok", "small": "no_tissue", "plain": "ok", "broken": "failed"}
        i = list(sl["slide_id"]).index("broken")
        assert "broken.svs" in sl["error"][i] and "not a readable slide" in sl["error"][i]
        assert sl["n_tiles"][list(sl["slide_id"]).index("small")] == 0
        j = list(sl["slide_id"]).index("plain")
        assert sl["mpp_source"][j] == "native" and sl["n_tiles"][j] == 4  # 448 px: 2 x 2 tiles of 224 file px
        assert sl["mpp_source"][list(sl["slide_id"]).index("gen")] == "file"
    failed = [e for e in _events(out) if e["event"] == "slide_failed"]
    assert {e["slide_id"] for e in failed} == {"broken"}


@pytest.mark.slow
def test_missing_pixel_size_fails_that_slide_with_advice(slide, plain, tmp_path):
    manifest = _manifest(tmp_path, [("gen", str(slide), "a"), ("plain", str(plain), "b")])
    out = tmp_path / "atlas.h5"
    proc = run_cli("run", "--cohort", str(manifest), "--model", "capricorn-crc", "--out", str(out),
                   "--workers", "0", "--no-progress")
    assert proc.returncode == 1
    with Atlas(out) as atlas:
        sl = atlas.slides()
        assert dict(zip(sl["slide_id"], sl["status"])) == {"gen": "ok", "plain": "failed"}
        err = sl["error"][list(sl["slide_id"]).index("plain")]
        assert "--mpp" in err and "--native-resolution" in err


@pytest.mark.parametrize("rows,expect", [
    ([], "no slides"),
    ([("a", "missing.svs", "x")], "row 2"),
])
def test_bad_manifest_rejected_before_any_work(tmp_path, rows, expect):
    manifest = _manifest(tmp_path, rows)
    out = tmp_path / "atlas.h5"
    proc = run_cli("run", "--cohort", str(manifest), "--model", "capricorn-crc", "--out", str(out))
    assert proc.returncode == 2
    assert expect in proc.stderr.lower().replace("\n", " ") or expect in proc.stderr
    assert not out.exists() and not out.with_name("atlas.h5.parts").exists()


def test_duplicate_ids_name_both_rows(tmp_path, slide):
    manifest = _manifest(tmp_path, [("a", str(slide), "x"), ("b", str(slide), "x"), ("a", str(slide), "y")])
    proc = run_cli("run", "--cohort", str(manifest), "--model", "capricorn-crc", "--out", str(tmp_path / "o.h5"))
    assert proc.returncode == 2
    assert "rows 2 and 4" in proc.stderr and "duplicate" in proc.stderr


def test_wrong_layer_fails_before_reading_slides_with_suggestions(tmp_path, slide):
    manifest = _manifest(tmp_path, [("gen", str(slide), "x")])
    proc = run_cli("run", "--cohort", str(manifest), "--model", "capricorn-crc", "--layer", "features.norm6",
                   "--out", str(tmp_path / "o.h5"))
    assert proc.returncode == 2
    assert "features.norm5" in proc.stderr
    assert not (tmp_path / "o.h5.parts").exists()


def test_layers_command_lists_shapes():
    proc = run_cli("layers", "--model", "capricorn-crc")
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("features.norm5 "))
    assert "1024x7x7" in line and "default" in line


def test_breakhis_cohort_with_pixel_size_override(breakhis_atlas):
    with Atlas(breakhis_atlas) as atlas:
        sl = atlas.slides()
        assert len(sl["slide_id"]) == 32 and set(sl["status"]) == {"ok"}
        assert set(sl["mpp_source"]) == {"cli"}
        assert set(sl["diagnosis"]) == {"benign", "malignant"}
        assert set(sl["meta.subtype"]) >= {"adenosis", "ductal_carcinoma"} or len(set(sl["meta.subtype"])) == 8
        assert len(set(sl["patient"])) == 8
        assert atlas.n_tiles == int(sl["n_tiles"].sum()) > 32


@pytest.fixture
def images_without_pixel_size(tmp_path) -> Path:
    """Manifest of PNG images, which carry no pixel size: the BreakHis cohort when ../shared/data is
    present, else three generated 448 x 448 px images."""
    if DATA.is_dir():
        return DATA / "cohort" / "breakhis" / "manifest.csv"
    rows = []
    for seed in range(3):
        Image.fromarray(slide_pixels(seed, 448, 448)).save(tmp_path / f"s{seed}.png")
        rows.append({"slide_id": f"s{seed}", "path": f"s{seed}.png", "diagnosis": "x"})
    return write_manifest(tmp_path / "manifest.csv", rows)


def test_images_without_pixel_size_fail_every_slide(images_without_pixel_size, tmp_path):
    out = tmp_path / "atlas.h5"
    proc = run_cli("run", "--cohort", str(images_without_pixel_size), "--model",
                   "capricorn-crc", "--out", str(out), "--workers", "0", "--no-progress", "--calib-tiles", "1")
    assert proc.returncode == 3, proc.stderr
    assert "--mpp" in proc.stderr
    assert not out.exists()


def _wait_for(predicate, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_killed_run_resumes_to_the_same_atlas(data_dir, tmp_path, breakhis_atlas):
    """SIGKILL mid-way through the full pass, re-run, and get the uninterrupted run's arrays."""
    out = tmp_path / "atlas.h5"
    args = [sys.executable, "-m", "precompute", "run", "--cohort",
            str(data_dir / "cohort" / "breakhis" / "manifest.csv"), "--model", "capricorn-crc", "--out", str(out),
            "--mpp", "0.5", "--min-tissue", "0", "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = out.with_name("atlas.h5.parts") / "slides"
    try:
        assert _wait_for(lambda: parts.is_dir() and len(list(parts.glob("*.h5"))) >= 5, 600), "run never got going"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(list(parts.glob("*.h5")))
    assert 5 <= done_before < 32 and not out.exists()

    again = run_cli("run", "--cohort", str(data_dir / "cohort" / "breakhis" / "manifest.csv"), "--model",
                    "capricorn-crc", "--out", str(out), "--mpp", "0.5", "--min-tissue", "0", "--workers", "1", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"{done_before} slides already done" in again.stderr
    with h5py.File(out, "r") as a, h5py.File(breakhis_atlas, "r") as b:
        for name in ("tiles/x", "tiles/y", "tiles/embedding", "tiles/outputs", "tiles/weights", "tiles/nmf_cluster",
                     "tiles/kmeans_cluster", "tiles/proj", "tiles/thumb_jpeg", "clusters/H", "slide_maps/3/hard",
                     "slide_maps/3/soft"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
