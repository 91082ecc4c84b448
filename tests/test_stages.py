"""The run's stages on generated slides (tests/generated.py), in this process: each slide's tile plan
(tissue mask and tile grid) is made once and reused by the calibration, the full pass and a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import precompute.tile_plan as tile_plan
from generated import write_blob_cohort
from precompute.cli import run_job
from precompute.tile_stream import SlideJob, SlidePlan, TileStream
from precompute.config import RunConfig


def _run(manifest: Path, out: Path, **options) -> int:
    given = {"k": 3, "k_grid": "2,3", "batch_size": 64, "workers": 0, "progress": False, **options}
    return run_job(cohort=manifest, model="seeded_models:tiny_net", out=out, **given)


@pytest.fixture
def counted_plans(monkeypatch) -> list[str]:
    """The slide ids tile plans are made for (reading in this process: --workers 0)."""
    made: list[str] = []
    real = tile_plan.make_plan

    def counting(slide, rec, cfg):
        made.append(rec.slide_id)
        return real(slide, rec, cfg)

    monkeypatch.setattr(tile_plan, "make_plan", counting)
    return made


def test_each_slide_is_planned_once_for_both_passes_and_a_resumed_run(tmp_path, counted_plans):
    manifest = write_blob_cohort(tmp_path / "cohort", n_slides=3)
    out = tmp_path / "atlas.h5"
    assert _run(manifest, out) == 1  # the unreadable slide fails; the others are done
    assert sorted(counted_plans) == ["blank", "s0", "s1", "s2"]  # once each, not again in the full pass
    counted_plans.clear()
    # Other concepts (--k 2): the full pass is redone on the plans made before.
    assert _run(manifest, out, k=2) == 1
    ends = [json.loads(line) for line in (tmp_path / "atlas.h5.log.jsonl").read_text().splitlines()]
    assert ends[-1]["event"] == "run_end" and ends[-1]["reused"] == 0
    assert counted_plans == []
    # Another tile grid (--min-tissue) is a new plan.
    assert _run(manifest, out, min_tissue=0.5) == 1
    assert sorted(counted_plans) == ["blank", "s0", "s1", "s2"]


def _same(x, y) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))
    return type(x) is type(y) and x == y


def test_a_loaded_plan_gives_the_tiles_a_fresh_one_gives(tmp_path):
    manifest = write_blob_cohort(tmp_path / "cohort", n_slides=1, blank=False, broken=False)
    from precompute.cohort import load_cohort

    rec = load_cohort(manifest)[0]
    cfg = RunConfig(model="m", layer="l", tile_px=64, stride_px=32, workers=0, batch_size=8)
    fresh = list(TileStream([SlideJob(0, rec)], cfg))
    path = tmp_path / "plan.h5"
    job = SlideJob(0, rec, plan_path=path, plan_key=tile_plan.plan_key(cfg, rec))
    made, loaded = list(TileStream([job], cfg)), list(TileStream([job], cfg))
    assert path.exists()
    for a, b, c in zip(fresh, made, loaded, strict=True):
        assert type(a) is type(b) is type(c)
        if isinstance(a, SlidePlan):
            for name in vars(a):
                assert _same(getattr(a, name), getattr(b, name)) and _same(getattr(a, name), getattr(c, name)), name
        elif hasattr(a, "pixels"):
            assert a.pixels.equal(b.pixels) and a.pixels.equal(c.pixels) and a.thumbs == b.thumbs == c.thumbs


def test_calibration_cells_follow_the_slide_id_not_its_place_in_the_cohort(tmp_path):
    """The same slides listed in the opposite order get the same calibration tiles and cells per slide."""
    from precompute.parts import load_part

    manifest = write_blob_cohort(tmp_path / "cohort", n_slides=2, blank=False, broken=False)
    rows = manifest.read_text().splitlines()
    reversed_manifest = tmp_path / "reversed.csv"
    reversed_manifest.write_text("\n".join([rows[0], *rows[:0:-1]]) + "\n")
    cells = {}
    for name, m in (("listed", manifest), ("reversed", reversed_manifest)):
        out = tmp_path / f"{name}.h5"
        assert _run(m, out, calib_cells_per_tile=4) == 0
        for part in (tmp_path / f"{name}.h5.parts" / "calibration").glob("*.h5"):
            arrays, attrs = load_part(part)
            cells[name, attrs["slide_id"]] = arrays
    assert sorted(sid for name, sid in cells if name == "listed") == ["s0", "s1"]
    for sid in ("s0", "s1"):
        listed, reordered = cells["listed", sid], cells["reversed", sid]
        assert np.array_equal(listed["coords"], reordered["coords"])
        assert len(listed["cells"]) == 4 * len(listed["coords"]) and np.array_equal(listed["cells"], reordered["cells"])
