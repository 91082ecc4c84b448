"""Benchmark: TorchNMF vs scikit-learn NMF on real 512-channel activations.

Builds an (rows, 512) matrix of post-ReLU activations of the trained Capricorn DenseNet121
(`features.transition2.relu`: 512 channels x 28 x 28 cells per 224 px tile) from tiles of the
CMU slide at stride 112, then fits both solvers on the same matrix in the same run and prints
wall time, iterations and relative reconstruction error ||V - WH||_F / ||V||_F.

    .venv/bin/python bench/nmf.py --rows 200000 --k 6

The activation matrix is cached under bench/out/ (ignored by git); delete it to rebuild.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from precompute.nmf import TorchNMF, relative_error  # noqa: E402

SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
TILE, STRIDE = 224, 112
LAYER = "features.transition2.relu"


def read_tiles(path: Path) -> np.ndarray:
    """All 224 px tiles of the slide on a stride-112 grid: (N, 224, 224, 3) uint8 RGB."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    width, height = slide.dimensions
    tiles = [
        np.asarray(slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB"))
        for y in range(0, height - TILE + 1, STRIDE)
        for x in range(0, width - TILE + 1, STRIDE)
    ]
    return np.stack(tiles)


def transition2_relu(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DenseNet121 forward stopped at features.transition2.relu: (N, 512, 28, 28), >= 0."""
    for name, module in model.features.named_children():
        if name == "transition2":
            return module.relu(module.norm(x))
        x = module(x)
    raise RuntimeError("model has no features.transition2 (not a torchvision DenseNet)")


def build_matrix(rows: int, seed: int, cache: Path) -> np.ndarray:
    """(rows, 512) float32 real activations, sampled without replacement from all cells.

    Flipped / rotated copies of the tiles are added only when one pass has too few cells.
    """
    if cache.is_file():
        V = np.load(cache)
        if V.shape[0] == rows:
            return V
    from precompute.capricorn import build_capricorn_crc

    model = build_capricorn_crc()
    tiles = torch.from_numpy(read_tiles(SLIDE)).permute(0, 3, 1, 2)
    views = [lambda t: t, lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.rot90(1, (-2, -1))]
    parts, have = [], 0
    for view in views:
        with torch.inference_mode():
            for batch in tiles.split(32):
                act = transition2_relu(model, view(batch).float() / 255.0)  # Capricorn: RGB / 255
                parts.append(act.permute(0, 2, 3, 1).reshape(-1, act.shape[1]).numpy())
                have += parts[-1].shape[0]
        if have >= rows:
            break
    pool = np.concatenate(parts)
    if pool.shape[0] < rows:
        raise SystemExit(f"only {pool.shape[0]} activation rows available; ask for --rows <= that")
    pick = np.sort(np.random.default_rng(seed).choice(pool.shape[0], rows, replace=False))
    V = np.ascontiguousarray(pool[pick], dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, V)
    return V


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> tuple[float, object]:
    """Wall time (s) of one call and its result."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="activation rows (cells) to factorise")
    ap.add_argument("--k", type=int, default=6, help="NMF components")
    ap.add_argument("--device", default=None, help="torch device for TorchNMF (default: cuda if present)")
    ap.add_argument("--repeats", type=int, default=3, help="TorchNMF repeats (median reported)")
    ap.add_argument("--sk-repeats", type=int, default=1, help="scikit-learn repeats (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="activation matrix cache (.npy)")
    args = ap.parse_args()
    if args.cache is None:
        args.cache = ROOT / "bench" / "out" / f"acts-transition2-512-{args.rows}-seed{args.seed}.npy"

    from sklearn.decomposition import NMF
    from threadpoolctl import threadpool_info

    t0 = time.perf_counter()
    V = build_matrix(args.rows, args.seed, args.cache)
    print(f"matrix: {V.shape} float32 from {LAYER} of capricorn-crc on {SLIDE.name}, "
          f"{(V == 0).mean():.1%} zeros, built/loaded in {time.perf_counter() - t0:.1f} s")
    blas = sorted({f"{i['internal_api']}:{i['num_threads']}" for i in threadpool_info()})
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"threadpools {', '.join(blas)}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"load average {os.getloadavg()[0]:.1f}")

    def torch_fit():
        model = TorchNMF(args.k, seed=args.seed, device=args.device).fit(V)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return model

    def sk_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter is part of what we time
            return NMF(args.k, init="nndsvd", max_iter=500, random_state=args.seed).fit(V)

    # Interleave the two solvers so both see the same background load on a shared machine.
    times_torch, times_sk = [], []
    for r in range(max(args.repeats, args.sk_repeats)):
        if r < args.repeats:
            t, ours = timed(torch_fit)
            times_torch.append(t)
        if r < args.sk_repeats:
            t, ref = timed(sk_fit)
            times_sk.append(t)
    t_torch, t_sk = statistics.median(times_torch), statistics.median(times_sk)
    err_sk = float(ref.reconstruction_err_) / float(np.linalg.norm(V))

    t_tr, W_ours = timed(lambda: ours.transform(V))
    t_sktr, _ = timed(lambda: ref.transform(V))
    err_tr = relative_error(V, W_ours, ours.components_)

    print(f"\n{'solver':<28}{'fit s':>9}{'iters':>7}{'rel. error':>12}")
    name = f"TorchNMF ({ours.device})"
    print(f"{name:<28}{t_torch:>9.2f}{ours.n_iter_:>7}{ours.reconstruction_err_:>12.5f}")
    print(f"{'sklearn NMF cd, nndsvd':<28}{t_sk:>9.2f}{ref.n_iter_:>7}{err_sk:>12.5f}")
    print(f"fit speed-up {t_sk / t_torch:.1f}x (medians of {len(times_torch)} / {len(times_sk)} runs; "
          f"all runs: torch {', '.join(f'{t:.2f}' for t in times_torch)} s, "
          f"sklearn {', '.join(f'{t:.2f}' for t in times_sk)} s)")
    print(f"error ratio torch/sklearn {ours.reconstruction_err_ / err_sk:.4f}")
    print(f"transform (all rows, H fixed): TorchNMF {t_tr:.2f} s (rel. error {err_tr:.5f}), "
          f"sklearn {t_sktr:.2f} s; speed-up {t_sktr / t_tr:.1f}x")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
