"""Fidelity table for docs/fidelity.md: capricorn-crc on Kather, CMU-1-Small-Region and BreakHis.

For each data set, layer (the default `features.norm5` and `features.transition3.relu`) and K (4, 6, 8)
it runs `python -m precompute run ... --gradcam --explain TUM` and prints, from `report --json` and the
atlas: tiles whose GradCAM is non-zero (any cell, and enough cells for a per-tile r), the concept with
the highest pooled r and its 95 % interval, R^2 in-sample and cross-validated (median [5-95 %]) and
the paper-style K grid (NMF vs k-means with cells per cluster). Then, on Kather, the same figures with
the raw logit and the contrast as the target (the logit was the earlier default) and with 8 calibration
cells per tile (the earlier calibration rule), with the adjusted Rand index of the concepts and of k-means against the tissue
classes; on CMU, the cells under 10 % tissue that the maps used to colour.

    python bench/fidelity.py                      # everything (about an hour on 2 busy CPU cores)
    python bench/fidelity.py --only kather        # one data set
    python bench/fidelity.py --only cmu --layers norm5 --ks 6 --no-extras
    python bench/fidelity.py --markdown out.md    # also write the tables as markdown

Atlases go to bench/out/fidelity/ (ignored by git); an existing atlas is reused, delete it to redo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from precompute.store import Atlas  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "fidelity"
DATASETS = {
    "kather": (DATA / "tiles" / "kather-crc" / "manifest.csv", ["--min-tissue", "0"]),
    "cmu": (DATA / "slides" / "CMU-1-Small-Region.svs", []),
    "breakhis": (DATA / "cohort" / "breakhis" / "manifest.csv", ["--mpp", "0.5", "--min-tissue", "0"]),
}
LAYERS = {"norm5": "features.norm5", "transition3": "features.transition3.relu"}
KS = (4, 6, 8)


def run_atlas(name: str, layer: str, k: int, *extra: str) -> Path:
    """Build (or reuse) one atlas; returns its path."""
    cohort, opts = DATASETS[name]
    tag = "".join(e.strip("-").replace("-", "") for e in extra)
    out = OUT / f"{name}-{layer}-k{k}{('-' + tag) if tag else ''}.h5"
    if not out.exists():
        cmd = [sys.executable, "-m", "precompute", "run", "--cohort", str(cohort), "--model", "capricorn-crc",
               "--out", str(out), "--layer", LAYERS[layer], "--k", str(k), "--k-grid", ",".join(map(str, KS)),
               "--gradcam", "--explain", "TUM", "--workers", "0", "--no-progress", *opts, *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return out


def figures(path: Path) -> dict:
    """The table's figures from `report --json` and the atlas."""
    proc = subprocess.run([sys.executable, "-m", "precompute", "report", str(path), "--json"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    rep = json.loads(proc.stdout)
    with Atlas(path) as atlas:
        cams = [atlas.slide_maps(i) for i in range(atlas.n_slides)]
        t = atlas.tiles(["slide", "x", "y", "nmf_cluster", "kmeans_cluster"])
        slides = atlas.slides()
        glass = sum(int(np.asarray(m["concept_cells"])[:, 2].sum()) for m in cams if m and "concept_cells" in m.arrays)
        coloured = sum(int(np.asarray(m["concept_cells"]).sum()) for m in cams if m and "concept_cells" in m.arrays)
    cam_any = 0
    for i, m in enumerate(cams):
        if m is None:
            continue
        cell = float(slides["cell_l0"][i])
        side = int(round(float(slides["tile_l0"][i]) / cell))
        for x, y in zip(t["x"][t["slide"] == i], t["y"][t["slide"] == i]):
            r0, c0 = int(round(y / cell)), int(round(x / cell))
            cam_any += bool((np.asarray(m["gradcam"])[r0:r0 + side, c0:c0 + side] > 0).any())
    best = max(rep["clusters"], key=lambda c: -2 if c.get("pooled_r") is None else c["pooled_r"])
    top = max(rep["clusters"], key=lambda c: c["coef"] or 0)
    diag = np.asarray(slides["diagnosis"])[t["slide"]]
    return {"rep": rep, "cam_any": cam_any, "best": best, "top": top, "glass": glass, "coloured": coloured,
            "ari_nmf": adjusted_rand_score(diag, t["nmf_cluster"]) if len(set(diag)) > 1 else None,
            "ari_kmeans": adjusted_rand_score(diag, t["kmeans_cluster"]) if len(set(diag)) > 1 else None}


def _r(c: dict, key: str) -> str:
    if c.get(key) is None:
        return "n/a"
    return f"{c[key]:+.2f} [{c[key + '_lo']:+.2f}, {c[key + '_hi']:+.2f}]"


def row(name: str, layer: str, k: int, f: dict) -> str:
    rep, a, reg = f["rep"], f["rep"]["agreement"], f["rep"]["regression"]
    grid = next((g for g in rep["k_grid"] if g["k"] == k), {})
    g = lambda key: "n/a" if grid.get(key) is None else f"{grid[key]:.3f}"  # noqa: E731
    n = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731 (one slide: no cross-validation)
    cv = ("n/a (one slide)" if reg["r2_cv_median"] is None else
          f"{n(reg['r2_cv_median'])} [{n(reg['r2_cv_p5'])}, {n(reg['r2_cv_p95'])}]")
    ari = "n/a (one label)" if f["ari_nmf"] is None else f"{f['ari_nmf']:.3f} / {f['ari_kmeans']:.3f}"
    return (f"| {name} | {layer} | {k} | {rep['target']} | {rep['n_tiles']} | {f['cam_any']} | "
            f"{a['n_tiles_used']} | C{f['best']['cluster']} {_r(f['best'], 'pooled_r')} | "
            f"C{f['top']['cluster']} {_r(f['top'], 'pooled_r')} | {n(reg['r2'])} | "
            f"{cv} | {g('nmf_r2_cv')} / {g('kmeans_r2_cv')} | {ari} |")


HEADER = ("| data | layer | K | target | tiles | CAM > 0 (tiles) | per-tile r used | best pooled r [95 %] | "
          "pooled r of top-coef concept | R² | R² cv median [5-95 %] | grid R² cv NMF / k-means | ARI NMF / k-means |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(DATASETS), action="append")
    ap.add_argument("--layers", default="norm5,transition3")
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="K values of the per-K rows (default 4,6,8)")
    ap.add_argument("--no-extras", action="store_true", help="skip the Kather target/calibration rows and CMU glass")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for name in args.only or list(DATASETS):
        for layer in args.layers.split(","):
            for k in (int(v) for v in args.ks.split(",")):
                lines.append(row(name, layer, k, figures(run_atlas(name, layer, k))))
                print(lines[-1], flush=True)
        if name == "kather" and not args.no_extras:
            for extra in (("--target", "logit"), ("--target", "contrast"), ("--calib-cells", "8")):
                lines.append(row(f"kather {' '.join(extra)}", "norm5", 6, figures(run_atlas(name, "norm5", 6, *extra))))
                print(lines[-1], flush=True)
        if name == "cmu" and not args.no_extras:
            f = figures(run_atlas(name, "norm5", 6))
            lines.append(f"\nCMU norm5 K=6: {f['glass']} of {f['coloured']} covered cells are under 10 % tissue "
                         "(left uncoloured).")
            print(lines[-1], flush=True)
        if args.markdown:  # after each data set, so a long run leaves what it measured
            args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
