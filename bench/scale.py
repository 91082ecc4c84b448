"""Cost of the cohort-wide stages at scale: k-means, 2-D projection and the atlas write for N tiles.

Embeddings resemble real ones: rows resampled from a real atlas's pooled embeddings with 10 %
multiplicative noise (non-negative, float16, 1024 dims for the demo model); thumbnails are real
tile thumbnails from the same atlas. Each stage reports wall time and the process's peak resident
memory during it (sampled from /proc every 20 ms), then bytes per tile of the written atlas.

    python bench/scale.py --source demo/atlas.h5 --tiles 1000000 [--umap]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.clustering import assign, fit_kmeans  # noqa: E402
from precompute.projection import project  # noqa: E402
from precompute.store import Atlas, AtlasWriter  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Stage:
    """Times a block and records the peak RSS seen while it ran."""

    results: list[tuple[str, float, float]] = []

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.peak = rss_bytes()
        self.stop = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _watch(self):
        while not self.stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.stop = True
        self.thread.join()
        Stage.results.append((self.name, dt, self.peak / 2**30))
        print(f"{self.name:28s} {dt:8.1f} s   peak RSS {self.peak / 2**30:6.2f} GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="a real atlas to resample from")
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--umap", action="store_true", help="also time UMAP (fit on 50k, transform all)")
    ap.add_argument("--out", type=Path, default=None, help="keep the atlas here (default: a temporary file)")
    a = ap.parse_args()

    with Atlas(a.source) as src:
        t = src.tiles(["embedding", "outputs", "probs", "weights"])
        thumbs = src.thumbnails(range(src.n_tiles))
        names = src.output_names
        H = src.group("clusters")["H"]
    rng = np.random.default_rng(0)
    n = a.tiles
    print(f"source {a.source}: {len(t['embedding'])} real tiles x {t['embedding'].shape[1]} dims -> {n} tiles; "
          f"cpus {os.cpu_count()}")
    with Stage("make embeddings"):
        idx = rng.integers(0, len(t["embedding"]), n)
        emb = np.empty((n, t["embedding"].shape[1]), np.float16)
        for s in range(0, n, 100_000):
            e = slice(s, min(n, s + 100_000))
            block = t["embedding"][idx[e]].astype(np.float32)
            block *= 1 + 0.1 * rng.standard_normal(block.shape, dtype=np.float32)
            emb[e] = np.maximum(block, 0)
    # The stages take the float16 embeddings as the atlas stores them and convert batch by batch,
    # exactly as precompute.assemble does.
    with Stage("k-means fit (100k) + assign"):
        km = fit_kmeans(emb, a.k, seed=0)
        labels, _ = assign(km, emb)
    with Stage("PCA projection"):
        coords, params = project(emb, method="pca", seed=0)
    if a.umap:
        with Stage("UMAP projection (fit 50k)"):
            project(emb, method="umap", seed=0)
    out = a.out or Path(tempfile.mkdtemp()) / "scale.h5"
    per_slide = n // a.slides
    with Stage("atlas write"):
        with AtlasWriter(out, attrs={"bench": "scale"}, embedding_dim=emb.shape[1], output_names=names, k=a.k,
                         has_probs=True) as w:
            for s in range(a.slides):
                e = slice(s * per_slide, n if s == a.slides - 1 else (s + 1) * per_slide)
                rows = idx[e]
                w.add_slide({"slide_id": f"s{s}", "status": "ok"}, tiles={
                    "x": np.arange(len(rows)) * 224, "y": np.zeros(len(rows)), "tissue_frac": np.ones(len(rows)),
                    "embedding": emb[e], "outputs": t["outputs"][rows], "probs": t["probs"][rows],
                    "weights": t["weights"][rows], "nmf_cluster": t["weights"][rows].argmax(1),
                    "recon_err": np.zeros(len(rows)), "thumb_jpeg": [thumbs[r] for r in rows]})
            w.put_tile_column("kmeans_cluster", labels)
            w.put_tile_column("proj", coords, attrs=params)
            w.put_group("clusters", {"H": H})
    size = out.stat().st_size
    print(f"\natlas {out}: {size / 2**20:.0f} MiB, {size / n:.0f} bytes per tile (no slide maps)")
    total = sum(r[1] for r in Stage.results)
    print(f"total {total:.1f} s, max peak RSS {max(r[2] for r in Stage.results):.2f} GiB")
    if a.out is None:
        out.unlink()


if __name__ == "__main__":
    main()
