"""The model zoo on CUDA (bf16 autocast) against CPU fp32: do the concept maps agree?

For every family of tests/test_zoo.py (seeded random weights, as there), the same cohort is run twice
through the whole pipeline: on the CPU in fp32 (the baseline, which fits the concepts), then on CUDA
under autocast with the baseline's concepts (`--concepts`), so both assign cells to the same H. Printed
side by side per model:

- cells: share of slide-map cells whose dominant concept (hard map) is the same on both devices;
- weights: relative difference of the stored per-tile concept weights, ||W_cuda - W_cpu|| / ||W_cpu||;
- seconds of each run and the CPU / CUDA ratio.

    python bench/zoo_gpu.py [--cohort ../shared/data/slides/CMU-1-Small-Region.svs] [--only vgg16,swin_t]

Without a CUDA device it says so and exits 0. Needs ../shared/data (or --cohort) and the test
requirements (the zoo's definitions live in tests/seeded_models.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from precompute.cli import run_job  # noqa: E402
from precompute.store import Atlas  # noqa: E402
from seeded_models import ZOO, build  # noqa: E402

SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def run(case, ckpt: Path, cohort: Path, out: Path, device: str, concepts: Path | None) -> float:
    t0 = time.perf_counter()
    extra = dict(zip(case.extra[::2], case.extra[1::2]))
    code = run_job(cohort=cohort, model=str(ckpt), arch=case.arch, layer=case.layer, out=out, device=device,
                   tile_px=case.px, input_px=case.px, stride_px=int(extra.get("--stride-px", case.px)),
                   edge_cells=int(extra.get("--edge-cells", 0)), workers=2, k_grid="", concepts=concepts,
                   progress=False)
    if code != 0:
        raise SystemExit(f"{case.arch} on {device}: exit code {code}")
    return time.perf_counter() - t0


def compare(cpu: Path, gpu: Path) -> tuple[float, float]:
    """(share of cells with the same dominant concept, relative difference of the tile weights)."""
    same = total = 0
    with Atlas(cpu) as a, Atlas(gpu) as b:
        for i in range(len(a.slides()["slide_id"])):
            ma, mb = a.slide_maps(i), b.slide_maps(i)
            if ma is None or mb is None:
                continue
            cells = ma["hard"] > 0
            same += int((ma["hard"][cells] == mb["hard"][cells]).sum())
            total += int(cells.sum())
        wa = a.tiles(["weights"])["weights"].astype(np.float64)
        wb = b.tiles(["weights"])["weights"].astype(np.float64)
    return same / max(total, 1), float(np.linalg.norm(wb - wa) / max(np.linalg.norm(wa), 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=Path, default=SLIDE)
    ap.add_argument("--only", default="", help="comma-separated zoo names (default: all)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible: nothing to compare (this benchmark needs a GPU); skipped.")
        return
    names = [n for n in ZOO if not a.only or n in a.only.split(",")]
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, cohort {a.cohort}")
    print(f"{'model':22s} {'layer':34s} {'same cells':>10s} {'rel diff W':>10s} {'cpu s':>7s} {'cuda s':>7s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            case = ZOO[name]
            ckpt = Path(tmp) / f"{name}.pth"
            torch.save(build(case).state_dict(), ckpt)
            cpu, gpu = Path(tmp) / f"{name}-cpu.h5", Path(tmp) / f"{name}-cuda.h5"
            t_cpu = run(case, ckpt, a.cohort, cpu, "cpu", None)
            t_gpu = run(case, ckpt, a.cohort, gpu, "cuda", cpu)
            same, rel = compare(cpu, gpu)
            print(f"{name:22s} {case.layer:34s} {same:10.3f} {rel:10.4f} {t_cpu:7.1f} {t_gpu:7.1f} "
                  f"{t_cpu / t_gpu:6.1f}")


if __name__ == "__main__":
    main()
