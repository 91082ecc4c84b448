"""Build a realistic large slide for benchmarks: a pyramidal, JPEG-compressed tiled TIFF of real tissue.

The level-0 image (default 20480 x 20480 px at 0.5 um/px) is a mosaic of randomly flipped and rotated
2048-px crops of the real H&E slide CMU-1-Small-Region.svs (shared test data), so reading and decoding
cost what real slides cost: real texture, real background share, a real codec (JPEG, 256-px tiles, like
Aperio SVS). Levels at 1/4 and 1/16 follow, as in a 40x/10x/2.5x scanner pyramid. OpenSlide reads it as
a generic tiled TIFF with mpp from the resolution tags.

    python bench/make_slide.py --out bench/out/large.tiff [--side 20480] [--seed 0]
Needs `pip install -r requirements-bench.txt` (tifffile with imagecodecs for JPEG tiles).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
BLOCK = 2048


def mosaic(side: int, seed: int) -> np.ndarray:
    src = np.asarray(openslide.OpenSlide(str(SOURCE)).read_region((0, 0), 0, (2220, 2967)).convert("RGB"))
    rng = np.random.default_rng(seed)
    out = np.empty((side, side, 3), np.uint8)
    for y in range(0, side, BLOCK):
        for x in range(0, side, BLOCK):
            y0 = rng.integers(0, src.shape[0] - BLOCK + 1)
            x0 = rng.integers(0, src.shape[1] - BLOCK + 1)
            block = np.rot90(src[y0:y0 + BLOCK, x0:x0 + BLOCK], k=int(rng.integers(4)))
            if rng.random() < 0.5:
                block = block[:, ::-1]
            h, w = min(BLOCK, side - y), min(BLOCK, side - x)
            out[y:y + h, x:x + w] = block[:h, :w]
    return out


def write_pyramid(img: np.ndarray, out: Path, mpp: float, quality: int = 85) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    res = (1e4 / mpp, 1e4 / mpp)  # px per cm
    with tifffile.TiffWriter(out, bigtiff=True) as tif:
        level, factor = img, 1
        while True:
            tif.write(level, tile=(256, 256), compression="jpeg", compressionargs={"level": quality},
                      photometric="rgb", resolution=(res[0] / factor, res[1] / factor),
                      resolutionunit="CENTIMETER", subfiletype=0 if factor == 1 else 1, metadata=None)
            if max(level.shape[:2]) <= 2048:
                break
            factor *= 4
            level = np.asarray(Image.fromarray(level).reduce(4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/large.tiff"))
    ap.add_argument("--side", type=int, default=20480, help="level-0 side in px")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_pyramid(mosaic(a.side, a.seed), a.out, a.mpp)
    s = openslide.OpenSlide(str(a.out))
    print(f"{a.out}: {s.dimensions[0]} x {s.dimensions[1]} px, levels {s.level_dimensions}, "
          f"mpp {s.properties.get('openslide.mpp-x')}, {a.out.stat().st_size / 2**20:.0f} MiB, vendor "
          f"{s.properties.get('openslide.vendor')}")


if __name__ == "__main__":
    main()
