"""Human and JSON summaries of an atlas (`precompute inspect`). Reads through store.Atlas only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .cellmask import concept_tissue_flags
from .store import Atlas


def _read(path: Path) -> dict[str, Any]:
    """What the summary needs from the atlas, read in one open: root attrs, the slide table, the tile
    columns present, the slide, NMF/k-means cluster and recon_err columns (n_tiles,), the clusters group
    and its attrs, prototypes, projection attrs, the number of slides with maps, per-concept glass flags."""
    with Atlas(path) as atlas:
        cols = atlas.tile_names()
        k = atlas.k
        return {
            "attrs": atlas.attrs, "slides": atlas.slides(), "n_tiles": atlas.n_tiles, "k": k, "cols": cols,
            "tiles": atlas.tiles([c for c in ("slide", "nmf_cluster", "kmeans_cluster", "recon_err") if c in cols]),
            "clusters": atlas.group("clusters"), "cattrs": atlas.group_attrs("clusters"),
            "protos": atlas.group("clusters/prototypes"),
            "proj_attrs": atlas.tile_attrs("proj") if "proj" in cols else {},
            "n_maps": sum(atlas.slide_maps(i) is not None for i in range(atlas.n_slides)),
            "on_glass": concept_tissue_flags((atlas.slide_map(i, "concept_cells") for i in range(atlas.n_slides)), k),
        }


def _by_diagnosis(diag: list[str], status: list[str], tiles_per_slide: np.ndarray) -> dict[str, dict[str, int]]:
    """Per diagnosis: slides, how many ended ok / no_tissue / failed, and tiles."""
    by_diag: dict[str, dict[str, int]] = {}
    for d, s, n in zip(diag, status, tiles_per_slide):
        row = by_diag.setdefault(d, {"slides": 0, "ok": 0, "no_tissue": 0, "failed": 0, "tiles": 0})
        row["slides"] += 1
        row[s] = row.get(s, 0) + 1
        row["tiles"] += int(n)
    return by_diag


def _cluster_rows(r: dict[str, Any], diag: list[str]) -> list[dict[str, Any]]:
    """One row per NMF concept (1-based `cluster`): tiles it dominates, their share of all tiles and count per
    diagnosis, its prototypes, and where its map cells lie (glass and tissue-edge shares, the flag)."""
    tiles, protos, on_glass = r["tiles"], r["protos"], r["on_glass"]
    nmf = tiles.get("nmf_cluster", np.zeros(0, int))
    slide_diag = np.array(diag, dtype=object)
    rows = []
    for c in range(r["k"]):
        members = nmf == c
        diag_counts = Counter(slide_diag[tiles["slide"][members]]) if members.any() else Counter()
        rows.append({
            "cluster": c + 1, "tiles": int(members.sum()),
            "share": float(members.mean()) if len(nmf) else 0.0,
            "by_diagnosis": dict(sorted(diag_counts.items())),
            "prototypes": int((protos.get("cluster", np.zeros(0)) == c).sum()),
            "map_cells": on_glass[c]["cells"], "glass_share": on_glass[c]["glass_share"],
            "edge_share": on_glass[c]["edge_share"], "on_glass_or_edges": on_glass[c]["flag"],
        })
    return rows


def summarise(path: Path) -> dict[str, Any]:
    """Everything `inspect` shows, as plain JSON-able values."""
    r = _read(path)
    attrs, slides, tiles, n_tiles = r["attrs"], r["slides"], r["tiles"], r["n_tiles"]
    diag = [d or "(none)" for d in slides["diagnosis"]]
    status = list(slides["status"])
    km = tiles.get("kmeans_cluster")
    return {
        "format": attrs.get("format"), "format_version": attrs.get("format_version"),
        "file": str(path),
        "tool_version": attrs.get("tool_version"),
        "created_utc": attrs.get("created_utc"),
        "command_line": attrs.get("command_line"),
        "model": attrs.get("model_source"),
        "model_sha256": attrs.get("model_sha256"),
        "layer": attrs.get("layer"),
        "layer_shape": attrs.get("layer_shape"),
        "device": attrs.get("device"),
        "config": attrs.get("config", {}),
        "slides": {"total": len(status), "ok": status.count("ok"), "no_tissue": status.count("no_tissue"),
                   "failed": status.count("failed"), "with_maps": r["n_maps"],
                   "failures": [{"slide_id": i, "error": e} for i, s, e in
                                zip(slides["slide_id"], status, slides["error"]) if s == "failed"]},
        "by_diagnosis": _by_diagnosis(diag, status, slides["n_tiles"]),
        "tiles": int(n_tiles),
        "tile_columns": r["cols"],
        "clusters": {"k": r["k"], "relative_error": r["cattrs"].get("relative_error"),
                     "nmf": _cluster_rows(r, diag),
                     "kmeans_sizes": [int((km == c).sum()) for c in range(int(km.max()) + 1)] if km is not None
                     and len(km) else [],
                     "distances": np.asarray(r["clusters"].get("distances", np.zeros((0, 0)))).round(4).tolist()},
        "fit": attrs.get("fit", {}),
        "projection": r["proj_attrs"],
        "mean_tile_recon_err": float(np.mean(tiles["recon_err"])) if "recon_err" in tiles and n_tiles else None,
    }


def _glass_note(row: dict[str, Any]) -> str:
    """'  cells: 35% glass, 10% edge  FLAG: mostly on glass or tissue edges' (empty for older atlases)."""
    if not row.get("map_cells"):
        return ""
    flag = "  FLAG: mostly on glass or tissue edges" if row.get("on_glass_or_edges") else ""
    return f"  cells: {row['glass_share']:.0%} glass, {row['edge_share']:.0%} edge{flag}"


def format_summary(s: dict[str, Any]) -> str:
    """Plain-text rendering of summarise()."""
    cfg = s.get("config", {})
    lines = [
        f"{s['file']}  ({s['format']} v{s['format_version']}, Lumen {s['tool_version']}, {s['created_utc']})",
        f"model   {s['model']}  layer {s['layer']} {s['layer_shape']}  sha256 {str(s['model_sha256'])[:12]}",
        f"tiles   {cfg.get('tile_px')} px at {cfg.get('target_mpp')} um/px, stride {cfg.get('stride_px')} px, "
        f"min tissue {cfg.get('min_tissue')}; K={cfg.get('k')} seed={cfg.get('seed')} device {s['device']}",
        f"command {s['command_line']}",
        "",
        f"slides  {s['slides']['total']} ({s['slides']['ok']} ok, {s['slides']['no_tissue']} without tissue, "
        f"{s['slides']['failed']} failed); {s['tiles']} tiles",
    ]
    for d, row in sorted(s["by_diagnosis"].items()):
        lines.append(f"  {d:20s} {row['slides']:6d} slides {row['tiles']:9d} tiles  "
                     f"({row.get('ok', 0)} ok, {row.get('no_tissue', 0)} no tissue, {row.get('failed', 0)} failed)")
    for f in s["slides"]["failures"]:
        lines.append(f"  failed {f['slide_id']}: {f['error']}")
    c = s["clusters"]
    err = c.get("relative_error")
    lines += ["", f"clusters  NMF K={c['k']}, relative reconstruction error "
              f"{'n/a' if err is None else format(err, '.3f')}; fit {s.get('fit', {})}"]
    if s.get("notes_source"):
        lines.append(f"  ({s['notes_source']})")
    for row in c["nmf"]:
        mix = ", ".join(f"{d}: {n}" for d, n in row["by_diagnosis"].items())
        name = f"  {row['name']}" if row.get("name") else ""
        lines.append(f"  {row['cluster']:2d}{name}  {row['tiles']:8d} tiles ({row['share']:6.1%})  "
                     f"{row['prototypes']} prototypes  [{mix}]" + _glass_note(row))
        if row.get("note"):
            lines += [f"      {line}" for line in row["note"].splitlines()]
    if c["kmeans_sizes"]:
        lines.append(f"  k-means sizes: {c['kmeans_sizes']}")
    proj = s.get("projection") or {}
    lines.append(f"projection {proj.get('method', 'n/a')} {({k: v for k, v in proj.items() if k != 'method'})}")
    lines.append(f"columns   {', '.join(s['tile_columns'])}")
    return "\n".join(lines)


def add_notes(s: dict[str, Any], notes, source: str) -> dict[str, Any]:
    """Put concept names and notes (precompute.notes.Notes or None) into a summarise() result:
    `name` and `note` per NMF cluster row, `notes_source` (where they came from or why ignored)."""
    s["notes_source"] = source
    if notes is not None:
        s["note"] = notes.note
    for row in s["clusters"]["nmf"]:
        row["name"] = notes.name(row["cluster"] - 1) if notes else ""
        row["note"] = notes.concept_note(row["cluster"] - 1) if notes else ""
    return s
