"""Small generated inputs for end-to-end runs without ../shared: pyramidal TIFF slides and a tiny
seeded CNN (`tiny_inputs:tiny_net`, importable by worker processes when tests/ is on PYTHONPATH).

Fault injection for the Dask tests, active only inside a Dask worker and only when asked for by
environment variables (inherited by the workers):
- LUMEN_TEST_KILL_ONCE=<file>: the first worker to claim <file> (renaming it) dies in its next full-pass
  batch, as a worker killed by the OOM killer would.
- LUMEN_TEST_HOLD=<file>, LUMEN_TEST_HOLD_AFTER=N: after N full-pass batches in one worker, the next
  batch waits while <file> exists (so a test can kill the client while slides are in flight).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile
import torch
from torch import nn

from precompute.models import ModelSpec

TILE_PX = 64


class _Head(nn.Module):
    """Pooling + linear classifier; the place faults are injected (reached only in the full pass)."""

    calls = 0

    def __init__(self, channels: int, n_out: int):
        super().__init__()
        self.fc = nn.Linear(channels, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _maybe_fault()
        return self.fc(x.mean(dim=(2, 3)))


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _maybe_fault() -> None:
    kill, hold = os.environ.get("LUMEN_TEST_KILL_ONCE"), os.environ.get("LUMEN_TEST_HOLD")
    if not (kill or hold) or not _in_dask_worker():
        return
    _Head.calls += 1
    if kill:
        try:
            os.rename(kill, kill + ".claimed")
        except OSError:
            pass  # another worker claimed it, or it is not there
        else:
            os._exit(137)
    if hold and _Head.calls > int(os.environ.get("LUMEN_TEST_HOLD_AFTER", "1")):
        deadline = time.monotonic() + 300
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)


def tiny_net():
    """A seeded 3-layer CNN: 64-px tiles -> `features.relu2` (16 channels x 16 x 16 cells) -> 2 outputs."""
    g = torch.Generator().manual_seed(0)
    features = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1)), ("relu2", nn.ReLU()),
    ]))
    net = nn.Sequential(OrderedDict([("features", features), ("head", _Head(16, 2))]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    spec = ModelSpec(name="tiny", input_px=TILE_PX, class_names=("normal", "tumour"),
                     default_layer="features.relu2")
    return net.eval(), spec


def write_slide(path: Path, seed: int, side: int = 512, mpp: float = 0.5, tissue: bool = True) -> Path:
    """A two-level tiled TIFF (OpenSlide generic TIFF) of pink/purple blobs on white glass."""
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
    res = 1e4 / mpp  # px per cm
    with tifffile.TiffWriter(path) as tif:
        for factor in (1, 4):
            level = img[::factor, ::factor]
            tif.write(level, tile=(128, 128), photometric="rgb", resolution=(res / factor, res / factor),
                      resolutionunit="CENTIMETER", subfiletype=0 if factor == 1 else 1, metadata=None)
    return path


def write_cohort(folder: Path, n_slides: int = 5, blank: bool = True, broken: bool = True) -> Path:
    """n_slides tissue slides (+ one blank, + one unreadable file); returns the manifest CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,diagnosis"]
    for i in range(n_slides):
        p = write_slide(folder / f"s{i}.tiff", seed=i)
        rows.append(f"s{i},{p},{'tumour' if i % 2 else 'normal'}")
    if blank:
        rows.append(f"blank,{write_slide(folder / 'blank.tiff', seed=99, tissue=False)},normal")
    if broken:
        bad = folder / "broken.tiff"
        bad.write_bytes(b"II*\x00" + b"\x00" * 64)
        rows.append(f"broken,{bad},tumour")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest
