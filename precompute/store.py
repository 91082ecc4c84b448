"""The Lumen atlas: one self-describing HDF5 file per run. This module owns the format.

Writer (`AtlasWriter`), reader (`Atlas`) and the schema version live here and nowhere else;
the pipeline and the dashboard go through this module. It imports no torch, so the
read-only dashboard can use it. The layout is documented in docs/atlas-format.md.

Conventions: coordinates are level-0 pixels; `mpp` is micrometres per level-0 pixel;
cluster ids are 0-based in arrays, and 1-based in the hard cluster maps where 0 = no tissue.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from .atomic import atomic_path

FORMAT_NAME = "lumen-atlas"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: large enough for fast scans, small enough for random reads

STR = h5py.string_dtype("utf-8")

# Slide-table columns every atlas has, in order; extra manifest columns go to slides/meta/<name>.
SLIDE_COLUMNS: dict[str, Any] = {
    "slide_id": STR,
    "path": STR,
    "diagnosis": STR,
    "patient": STR,
    "status": STR,          # "ok", "no_tissue" or "failed"
    "error": STR,           # failure reason ("" when ok)
    "mpp": np.float32,      # um per level-0 px; NaN when tiled at native resolution
    "mpp_source": STR,      # "file", "manifest", "cli" or "native"
    "width": np.int64,      # level-0 px
    "height": np.int64,
    "n_tiles": np.int64,
    "tile_start": np.int64,  # first row of this slide in tiles/
    "tile_l0": np.float32,   # tile side, level-0 px
    "cell_l0": np.float32,   # cluster-map cell side, level-0 px
}


class AtlasFormatError(Exception):
    """The file is not a Lumen atlas this version can read; the message says why and what to do."""


def chunk_rows(row_nbytes: int, n_rows: int | None = None) -> int:
    """Rows per chunk so that a chunk holds about CHUNK_BYTES."""
    rows = max(1, CHUNK_BYTES // max(1, row_nbytes))
    if n_rows is not None:
        rows = max(1, min(rows, n_rows))
    return rows


def _row_chunks(shape: tuple[int, ...], dtype) -> tuple[int, ...] | None:
    if shape[0] == 0:
        return None
    row_nbytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    return (chunk_rows(row_nbytes, shape[0]),) + tuple(shape[1:])


def _write_column(group: h5py.Group, name: str, data: np.ndarray, **kw) -> h5py.Dataset:
    data = np.asarray(data)
    if data.dtype.kind in "OUS":
        return group.create_dataset(name, data=np.asarray(data, dtype=object), dtype=STR)
    return group.create_dataset(name, data=data, chunks=_row_chunks(data.shape, data.dtype), **kw)


def _attr_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if value is None:
        return ""
    return value


def pack_ragged(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Many byte strings -> one uint8 array plus int64 offsets of length len(blobs)+1."""
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    if blobs:
        offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), offsets


class _Appendable:
    """A row-chunked dataset that grows as slides are added."""

    def __init__(self, group: h5py.Group, name: str, row_shape: tuple[int, ...], dtype):
        self.ds = group.create_dataset(
            name, shape=(0,) + row_shape, maxshape=(None,) + row_shape, dtype=dtype,
            chunks=(chunk_rows(int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize),) + row_shape,
            # LZF: fast enough not to slow reads, and a part-filled last chunk (the whole column in a
            # small atlas) costs its content, not a full MiB.
            compression="lzf",
        )

    def append(self, rows: np.ndarray) -> None:
        n0 = self.ds.shape[0]
        self.ds.resize(n0 + len(rows), axis=0)
        if len(rows):
            self.ds[n0:] = rows


