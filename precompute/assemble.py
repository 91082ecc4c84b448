"""Build the atlas from the per-slide parts: tiles, slide maps, k-means, 2-D projection, prototypes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .concepts import Concepts
from .clustering import assign_labels, fit_kmeans
from .cohort import SlideRecord
from .config import RunConfig
from .parts import load_part, read_part_attrs
from .projection import project
from .store import AtlasWriter


def _slide_row(rec: SlideRecord, attrs: dict, cell_l0: float | None) -> dict[str, Any]:
    mpp = attrs.get("mpp")
    return {
        "slide_id": rec.slide_id, "path": str(rec.path), "diagnosis": rec.diagnosis or "",
        "patient": rec.patient or "", "status": attrs.get("status", "failed"), "error": attrs.get("error", ""),
        "mpp": np.nan if mpp is None else mpp, "mpp_source": attrs.get("mpp_source", ""),
        "width": attrs.get("width", 0), "height": attrs.get("height", 0),
        "tile_l0": attrs.get("tile_l0", np.nan), "cell_l0": np.nan if cell_l0 is None else cell_l0,
    }


@dataclass
class _Running:
    """What the assembly carries from slide to slide: the summed squared residual and squared norm of
    every cell (for the atlas's overall relative error) and the prototypes chosen so far."""
    sq_resid: float = 0.0
    sq_norm: float = 0.0
    protos: list[tuple] = field(default_factory=list)


def _writer_layout(part_paths: list[Path], root_attrs: dict, k: int) -> dict[str, Any]:
    """AtlasWriter's column layout, read from the first successful part: embedding width C, output names,
    whether tiles have probabilities, and the optional per-tile columns (name -> (shape, dtype))."""
    first_ok = next((p for p in part_paths if (read_part_attrs(p) or {}).get("status") == "ok"), None)
    if first_ok is None:
        raise RuntimeError("no slide produced tiles; nothing to cluster")
    probe, _ = load_part(first_ok)
    output_names = list(root_attrs.get("output_names") or [f"out_{i}" for i in range(probe["outputs"].shape[1])])
    extra = {"gradcam_r": ((k,), np.float32)} if "gradcam_r" in probe else {}
    if "importance" in probe:  # --importance: per tile and concept, the target's drop when the concept is removed
        extra.update({"importance": ((k,), np.float32), "deletion": ((k + 1,), np.float32)})
    return {"embedding_dim": probe["embedding"].shape[1], "output_names": output_names, "k": k,
            "has_probs": "probs" in probe, "extra_columns": extra}


def _tile_columns(arrays: dict[str, np.ndarray], layout: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tile-table columns of one slide's n tiles from its part arrays: coordinates (px at level 0),
    tissue fraction, embedding (n, C), outputs, concept weights (n, K), dominant concept, per-tile relative
    reconstruction error, thumbnail JPEGs, and the layout's optional columns."""
    err = np.sqrt(arrays["sq_resid"] / np.maximum(arrays["sq_norm"], 1e-30)).astype(np.float32)
    tiles = {
        "x": arrays["coords"][:, 0], "y": arrays["coords"][:, 1], "tissue_frac": arrays["tissue_frac"],
        "embedding": arrays["embedding"], "outputs": arrays["outputs"], "weights": arrays["weights"],
        "nmf_cluster": arrays["weights"].argmax(axis=1).astype(np.int16), "recon_err": err,
        "thumb_jpeg": arrays["thumbs"],
    }
    if layout["has_probs"]:
        tiles["probs"] = arrays["probs"]
    for name in layout["extra_columns"]:
        tiles[name] = arrays[name]
    return tiles


def _add_slide(w: AtlasWriter, rec: SlideRecord, path: Path, layout: dict[str, Any], cell_rows: int,
               running: _Running, prototypes_per_cluster: int) -> None:
    """Add one slide's part to the atlas: its slide row, its tiles when it succeeded, its maps when it has
    any; cell_rows: cells per tile side at the hooked layer (a cell is tile_l0 / cell_rows px at level 0)."""
    arrays, attrs = load_part(path)
    cell_l0 = attrs["tile_l0"] / cell_rows if "tile_l0" in attrs else None
    tiles = maps = None
    if attrs.get("status", "failed") == "ok":
        tiles = _tile_columns(arrays, layout)
        running.sq_resid += float(arrays["sq_resid"].sum())
        running.sq_norm += float(arrays["sq_norm"].sum())
        # Tile indices are the atlas's: this slide's tiles start after those already written.
        new = _proto_rows({"slide": len(w.slide_rows), "tile": arrays["proto_tile"] + w.n_tiles,
                           **{c: arrays[f"proto_{c}"] for c in ("cluster", "weight", "cell_y", "cell_x", "crop")}})
        running.protos = _choose_prototypes(running.protos + new, layout["k"], prototypes_per_cluster)
    if "thumbnail" in arrays:
        maps = {name: arrays[name] for name in ("thumbnail", "tissue", "soft", "hard", "gradcam",
                                                "cell_tissue", "concept_cells") if name in arrays}
    map_attrs = {"thumb_downsample": attrs.get("thumb_downsample"),
                 "mask_downsample": attrs.get("mask_downsample"), "cell_l0": cell_l0,
                 "warnings": attrs.get("warnings", [])}
    w.add_slide(_slide_row(rec, attrs, cell_l0), meta=rec.meta, tiles=tiles, maps=maps, map_attrs=map_attrs)


def _write_clusters(w: AtlasWriter, concepts: Concepts, running: _Running) -> float:
    """Groups `clusters` (H (K, C), K x K euclidean distances and cosine similarities, the non-negativity
    shift/scale) and `clusters/prototypes`. Returns the overall relative error ||V - WH||_F / ||V||_F
    over every cell of every slide (NaN when no cell has any activation)."""
    H = concepts.H
    dist = np.sqrt(np.maximum(((H[:, None, :] - H[None, :, :]) ** 2).sum(-1), 0)).astype(np.float32)
    Hn = H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), 1e-12)
    cluster_arrays: dict[str, Any] = {"H": H, "distances": dist, "cosine_similarity": (Hn @ Hn.T).astype(np.float32)}
    if concepts.shift is not None:
        cluster_arrays.update(shift=concepts.shift, scale=concepts.scale)
    overall_err = math.sqrt(running.sq_resid / running.sq_norm) if running.sq_norm else float("nan")
    w.put_group("clusters", cluster_arrays, attrs={"k": H.shape[0], "relative_error": overall_err,
                                                   "distance": "euclidean between rows of H"})
    w.put_group("clusters/prototypes", _prototype_arrays(running.protos),
                attrs={"crop": "cell plus one cell of context on each side, 96 px JPEG"})
    return overall_err


