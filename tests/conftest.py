"""Shared fixtures: the real test data beside the checkout, and atlases built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


# The second layer of tests: facts about the real files in ../shared/data (a plain clone has none).
real_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA} (a plain clone has "
                                                         "no ../shared/data)")


def pytest_report_header(config):
    return f"test data: {DATA} ({'present' if DATA.is_dir() else 'MISSING: data tests will skip'})"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (a plain clone has no ../shared/data)")
    return DATA


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `python -m precompute ARGS` as a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "precompute", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def copy_without_fidelity(atlas: Path, dest: Path) -> Path:
    """A copy of `atlas` at `dest` without its fidelity group, as an older run (or one with no output to
    explain) leaves it."""
    shutil.copy(atlas, dest)
    with h5py.File(dest, "r+") as f:
        if "fidelity" in f:
            del f["fidelity"]
    return dest


@pytest.fixture(scope="session")
def cmu_atlas(data_dir, tmp_path_factory) -> Path:
    """Atlas of CMU-1-Small-Region.svs with the built-in capricorn-crc model (CPU)."""
    out = tmp_path_factory.mktemp("cmu") / "atlas.h5"
    proc = run_cli("run", "--cohort", str(data_dir / "slides" / "CMU-1-Small-Region.svs"), "--model",
                   "capricorn-crc", "--out", str(out), "--workers", "1", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="session")
def breakhis_atlas(data_dir, tmp_path_factory) -> Path:
    """Atlas of the 32-image BreakHis cohort with a pixel-size override of 0.5 um/px."""
    out = tmp_path_factory.mktemp("breakhis") / "atlas.h5"
    proc = run_cli("run", "--cohort", str(data_dir / "cohort" / "breakhis" / "manifest.csv"), "--model",
                   "capricorn-crc", "--out", str(out), "--mpp", "0.5", "--min-tissue", "0", "--workers", "1", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out
