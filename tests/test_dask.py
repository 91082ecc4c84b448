"""The passes on a 2-worker Dask LocalCluster (CPU) give the same atlas as one process, survive a
killed worker, and resume after a killed client. Inputs are generated (tests/generated.py)."""

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

from conftest import REPO, run_cli
from generated import write_blob_cohort
from precompute.parts import read_part_attrs

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
# Workers import the model factory from tests/. One torch thread everywhere: float32 reductions (BLAS)
# depend on the thread count, and a LocalCluster worker runs one thread, so the single-process reference
# does too; then the atlases are equal bit for bit.
ENV = {"PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
# Run-specific root attributes: they say when and how the atlas was made, not what it holds.
RUN_ATTRS = {"created_utc", "command_line"}


def _args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--cohort", str(manifest), "--model", "seeded_models:tiny_net", "--out", str(out), "--k", "3",
            "--k-grid", "2,3", "--batch-size", "64", "--workers", "0", "--no-progress", *extra]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return a == b


def atlas_differences(path_a: Path, path_b: Path) -> list[str]:
    """Every dataset and attribute (bar RUN_ATTRS at the root) compared; returns what differs."""
    diffs: list[str] = []
    with h5py.File(path_a, "r") as fa, h5py.File(path_b, "r") as fb:
        def attrs(name: str, oa, ob) -> None:
            skip = RUN_ATTRS if name == "/" else set()
            if set(oa.attrs) - skip != set(ob.attrs) - skip:
                diffs.append(f"{name}: attribute names {sorted(oa.attrs)} vs {sorted(ob.attrs)}")
            for key in set(oa.attrs) & set(ob.attrs) - skip:
                if not _same(oa.attrs[key], ob.attrs[key]):
                    diffs.append(f"{name}@{key}")

        def walk(name: str, ga, gb) -> None:
            attrs(name, ga, gb)
            if set(ga) != set(gb):
                diffs.append(f"{name}: members {sorted(set(ga) ^ set(gb))} only in one atlas")
            for key in sorted(set(ga) & set(gb)):
                path = f"{name.rstrip('/')}/{key}"
                if isinstance(ga[key], h5py.Group):
                    walk(path, ga[key], gb[key])
                else:
                    attrs(path, ga[key], gb[key])
                    if not _same(ga[key][()], gb[key][()]):
                        diffs.append(path)
        walk("/", fa, fb)
    return diffs


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_blob_cohort(tmp_path_factory.mktemp("dask-cohort"))


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> Path:
    """The single-process atlas every Dask run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "atlas.h5"
    proc = run_cli(*_args(cohort, out), env=ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the broken slide fails; the atlas is written
    return out


def test_local_cluster_gives_the_single_process_atlas(cohort, reference, tmp_path):
    out = tmp_path / "atlas.h5"
    proc = run_cli(*_args(cohort, out, "--dask", "local:2"), env=ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "a local cluster of 2 worker processes" in proc.stderr
    assert "Dask dashboard:" in proc.stderr
    assert "5 slides ok, 1 without tissue, 1 failed" in proc.stderr
    assert atlas_differences(reference, out) == []


def test_killed_worker_has_its_slide_retried(cohort, reference, tmp_path):
    marker = tmp_path / "kill-once"
    marker.touch()
    out = tmp_path / "atlas.h5"
    proc = run_cli(*_args(cohort, out, "--dask", "local:2"), env={**ENV, "LUMEN_TEST_KILL_ONCE": str(marker)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not marker.exists() and Path(f"{marker}.claimed").exists(), "no worker was killed"
    assert "5 slides ok, 1 without tissue, 1 failed" in proc.stderr
    assert atlas_differences(reference, out) == []


def _wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_killed_client_rerun_resumes(cohort, reference, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    out = tmp_path / "atlas.h5"
    slides_dir = tmp_path / "atlas.h5.parts" / "slides"
    # Each worker finishes its first full-pass slide, then waits on `hold`: the client is killed with
    # two slides done and the others in flight.
    env = {**os.environ, **ENV, "LUMEN_TEST_HOLD": str(hold), "LUMEN_TEST_HOLD_AFTER": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *_args(cohort, out, "--dask", "local:2")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(lambda: len(_done_parts(slides_dir)) >= 2, proc, "two full-pass slides done")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster, as a killed job would be
        proc.wait()
    hold.unlink()
    assert not out.exists()
    done = len(_done_parts(slides_dir))
    rerun = run_cli(*_args(cohort, out, "--dask", "local:2"), env=ENV)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    assert "calibration: 6 slides reused, 1 to sample" in rerun.stderr  # only the unreadable slide is retried
    assert f"full pass: {done} slides already done, {6 - done} to process" in rerun.stderr
    log = [json.loads(line) for line in out.with_name("atlas.h5.log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "slide_skipped" for e in log) == done  # reused, not redone
    assert atlas_differences(reference, out) == []


def _done_parts(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*.h5") if (read_part_attrs(p) or {}).get("status") in ("ok", "no_tissue")]