class AtlasWriter:
    """Write an atlas under a temporary name; it appears at `path` only when `close()` succeeds.

    Usage::

        with AtlasWriter(path, attrs=..., embedding_dim=C, output_names=[...], k=K) as w:
            for slide in slides: w.add_slide(row, tiles, maps)
            w.put_tile_column("proj", coords, attrs={...})
            w.put_clusters(H=..., distances=..., prototypes=...)

    An exception inside the `with` block removes the temporary file; an existing atlas at
    `path` is only replaced by a complete new one.
    """

    TILE_COLUMNS = {  # name -> (row shape builder, dtype)
        "slide": ((), np.int32),
        "x": ((), np.int64),
        "y": ((), np.int64),
        "tissue_frac": ((), np.float32),
    }

    def __init__(self, path: str | os.PathLike, *, attrs: Mapping[str, Any], embedding_dim: int,
                 output_names: Sequence[str], k: int, has_probs: bool,
                 extra_columns: Mapping[str, tuple[tuple[int, ...], Any]] | None = None):
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self.f = h5py.File(self._tmp, "w")
        self.f.attrs["format"] = FORMAT_NAME
        self.f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            self.f.attrs[key] = _attr_value(value)
        self.k = k
        self.slide_rows: list[dict[str, Any]] = []
        self.meta_rows: list[dict[str, str]] = []
        tiles = self.f.create_group("tiles")
        tiles.attrs["output_names"] = json.dumps(list(output_names))
        n_out = len(output_names)
        cols = dict(self.TILE_COLUMNS)
        cols["embedding"] = ((embedding_dim,), np.float16)
        cols["outputs"] = ((n_out,), np.float32)
        if has_probs:
            cols["probs"] = ((n_out,), np.float32)
        cols["weights"] = ((k,), np.float32)
        cols["nmf_cluster"] = ((), np.int16)
        cols["recon_err"] = ((), np.float32)
        cols.update(extra_columns or {})
        cols["thumb_offsets"] = ((), np.int64)
        self._cols = {name: _Appendable(tiles, name, shape, dt) for name, (shape, dt) in cols.items()}
        self._thumbs = _Appendable(tiles, "thumb_jpeg", (), np.uint8)
        self._cols["thumb_offsets"].append(np.zeros(1, dtype=np.int64))
        self._n_tiles = 0
        self._n_thumb_bytes = 0
        self.f.create_group("slide_maps")

    # -- slides and their tiles ---------------------------------------------------------
    def add_slide(self, row: Mapping[str, Any], meta: Mapping[str, str] | None = None,
                  tiles: Mapping[str, np.ndarray] | None = None,
                  maps: Mapping[str, np.ndarray] | None = None,
                  map_attrs: Mapping[str, Any] | None = None) -> int:
        """Append one slide. Returns its index.

        row: SLIDE_COLUMNS values (tile_start/n_tiles are filled here).
        tiles: per-tile arrays of equal length n: x, y, tissue_frac, embedding (n,C), outputs (n,O),
               probs (n,O) if the atlas has them, weights (n,K), nmf_cluster (n,), recon_err (n,),
               the extra columns named at construction, thumb_jpeg (list of n JPEG byte strings).
        maps: per-slide images stored under slide_maps/<index>/: thumbnail (h,w,3) uint8,
              tissue (h,w) bool, hard (gh,gw) uint8, soft (K,gh,gw) float16, ...
        """
        index = len(self.slide_rows)
        n = 0 if tiles is None else len(tiles["x"])
        full = {name: "" if dt is STR else 0 for name, dt in SLIDE_COLUMNS.items()}
        full.update(row)
        full["tile_start"] = self._n_tiles
        full["n_tiles"] = n
        self.slide_rows.append(full)
        self.meta_rows.append(dict(meta or {}))
        if n:
            for name, app in self._cols.items():
                if name == "slide":
                    app.append(np.full(n, index, dtype=np.int32))
                elif name == "thumb_offsets":
                    blobs = list(tiles["thumb_jpeg"])
                    data, offs = pack_ragged(blobs)
                    self._thumbs.append(data)
                    app.append(offs[1:] + self._n_thumb_bytes)
                    self._n_thumb_bytes += len(data)
                else:
                    if name not in tiles:
                        raise ValueError(f"tile column {name!r} missing for slide {row.get('slide_id')!r}")
                    app.append(np.asarray(tiles[name]).astype(app.ds.dtype, copy=False))
            self._n_tiles += n
        if maps:
            g = self.f["slide_maps"].create_group(str(index))
            for name, arr in maps.items():
                arr = np.asarray(arr)
                chunks = True if arr.ndim >= 2 and arr.size > 0 else None
                g.create_dataset(name, data=arr, chunks=chunks, compression="gzip" if chunks else None,
                                 compression_opts=4 if chunks else None)
            for key, value in (map_attrs or {}).items():
                g.attrs[key] = _attr_value(value)
        return index

    # -- columns computed over all tiles ------------------------------------------------
    def put_tile_column(self, name: str, data: np.ndarray, attrs: Mapping[str, Any] | None = None) -> None:
        """Store a column of length n_tiles computed after all slides (k-means, projection, ...)."""
        data = np.asarray(data)
        if len(data) != self._n_tiles:
            raise ValueError(f"column {name!r} has {len(data)} rows, atlas has {self._n_tiles} tiles")
        ds = _write_column(self.f["tiles"], name, data)
        for key, value in (attrs or {}).items():
            ds.attrs[key] = _attr_value(value)

    def put_group(self, group: str, arrays: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> None:
        """Store named arrays (and attrs) under `group` (e.g. clusters, clusters/prototypes)."""
        g = self.f.require_group(group)
        for name, data in arrays.items():
            if isinstance(data, (list, tuple)) and data and isinstance(data[0], (bytes, bytearray)):
                packed, offsets = pack_ragged(list(data))
                _write_column(g, name + "_bytes", packed)
                _write_column(g, name + "_offsets", offsets)
            else:
                _write_column(g, name, np.asarray(data))
        for key, value in (attrs or {}).items():
            g.attrs[key] = _attr_value(value)

    @property
    def n_tiles(self) -> int:
        return self._n_tiles

    def tile_column(self, name: str) -> np.ndarray:
        """Read back a tile column written so far (for statistics computed over all tiles)."""
        return self.f["tiles"][name][()]

    def slide_column(self, name: str) -> list[Any]:
        """A slide-table column of the slides added so far."""
        return [r[name] for r in self.slide_rows]

    # -- finishing ----------------------------------------------------------------------
    def _write_slide_table(self) -> None:
        g = self.f.create_group("slides")
        for name, dt in SLIDE_COLUMNS.items():
            values = [r[name] for r in self.slide_rows]
            if dt is STR:
                g.create_dataset(name, data=np.array(["" if v is None else str(v) for v in values], dtype=object),
                                 dtype=STR)
            else:
                g.create_dataset(name, data=np.array(values, dtype=dt))
        meta_names = sorted({k for m in self.meta_rows for k in m})
        mg = g.create_group("meta")
        for name in meta_names:
            mg.create_dataset(name, data=np.array([str(m.get(name, "")) for m in self.meta_rows], dtype=object),
                              dtype=STR)

    def close(self) -> Path:
        """Finish the file and rename it into place. Returns the final path."""
        try:
            self._write_slide_table()
            self.f.attrs["n_slides"] = len(self.slide_rows)
            self.f.attrs["n_tiles"] = self._n_tiles
            self.f.close()
        except BaseException as exc:  # e.g. the disk filled: no temporary file may stay behind
            self.abort(exc)
            raise
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard the temporary file."""
        try:
            self.f.close()
        finally:
            err = exc or RuntimeError("atlas write aborted")
            try:
                self._ctx.__exit__(type(err), err, None)
            except BaseException as raised:  # atomic_path re-raises; we only want the clean-up
                if raised is not err:
                    raise

    def __enter__(self) -> "AtlasWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------

def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "O" or values.dtype.kind == "S":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


def _plain_attrs(attrs) -> dict[str, Any]:
    """HDF5 attributes as plain Python values (JSON strings decoded, numpy scalars unwrapped)."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out


@dataclass(frozen=True)
class SlideMaps:
    """One slide's images. Shapes: thumbnail (h,w,3) uint8; tissue (h,w) bool;
    hard (gh,gw) uint8 (0 = no tissue, k+1 = cluster k); soft (K,gh,gw) float16 mean NNLS weights."""

    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def get(self, name: str, default=None):
        return self.arrays.get(name, default)


class Atlas:
    """Read-only view of an atlas file. Validates format name and version on open.

    Opens the file with mode "r" and no HDF5 file locking, so it works on read-only files and
    while another process holds the file; it never writes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise AtlasFormatError(f"{self.path}: no such file. Create an atlas with "
                                   f"`python -m precompute run ...` or `python -m precompute demo`.")
        try:
            self.f = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise AtlasFormatError(f"{self.path}: not an HDF5 file ({exc}). "
                                   "Pass the .h5 atlas written by `python -m precompute run`.") from exc
        name = self.f.attrs.get("format")
        version = self.f.attrs.get("format_version")
        if name != FORMAT_NAME:
            self.f.close()
            raise AtlasFormatError(f"{self.path}: HDF5 file but not a Lumen atlas (format attribute "
                                   f"{name!r}, expected {FORMAT_NAME!r}).")
        if version != FORMAT_VERSION:
            self.f.close()
            raise AtlasFormatError(f"{self.path}: atlas format version {version}, this Lumen reads "
                                   f"version {FORMAT_VERSION}. Re-run `python -m precompute run` with this "
                                   "version, or open it with the Lumen version that wrote it.")
        self._slides: dict[str, np.ndarray] | None = None

    # -- root ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return _plain_attrs(self.f.attrs)

    @property
    def config(self) -> dict[str, Any]:
        return self.attrs.get("config", {}) or {}

    @property
    def n_tiles(self) -> int:
        return int(self.f.attrs["n_tiles"])

    @property
    def n_slides(self) -> int:
        return int(self.f.attrs["n_slides"])

    @property
    def k(self) -> int:
        return int(self.f["clusters/H"].shape[0]) if "clusters/H" in self.f else 0

    @property
    def output_names(self) -> list[str]:
        return json.loads(self.f["tiles"].attrs.get("output_names", "[]"))

    # -- slides -------------------------------------------------------------------------
    def slides(self) -> dict[str, np.ndarray]:
        """Slide table: column name -> array of length n_slides (manifest extras as meta.<name>)."""
        if self._slides is None:
            g = self.f["slides"]
            out = {name: _decode(g[name][()]) for name in g if isinstance(g[name], h5py.Dataset)}
            for name in g.get("meta", {}):
                out[f"meta.{name}"] = _decode(g["meta"][name][()])
            self._slides = out
        return self._slides

    def slide_maps(self, index: int) -> SlideMaps | None:
        """Images of slide `index`, or None for a slide without maps (failed, no tissue)."""
        key = f"slide_maps/{index}"
        if key not in self.f:
            return None
        g = self.f[key]
        return SlideMaps({n: g[n][()] for n in g}, _plain_attrs(g.attrs))

    # -- tiles --------------------------------------------------------------------------
    def tile_names(self) -> list[str]:
        return [n for n in self.f["tiles"] if n not in ("thumb_jpeg", "thumb_offsets")]

    def tiles(self, names: Iterable[str], rows: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        """Tile columns by name; `rows` (sorted indices or slice) limits the rows read."""
        g = self.f["tiles"]
        out = {}
        for name in names:
            ds = g[name]
            out[name] = ds[()] if rows is None else ds[rows]
        return out

    def tile_attrs(self, name: str) -> dict[str, Any]:
        return _plain_attrs(self.f["tiles"][name].attrs)

    def thumbnails(self, rows: Sequence[int]) -> list[bytes]:
        """JPEG bytes of the given tiles' thumbnails (read lazily, one slice each)."""
        offs = self.f["tiles/thumb_offsets"]
        data = self.f["tiles/thumb_jpeg"]
        out = []
        for r in rows:
            a, b = offs[int(r)], offs[int(r) + 1]
            out.append(data[a:b].tobytes())
        return out

    # -- clusters -----------------------------------------------------------------------
    def group(self, name: str) -> dict[str, np.ndarray]:
        """All arrays of a group such as 'clusters' (ragged byte arrays are left packed)."""
        if name not in self.f:
            return {}
        g = self.f[name]
        return {n: _decode(g[n][()]) for n in g if isinstance(g[n], h5py.Dataset)}

    def group_attrs(self, name: str) -> dict[str, Any]:
        return _plain_attrs(self.f[name].attrs) if name in self.f else {}

    def ragged(self, group: str, name: str, rows: Sequence[int] | None = None) -> list[bytes]:
        """Byte strings stored with `put_group(..., {name: [bytes, ...]})`."""
        data = self.f[f"{group}/{name}_bytes"]
        offs = self.f[f"{group}/{name}_offsets"][()]
        rows = range(len(offs) - 1) if rows is None else rows
        return [data[offs[r]:offs[r + 1]].tobytes() for r in rows]

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "Atlas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