def build_atlas(out: Path, records: list[SlideRecord], part_paths: list[Path], concepts: Concepts,
                cfg: RunConfig, root_attrs: dict, layer_hw: tuple[int, int],
                say: Callable[[str], None], fidelity: Callable[[AtlasWriter], None] | None = None
                ) -> dict[str, Any]:
    """Write the atlas at `out` (atomically) from one part file per record (same order); layer_hw: the
    hooked layer's cells per tile (rows, cols). Returns facts for the summary and run log (tiles, overall
    relative error). `fidelity(writer)`, when given, adds the fidelity statistics once all tiles are written."""
    k = concepts.H.shape[0]
    layout = _writer_layout(part_paths, root_attrs, k)
    running = _Running()
    with AtlasWriter(out, attrs=root_attrs, **layout) as w:
        for rec, path in zip(records, part_paths):
            _add_slide(w, rec, path, layout, layer_hw[0], running, cfg.prototypes_per_cluster)
        say(f"clustering {w.n_tiles} tiles (k-means) and projecting them ({cfg.projection})")
        facts: dict[str, Any] = {"tiles": int(w.n_tiles)}
        _cluster_and_project(w, cfg, k)
        facts["relative_error"] = _write_clusters(w, concepts, running)
        if fidelity is not None:
            say("fidelity: regressing the explained output on concept weights")
            fidelity(w)
    return facts


def _cluster_and_project(w: AtlasWriter, cfg: RunConfig, k: int) -> None:
    """k-means and the 2-D projection over every tile in bounded memory: both fit on a seeded sample of
    the stored embeddings (k-means 100k rows, PCA 200k, UMAP 50k) and then label/project all tiles
    batch by batch, straight into the atlas columns; memory does not grow with the number of tiles."""
    emb = w.tile_column_reader("embedding")  # float16 on disk; k-means and PCA convert batch by batch
    kk = cfg.kmeans_k or k
    if len(emb) >= kk:
        km = fit_kmeans(emb, kk, seed=cfg.seed)
        assign_labels(km, emb, w.new_tile_column("kmeans_cluster", (), np.int16, attrs={"k": kk, "seed": cfg.seed}))
        w.put_group("kmeans", {"centers": np.asarray(km.cluster_centers_, np.float32)})
    proj = w.new_tile_column("proj", (2,), np.float32)
    _, params = project(emb, method=cfg.projection, seed=cfg.seed, out=proj)
    w.set_tile_column_attrs("proj", params)


_PROTO_COLS = ("slide", "tile", "cluster", "weight", "cell_y", "cell_x")
_PROTO_DTYPES = (np.int32, np.int64, np.int16, np.float32, np.int16, np.int16)


def _proto_rows(p: dict) -> list[tuple]:
    """One slide's prototype candidates as rows (slide, tile, cluster, weight, cell_y, cell_x, jpeg)."""
    return [(p["slide"], int(p["tile"][i]), int(p["cluster"][i]), float(p["weight"][i]),
             int(p["cell_y"][i]), int(p["cell_x"][i]), p["crop"][i]) for i in range(len(p["cluster"]))]


def _choose_prototypes(rows: list[tuple], k: int, keep: int) -> list[tuple]:
    """Global top `keep` cells per cluster, at most ceil(keep / 4) from one slide when several slides
    contribute, so one slide cannot fill a cluster's gallery. Choosing again from (chosen so far + a new
    slide's rows) gives what choosing from all rows at once gives, so the assembly keeps only the chosen
    rows between slides: memory of k x keep crops, not of every slide's candidates."""
    n_slides = len({r[0] for r in rows})
    per_slide_cap = keep if n_slides <= 1 else max(1, math.ceil(keep / 4))
    chosen = []
    for c in range(k):
        taken: dict[int, int] = {}
        for r in sorted((r for r in rows if r[2] == c), key=lambda r: -r[3]):
            if taken.get(r[0], 0) < per_slide_cap:
                chosen.append(r)
                taken[r[0]] = taken.get(r[0], 0) + 1
                if sum(taken.values()) >= keep:
                    break
    return chosen


def _prototype_arrays(chosen: list[tuple]) -> dict[str, Any]:
    out: dict[str, Any] = {name: np.array([r[i] for r in chosen], dtype=dt) for i, (name, dt) in
                           enumerate(zip(_PROTO_COLS, _PROTO_DTYPES))}
    if chosen:
        out["jpeg"] = [r[6] for r in chosen]
    return out
