"""Load an atlas once per server process and keep its hot arrays in memory.

Everything the pages draw comes from `AtlasData`: the slide table and the per-tile columns the
views need (no embeddings), plus a few per-slide sums made once at load. Thumbnails, prototype
crops and slide maps are read lazily through `precompute.store.Atlas` (read-only, no file lock).
Memory for N tiles, K concepts, O outputs: about N * (4 * (K + O) + 40) bytes (1e6 tiles, K=6,
O=24: ~160 MB).
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from precompute.explained import default_output
from precompute.store import Atlas, AtlasFormatError, damaged

from .labels import concept_label

NO_DIAGNOSIS = "(none)"

__all__ = ["AtlasData", "AtlasFormatError", "load", "NO_DIAGNOSIS"]


@dataclass
class AtlasData:
    """Hot, read-only arrays of one atlas. n = tiles, S = slides, K = concepts, O = outputs.

    tile_slide (n,) int32 slide index; nmf (n,) int16 dominant concept (0-based); kmeans (n,) int16 or
    None; proj (n,2) float32 or None; weights (n,K) float32 summed per-cell NMF weights; out (n,O)
    float32 probabilities (or logits when the atlas has none, see `out_kind`); top (n,) int16 argmax
    of out; x, y (n,) int64 level-0 top-left; tile_diag (n,) int16 code into `diagnoses`.
    slides: DataFrame, one row per slide (store columns + meta.*); slide_diag (S,) int16;
    slide_weight (S,K) float64 summed weights; slide_count (S,K) int64 tiles per dominant concept.
    """

    path: Path
    key: str
    atlas: Atlas
    attrs: dict[str, Any]
    slides: pd.DataFrame
    k: int
    output_names: list[str]
    out_kind: str
    tile_slide: np.ndarray
    nmf: np.ndarray
    kmeans: np.ndarray | None
    proj: np.ndarray | None
    weights: np.ndarray
    out: np.ndarray
    top: np.ndarray
    x: np.ndarray
    y: np.ndarray
    diagnoses: list[str]
    slide_diag: np.ndarray
    tile_diag: np.ndarray
    slide_weight: np.ndarray
    slide_count: np.ndarray
    clusters: dict[str, np.ndarray]
    protos: dict[str, np.ndarray]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _perm: np.ndarray | None = field(default=None, repr=False)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, key: str = "") -> "AtlasData":
        """Read the hot arrays. Raises AtlasFormatError for a missing/non-atlas/other-version file."""
        atlas = Atlas(path)
        try:
            return cls._read(atlas, key)
        except AtlasFormatError:
            atlas.close()
            raise
        except (KeyError, ValueError, OSError, IndexError) as exc:  # damage the store's checks do not see
            atlas.close()
            raise damaged(path, "the tile table", f"cannot be read ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _read(cls, atlas: Atlas, key: str) -> "AtlasData":
        attrs = atlas.attrs
        raw = atlas.slides()
        slides = pd.DataFrame({name: raw[name] for name in raw})
        slides["diagnosis"] = [d if d else NO_DIAGNOSIS for d in slides["diagnosis"]]
        names = set(atlas.tile_names())
        want = [c for c in ("slide", "nmf_cluster", "kmeans_cluster", "proj", "weights", "x", "y") if c in names]
        out_kind = "probs" if "probs" in names else "outputs"
        t = atlas.tiles(want + [out_kind])
        n = atlas.n_tiles
        k = atlas.k or t["weights"].shape[1]
        weights = np.asarray(t["weights"], np.float32).reshape(n, k)
        out = np.asarray(t[out_kind], np.float32)
        out = out.reshape(n, -1) if n else np.zeros((0, len(atlas.output_names)), np.float32)
        tile_slide = np.asarray(t["slide"], np.int32)
        nmf = np.asarray(t["nmf_cluster"], np.int16)
        diagnoses = sorted(set(slides["diagnosis"]))
        code = {d: i for i, d in enumerate(diagnoses)}
        slide_diag = np.array([code[d] for d in slides["diagnosis"]], np.int16)
        s = len(slides)
        slide_weight = np.zeros((s, k), np.float64)
        for j in range(k):  # per-slide sums of each concept's weight
            slide_weight[:, j] = np.bincount(tile_slide, weights=weights[:, j], minlength=s)
        slide_count = np.bincount(tile_slide.astype(np.int64) * k + nmf, minlength=s * k).reshape(s, k)
        protos = atlas.group("clusters/prototypes")
        return cls(
            path=atlas.path, key=key, atlas=atlas, attrs=attrs, slides=slides, k=k,
            output_names=atlas.output_names or [f"output {i}" for i in range(out.shape[1])], out_kind=out_kind,
            tile_slide=tile_slide, nmf=nmf,
            kmeans=np.asarray(t["kmeans_cluster"], np.int16) if "kmeans_cluster" in t else None,
            proj=np.asarray(t["proj"], np.float32) if "proj" in t else None,
            weights=weights, out=out,
            top=out.argmax(axis=1).astype(np.int16) if out.shape[1] else np.zeros(n, np.int16),
            x=np.asarray(t["x"]), y=np.asarray(t["y"]), diagnoses=diagnoses, slide_diag=slide_diag,
            tile_diag=slide_diag[tile_slide] if n else np.zeros(0, np.int16),
            slide_weight=slide_weight, slide_count=slide_count,
            clusters=atlas.group("clusters"), protos={k_: v for k_, v in protos.items() if not k_.startswith("jpeg")},
        )

    # -- sizes --------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.tile_slide)

    @property
    def n_slides(self) -> int:
        return len(self.slides)

    @functools.cached_property
    def proj_nonfinite(self) -> int:
        """Tiles whose 2-D projection is NaN or infinite (0 without a projection)."""
        return 0 if self.proj is None else int((~np.isfinite(self.proj)).any(axis=1).sum())

    @property
    def default_output(self) -> int:
        """Output shown first: the run's default explained output (explained.default_output), else output 0."""
        return default_output(self.output_names)[0] or 0

    @property
    def out_label(self) -> str:
        return "probability" if self.out_kind == "probs" else "logit"

    # -- filters ------------------------------------------------------------------------
    def diag_codes(self, diagnoses: list[str] | None) -> np.ndarray:
        """Codes of the selected diagnoses; None or [] = all."""
        if not diagnoses:
            return np.arange(len(self.diagnoses))
        return np.array([self.diagnoses.index(d) for d in diagnoses if d in self.diagnoses], np.int64)

    def slide_mask(self, diagnoses: list[str] | None) -> np.ndarray:
        """(S,) bool: slides whose diagnosis is selected."""
        return np.isin(self.slide_diag, self.diag_codes(diagnoses))

    def tile_mask(self, diagnoses: list[str] | None) -> np.ndarray:
        """(n,) bool: tiles of selected slides."""
        if not diagnoses:
            return np.ones(self.n, bool)
        return self.slide_mask(diagnoses)[self.tile_slide]

    def permutation(self) -> np.ndarray:
        """A fixed (seed 0) random order of all tiles: the first m that pass a filter are its sample."""
        if self._perm is None:
            self._perm = np.random.default_rng(0).permutation(self.n).astype(np.int64)
        return self._perm

    # -- lazy reads (h5py serialises calls; the lock keeps sessions from interleaving) ---
    def thumbnails(self, rows) -> list[bytes]:
        with self._lock:
            return self.atlas.thumbnails([int(r) for r in rows])

    def prototype_crops(self, rows) -> list[bytes]:
        with self._lock:
            return self.atlas.ragged("clusters/prototypes", "jpeg", [int(r) for r in rows])

    @functools.lru_cache(maxsize=8)
    def slide_maps(self, index: int):
        """SlideMaps of slide `index` (None for failed / no-tissue slides); the last 8 are kept."""
        with self._lock:
            return self.atlas.slide_maps(int(index))

    def __hash__(self) -> int:  # for lru_cache on methods
        return hash(self.key or str(self.path))

    def __eq__(self, other) -> bool:
        return self is other

    # -- labels -------------------------------------------------------------------------
    def slide_ids(self) -> np.ndarray:
        return self.slides["slide_id"].to_numpy()

    def tile_table(self, rows: np.ndarray) -> pd.DataFrame:
        """One row per tile: row, slide, diagnosis, x, y, concept (number and label), k-means, top output,
        weights (for CSV)."""
        rows = np.asarray(rows, np.int64)
        s = self.tile_slide[rows]
        df = pd.DataFrame({
            "tile": rows, "slide_id": self.slide_ids()[s], "diagnosis": self.slides["diagnosis"].to_numpy()[s],
            "x": self.x[rows], "y": self.y[rows], "concept": self.nmf[rows] + 1,
            "concept_name": np.array([concept_label(j) for j in range(self.k)], dtype=object)[self.nmf[rows]],
        })
        if self.kmeans is not None:
            df["kmeans"] = self.kmeans[rows] + 1
        df["top_output"] = np.array(self.output_names, dtype=object)[self.top[rows]] if len(rows) else []
        df[f"top_{self.out_label}"] = self.out[rows, self.top[rows]] if len(rows) else []
        for j in range(self.k):
            df[f"weight_C{j + 1}"] = self.weights[rows, j]
        return df


def file_key(path: str | os.PathLike) -> str:
    """path + mtime + size: a rebuilt atlas gets a fresh cache entry."""
    p = Path(path).expanduser().resolve()
    try:
        st_ = p.stat()
        return f"{p}|{st_.st_mtime_ns}|{st_.st_size}"
    except OSError:
        return f"{p}|missing"


@st.cache_resource(max_entries=2, show_spinner="Reading the atlas…")
def _load(key: str) -> AtlasData:
    return AtlasData.open(key.split("|")[0], key)


def load(path: str | os.PathLike) -> AtlasData:
    """Cached AtlasData for `path` (keyed by path + mtime + size). Raises AtlasFormatError."""
    key = file_key(path)
    if key.endswith("|missing"):
        Atlas(path)  # raises the store's own "no such file" message
    return _load(key)
