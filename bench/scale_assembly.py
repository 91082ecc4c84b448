"""Out-of-core assembly: time and peak memory of `precompute.assemble.build_atlas` over N tiles of parts.

Writes a parts folder of N tiles (slides of --tiles-per-slide tiles, embeddings of --dims channels drawn
from a seeded mixture of non-negative clusters, float16; 2 outputs; small JPEG thumbnails and prototype
crops; 64 x 64 slide maps), then builds the atlas from it in a fresh process per code version, so each
reports its own peak resident memory (VmHWM). With --baseline CODE_DIR (a checkout of an earlier
version) both run on the same parts and the atlases are compared: every tile column and group, and
where they differ the adjusted Rand index of the k-means labels and the correlation of the projections.

    python bench/scale_assembly.py --tiles 1000000 --dims 64 --work bench/out/asm-1e6 --baseline /tmp/lumen-old
    python bench/scale_assembly.py --tiles 10000000 --work bench/out/asm-1e7 --link-from bench/out/asm-1e6 \
        --baseline /tmp/lumen-old      # 1,000 slides: the 100 slides of asm-1e6, ten times each
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _jpegs(n: int, side: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.clip(rng.normal((200, 120, 180), 30, (side, side, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=70)
        out.append(buf.getvalue())
    return out


def make_parts(work: Path, tiles: int, per_slide: int, dims: int, k: int, seed: int = 0) -> None:
    """Parts folder + manifest for `tiles` tiles (cached: skipped when work/READY says the same)."""
    from precompute.parts import part_name, save_part

    spec = {"tiles": tiles, "per_slide": per_slide, "dims": dims, "k": k, "seed": seed}
    ready = work / "READY"
    if ready.exists() and json.loads(ready.read_text()) == spec:
        return
    slides = work / "atlas.h5.parts" / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, (k, dims)).astype(np.float32)
    thumbs, crops = _jpegs(64, 24, seed), _jpegs(16, 96, seed + 1)
    rows = ["slide_id,path,diagnosis"]
    n_slides = -(-tiles // per_slide)
    for s in range(n_slides):
        n = min(per_slide, tiles - s * per_slide)
        lab = rng.integers(0, k, n)
        emb = np.maximum(centres[lab] * (1 + 0.3 * rng.standard_normal((n, dims), dtype=np.float32)), 0)
        w = rng.gamma(1.0, 1.0, (n, k)).astype(np.float32)
        logits = rng.standard_normal((n, 2)).astype(np.float32)
        side = int(np.ceil(np.sqrt(n)))
        arrays = {
            "coords": np.stack([np.arange(n) % side * 224, np.arange(n) // side * 224], 1).astype(np.int64),
            "tissue_frac": rng.random(n, dtype=np.float32), "grid_index": np.zeros((n, 2), np.int32),
            "embedding": emb.astype(np.float16), "outputs": logits,
            "probs": (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32), "weights": w,
            "sq_resid": rng.random(n) * 0.1, "sq_norm": 1 + rng.random(n),
            "thumbs": [thumbs[i % len(thumbs)] for i in range(n)],
            "thumbnail": np.full((64, 64, 3), 230, np.uint8), "tissue": np.ones((64, 64), bool),
            "soft": rng.random((k, 64, 64)).astype(np.float16), "hard": rng.integers(0, k + 1, (64, 64)).astype(np.uint8),
            "proto_tile": rng.integers(0, n, 4 * k), "proto_cluster": np.repeat(np.arange(k), 4).astype(np.int16),
            "proto_weight": rng.random(4 * k).astype(np.float32), "proto_cell_y": np.zeros(4 * k, np.int16),
            "proto_cell_x": np.zeros(4 * k, np.int16), "proto_crop": [crops[i % len(crops)] for i in range(4 * k)],
        }
        attrs = {"key": "bench", "status": "ok", "slide_id": f"s{s}", "path": f"s{s}.svs", "width": side * 224,
                 "height": side * 224, "mpp": 0.5, "mpp_source": "file", "warnings": [], "tile_l0": 224.0,
                 "thumb_downsample": side * 224 / 64, "mask_downsample": side * 224 / 64}
        save_part(slides / part_name(s, f"s{s}"), arrays, attrs)
        rows.append(f"s{s},s{s}.svs,{'tumour' if s % 2 else 'normal'}")
    np.save(work / "H.npy", centres / np.linalg.norm(centres, axis=1, keepdims=True))
    (work / "manifest.csv").write_text("\n".join(rows) + "\n")
    ready.write_text(json.dumps(spec))


def link_parts(work: Path, source: Path, tiles: int) -> None:
    """`tiles` tiles of parts as hard links to the slides of an existing parts folder, repeated in turn
    (same content per slide, but every part a file of its own that the assembly reads)."""
    from precompute.parts import part_name

    spec = json.loads((source / "READY").read_text())
    spec_here = {**spec, "tiles": tiles, "linked_from": str(source)}
    ready = work / "READY"
    if ready.exists() and json.loads(ready.read_text()) == spec_here:
        return
    src = sorted((source / "atlas.h5.parts" / "slides").glob("*.h5"))
    slides = work / "atlas.h5.parts" / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,diagnosis"]
    for s in range(-(-tiles // spec["per_slide"])):
        dest = slides / part_name(s, f"s{s}")
        dest.unlink(missing_ok=True)
        os.link(src[s % len(src)], dest)
        rows.append(f"s{s},s{s}.svs,{'tumour' if s % 2 else 'normal'}")
    (work / "H.npy").write_bytes((source / "H.npy").read_bytes())
    (work / "manifest.csv").write_text("\n".join(rows) + "\n")
    ready.write_text(json.dumps(spec_here))


def assemble(work: Path, out: Path, k: int) -> dict:
    """Build the atlas from work/ with whatever `precompute` is first on sys.path; time and VmHWM."""
    from precompute.concepts import Concepts
    from precompute.assemble import build_atlas
    from precompute.cohort import SlideRecord
    from precompute.config import RunConfig
    from precompute.parts import part_name

    lines = (work / "manifest.csv").read_text().splitlines()[1:]
    records = [SlideRecord(slide_id=l.split(",")[0], path=Path(l.split(",")[1]), diagnosis=l.split(",")[2],
                           mpp=None, patient=None)
               for l in lines]
    paths = [work / "atlas.h5.parts" / "slides" / part_name(i, r.slide_id) for i, r in enumerate(records)]
    cfg = RunConfig(model="bench", layer="bench", k=k)
    t0 = time.perf_counter()
    facts = build_atlas(out, records, paths, Concepts(np.load(work / "H.npy")), cfg,
                        {"output_names": ["normal", "tumour"], "bench": "scale_assembly"}, (7, 7), lambda m: None)
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as fh:
        hwm = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
    return {"seconds": seconds, "peak_bytes": hwm, "tiles": facts["tiles"], "atlas_bytes": out.stat().st_size}


def compare(a: Path, b: Path) -> dict:
    """Which datasets differ, and for the computed columns the agreement where they do."""
    import h5py
    from sklearn.metrics import adjusted_rand_score

    differ = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                if name not in fb or not np.array_equal(obj[()], fb[name][()]):
                    differ.append(name)
        fa.visititems(visit)
        res = {"datasets_differing": differ}
        if "tiles/kmeans_cluster" in differ:
            res["kmeans_ari"] = float(adjusted_rand_score(fa["tiles/kmeans_cluster"][()], fb["tiles/kmeans_cluster"][()]))
        if "tiles/proj" in differ:
            pa, pb = fa["tiles/proj"][()], fb["tiles/proj"][()]
            res["proj_corr"] = [float(abs(np.corrcoef(pa[:, i], pb[:, i])[0, 1])) for i in range(2)]
    return res


def run_child(code: Path, work: Path, out: Path, k: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.run([sys.executable, __file__, "--child", str(code), "--work", str(work), "--out", str(out),
                           "--k", str(k)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"assembly with {code} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--tiles-per-slide", type=int, default=10_000)
    ap.add_argument("--dims", type=int, default=64, help="embedding width (channels)")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--work", type=Path, required=True, help="folder for the parts (kept and reused)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--baseline", type=Path, default=None, help="checkout of the version to compare with")
    ap.add_argument("--keep-atlases", action="store_true")
    ap.add_argument("--no-compare", action="store_true", help="skip reading both atlases back to compare them")
    ap.add_argument("--link-from", type=Path, default=None, help="a --work folder of fewer tiles whose slides are "
                    "repeated (hard links) to reach --tiles, instead of generating new ones")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        sys.path.insert(0, str(a.child))
        print(json.dumps(assemble(a.work, a.out, a.k)))
        return
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    if a.link_from is not None:
        link_parts(a.work, a.link_from, a.tiles)
    else:
        make_parts(a.work, a.tiles, a.tiles_per_slide, a.dims, a.k)
    print(f"parts: {a.tiles} tiles x {a.dims} dims in {a.work} ({time.perf_counter() - t0:.0f} s incl. cache check); "
          f"cpus {os.cpu_count()}", flush=True)
    runs = {}
    for name, code in (("baseline", a.baseline), ("this", REPO)):
        if code is None:
            continue
        out = a.work / f"atlas-{name}.h5"
        runs[name] = run_child(code, a.work, out, a.k)
        r = runs[name]
        print(f"{name:9s} {r['seconds']:8.1f} s   peak RSS {r['peak_bytes'] / 2**30:6.2f} GiB   "
              f"atlas {r['atlas_bytes'] / 2**30:.2f} GiB ({r['atlas_bytes'] / r['tiles']:.0f} B/tile)", flush=True)
    if "baseline" in runs:
        b, t = runs["baseline"], runs["this"]
        print(f"ratio this/baseline: time {t['seconds'] / b['seconds']:.2f}, peak {t['peak_bytes'] / b['peak_bytes']:.2f}")
        if not a.no_compare:
            print("agreement:", json.dumps(compare(a.work / "atlas-baseline.h5", a.work / "atlas-this.h5")))
    if not a.keep_atlases:
        for name in runs:
            (a.work / f"atlas-{name}.h5").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
