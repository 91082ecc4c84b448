"""A small, valid atlas written through `precompute.store.AtlasWriter` from seeded synthetic arrays.

No slides, model or ../shared data are needed, so tests of the readers (inspect, report, dashboard)
can build one in well under a second. Slides: 3 with tiles, 1 failed (no tiles, no maps); K = 3
concepts over C = 8 channels; outputs NORM, TUM (logits and probabilities); k-means, a PCA-like
projection, prototypes with JPEG crops. Slide ids and diagnoses can be chosen (e.g. hostile text).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from precompute.store import AtlasWriter

K, C, TILE = 3, 8, 256
OUTPUTS = ["NORM", "TUM"]
DEFAULT_IDS = ["S1", "S2", "S3", "S4"]
DEFAULT_DIAGNOSES = ["benign", "malignant", "malignant", "benign"]


def _jpeg(rng: np.random.Generator, px: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _slide(rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    """Tile columns and maps of one slide with n tiles on a 4-wide grid (level-0 px)."""
    weights = rng.gamma(1.0, 1.0, (n, K)).astype(np.float32)
    outputs = rng.normal(0, 1, (n, len(OUTPUTS))).astype(np.float32)
    outputs[:, 1] += 2 * weights[:, 0] - weights[:, 1]  # so the regression has something to find
    probs = np.exp(outputs) / np.exp(outputs).sum(axis=1, keepdims=True)
    idx = np.arange(n)
    tiles = {"x": (idx % 4) * TILE, "y": (idx // 4) * TILE, "tissue_frac": np.full(n, 0.9, np.float32),
             "embedding": rng.random((n, C)).astype(np.float16), "outputs": outputs, "probs": probs,
             "weights": weights, "nmf_cluster": weights.argmax(axis=1).astype(np.int16),
             "recon_err": np.full(n, 0.2, np.float32), "thumb_jpeg": [_jpeg(rng) for _ in range(n)]}
    rows = (n + 3) // 4
    hard = np.zeros((rows * 2, 8), np.uint8)
    hard[:, :] = rng.integers(1, K + 1, hard.shape)
    maps = {"thumbnail": rng.integers(0, 255, (rows * 8, 32, 3), dtype=np.uint8),
            "tissue": np.ones((rows * 8, 32), bool), "hard": hard,
            "soft": rng.random((K,) + hard.shape).astype(np.float16)}
    return tiles, maps


def write_atlas(path: Path, slide_ids=DEFAULT_IDS, diagnoses=DEFAULT_DIAGNOSES, tiles_per_slide=(12, 10, 10),
                seed: int = 0) -> Path:
    """Write the atlas described in the module docstring at `path`; returns `path`."""
    rng = np.random.default_rng(seed)
    attrs = {"tool": "lumen", "tool_version": "test", "created_utc": "2026-01-01T00:00:00Z",
             "command_line": "python -m precompute run --cohort cohort.csv --model m --out atlas.h5",
             "config": {"tile_px": 224, "stride_px": 224, "target_mpp": 0.5, "k": K, "seed": seed,
                        "projection": "pca"},
             "model_source": "synthetic", "model_sha256": "0" * 64, "layer": "layer4", "layer_shape": [C, 2, 2],
             "cell_px": 112, "k": K, "output_names": OUTPUTS, "device": "cpu",
             "fit": {"nmf_relative_error": 0.3}}
    with AtlasWriter(path, attrs=attrs, embedding_dim=C, output_names=OUTPUTS, k=K, has_probs=True) as w:
        for i, (sid, dx) in enumerate(zip(slide_ids, diagnoses)):
            row = {"slide_id": sid, "path": f"/data/{i}.svs", "diagnosis": dx, "patient": f"P{i}",
                   "mpp": 0.5, "mpp_source": "cli", "width": 4 * TILE, "height": 4 * TILE,
                   "tile_l0": TILE, "cell_l0": TILE / 2}
            if i >= len(tiles_per_slide):
                w.add_slide({**row, "status": "failed", "error": "cannot read the file"}, meta={"site": "A"})
                continue
            tiles, maps = _slide(rng, tiles_per_slide[i])
            w.add_slide({**row, "status": "ok"}, meta={"site": "A"}, tiles=tiles, maps=maps,
                        map_attrs={"thumb_downsample": 8.0, "mask_downsample": 8.0, "cell_l0": TILE / 2,
                                   "warnings": []})
        n = w.n_tiles
        w.put_tile_column("kmeans_cluster", (np.arange(n) % K).astype(np.int16), attrs={"k": K, "seed": seed})
        w.put_tile_column("proj", rng.normal(0, 1, (n, 2)).astype(np.float32),
                          attrs={"method": "pca", "seed": seed})
        H = rng.random((K, C)).astype(np.float32)
        dist = np.sqrt(((H[:, None] - H[None]) ** 2).sum(-1)).astype(np.float32)
        Hn = H / np.linalg.norm(H, axis=1, keepdims=True)
        w.put_group("clusters", {"H": H, "distances": dist, "cosine_similarity": (Hn @ Hn.T).astype(np.float32)},
                    attrs={"k": K, "relative_error": 0.3})
        protos = {"slide": np.array([0, 1, 2], np.int32), "tile": np.array([0, 12, 22], np.int64),
                  "cluster": np.array([0, 1, 2], np.int16), "weight": np.array([2.0, 1.5, 1.0], np.float32),
                  "cell_y": np.zeros(3, np.int16), "cell_x": np.zeros(3, np.int16),
                  "jpeg": [_jpeg(rng, 24) for _ in range(3)]}
        w.put_group("clusters/prototypes", protos, attrs={"crop": "test"})
    return path

