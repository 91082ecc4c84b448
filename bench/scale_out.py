"""Scale-out: tiles/s of `precompute run` in one process and on 1 and 2 local Dask workers.

Generates a cohort of pyramidal TIFF slides (tests/generated.py: pink blobs on glass), runs the
same command once per execution mode and reads the run log: the full pass's wall time (from the
pass_end/full-pass timestamps) and tiles, the sum of per-slide seconds (what the workers spent), and
the whole run's wall time including the cluster start. Model: the tests' tiny seeded CNN (`seeded_models:tiny_net`, 64-px tiles), so the
figures show the per-slide and per-run overheads of each mode rather than a model's speed. (Workers
refuse a factory whose weights differ from the client's, e.g. an unseeded random init.)

    python bench/scale_out.py --slides 8 --side 2048 --work bench/out/scale-out
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def cohort(work: Path, n: int, side: int) -> Path:
    from generated import write_blob_slide

    manifest = work / "manifest.csv"
    if manifest.exists() and len(manifest.read_text().splitlines()) == n + 1:
        return manifest
    work.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,diagnosis"]
    for i in range(n):
        rows.append(f"s{i},{write_blob_slide(work / f's{i}.tiff', seed=i, side=side)},normal")
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _t(event: dict) -> float:
    return dt.datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()


def run(manifest: Path, out: Path, extra: list[str]) -> dict:
    for p in (out, out.with_name(out.name + ".log.jsonl")):
        p.unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(out.with_name(out.name + ".parts"))], check=True)
    cmd = [sys.executable, "-m", "precompute", "run", "--cohort", str(manifest), "--model",
           "seeded_models:tiny_net", "--out", str(out), "--k", "4", "--k-grid", "",
           "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
    log = [json.loads(l) for l in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]
    full_end = next(e for e in log if e["event"] == "pass_end" and e["name"] == "full")
    concepts = next(e for e in log if e["event"] == "concepts")
    slides = [e for e in log if e["event"] == "slide_ok"]
    full_slides = slides[len(slides) // 2:]  # calibration's slides come first, then the full pass's
    tiles = full_end["tiles"]
    full_s = max(1.0, _t(full_end) - _t(concepts))
    return {"wall_s": wall, "full_s": full_s, "tiles": tiles, "tiles_per_s": tiles / full_s,
            "slide_s": sum(e["seconds"] for e in full_slides), "n_slides": len(full_slides)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--side", type=int, default=2048, help="slide side in px (0.5 um/px)")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "scale-out")
    a = ap.parse_args()
    manifest = cohort(a.work, a.slides, a.side)
    modes = {"one process (--workers 1)": ["--workers", "1"], "dask local:1": ["--dask", "local:1"],
             "dask local:2": ["--dask", "local:2"]}
    results = {}
    for name, extra in modes.items():
        r = results[name] = run(manifest, a.work / "atlas.h5", extra)
        print(f"{name:28s} full pass {r['tiles']} tiles in {r['full_s']:6.1f} s = {r['tiles_per_s']:6.2f} tiles/s; "
              f"per slide {r['slide_s'] / max(1, r['n_slides']):5.2f} s; whole run {r['wall_s']:6.1f} s", flush=True)
    base = results["one process (--workers 1)"]["tiles_per_s"]
    print("ratios to one process: " + ", ".join(f"{n}: {r['tiles_per_s'] / base:.2f}" for n, r in results.items()))


if __name__ == "__main__":
    main()
