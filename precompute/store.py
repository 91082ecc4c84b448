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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from .atomic import atomic_path

FORMAT_NAME = "lumen-atlas"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: large enough for fast scans, small enough for random reads
THUMB_CHUNK_BYTES = 1 << 16  # tiles/thumb_jpeg: read a few thumbnails at a time, never scanned

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
    """The file is not a Lumen atlas this version can read; the message says why and what to do.

    `path` is the atlas file and `item` the missing or damaged part (e.g. "tiles/weights"), when known."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, item: str | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.item = item


REBUILD = "Re-run `python -m precompute run` with the same command to rebuild it"


def chunk_rows(row_nbytes: int, n_rows: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk holds about `chunk_bytes`."""
    rows = max(1, chunk_bytes // max(1, row_nbytes))
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


def unpack_ragged(data: Any, offsets: Any, rows: Iterable[int] | None = None) -> list[bytes]:
    """The byte strings `rows` (default: all) of a pack_ragged pair; data and offsets may be h5py datasets,
    which are then read one slice per row. On disk the pair is named per place (kept from earlier
    versions): tiles/thumb_jpeg + tiles/thumb_offsets, <group>/<name>_bytes + <group>/<name>_offsets in
    atlas groups, <name>__bytes + <name>__offsets in part files."""
    rows = range(len(offsets) - 1) if rows is None else rows
    return [data[int(offsets[int(r)]):int(offsets[int(r) + 1])].tobytes() for r in rows]


class _Appendable:
    """A row-chunked dataset that grows as slides are added."""

    def __init__(self, group: h5py.Group, name: str, row_shape: tuple[int, ...], dtype,
                 chunk_bytes: int = CHUNK_BYTES):
        row_nbytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.ds = group.create_dataset(
            name, shape=(0,) + row_shape, maxshape=(None,) + row_shape, dtype=dtype,
            chunks=(chunk_rows(row_nbytes, chunk_bytes=chunk_bytes),) + row_shape,
            # LZF: fast enough not to slow reads, and a part-filled last chunk (the whole column in a
            # small atlas) costs its content, not a full MiB.
            compression="lzf",
        )

    def append(self, rows: np.ndarray) -> None:
        n0 = self.ds.shape[0]
        self.ds.resize(n0 + len(rows), axis=0)
        if len(rows):
            self.ds[n0:] = rows


class TileColumn:
    """Read-only, array-like view of an HDF5 tile column for passes over every tile in bounded memory.

    `shape`, `dtype`, and indexing by a slice (read as is) or by sorted row indices (a sample: read one
    block of `block_rows` rows at a time and keep the wanted rows, which is far faster than HDF5 point
    selection); memory is one block plus the result.
    """

    def __init__(self, ds: h5py.Dataset, block_rows: int = 65536):
        self.ds = ds
        self.block_rows = block_rows

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ds.shape

    @property
    def dtype(self) -> np.dtype:
        return self.ds.dtype

    def __len__(self) -> int:
        return self.ds.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (slice, int, np.integer)):
            return self.ds[key]
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows),) + self.ds.shape[1:], self.ds.dtype)
        if not len(rows):
            return out
        if (np.diff(rows) < 0).any() or rows[0] < 0 or rows[-1] >= len(self):
            raise IndexError("TileColumn takes sorted row indices within the column")
        blocks, first = np.unique(rows // self.block_rows, return_index=True)
        ends = np.append(first[1:], len(rows))
        for b, i0, i1 in zip(blocks, first, ends):
            lo = int(b) * self.block_rows
            data = self.ds[lo:lo + self.block_rows]
            out[i0:i1] = data[rows[i0:i1] - lo]
        return out

    def batches(self, batch_rows: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """(rows, values) for consecutive blocks of rows covering the column."""
        step = batch_rows or self.block_rows
        for start in range(0, len(self), step):
            sl = slice(start, min(start + step, len(self)))
            yield sl, self.ds[sl]


class ColumnWriter:
    """Write access to one computed tile column: `writer[rows] = values` (a slice, or sorted indices)."""

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ds.shape

    def __setitem__(self, key, values) -> None:
        self.ds[key] = values


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
        # Thumbnails are read a few at a time at random (a gallery): with 64 KiB chunks one costs a 64 KiB
        # decompression, not 1 MiB (24 thumbnails of a 10^6-tile atlas: 6 ms instead of 75 ms).
        self._thumbs = _Appendable(tiles, "thumb_jpeg", (), np.uint8, chunk_bytes=THUMB_CHUNK_BYTES)
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

    def new_tile_column(self, name: str, row_shape: tuple[int, ...], dtype,
                        attrs: Mapping[str, Any] | None = None) -> "ColumnWriter":
        """A column of n_tiles rows computed after all slides, filled batch by batch through the returned
        writer (`writer[rows] = values`), so it never has to be in memory whole. Same layout as
        put_tile_column; rows never written read as 0."""
        shape = (self._n_tiles,) + tuple(row_shape)
        ds = self.f["tiles"].create_dataset(name, shape=shape, dtype=dtype, chunks=_row_chunks(shape, dtype))
        for key, value in (attrs or {}).items():
            ds.attrs[key] = _attr_value(value)
        return ColumnWriter(ds)

    def set_tile_column_attrs(self, name: str, attrs: Mapping[str, Any]) -> None:
        """Attributes of a tile column (e.g. parameters known once a streamed column is complete)."""
        for key, value in attrs.items():
            self.f["tiles"][name].attrs[key] = _attr_value(value)

    def tile_column_reader(self, name: str) -> "TileColumn":
        """A tile column written so far, read on demand (slices, or sorted row samples)."""
        return TileColumn(self.f["tiles"][name])

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

    def slide_map(self, index: int, name: str) -> np.ndarray | None:
        """Read back one map of slide `index` written so far (e.g. gradcam, soft, hard); None when absent."""
        key = f"slide_maps/{index}/{name}"
        return self.f[key][()] if key in self.f else None

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


# ----------------------------------------------------------------------------------------
# Validation: what every reader (inspect, report, dashboard) may rely on once an atlas opened
# ----------------------------------------------------------------------------------------

_KINDS = {"int": "iu", "float": "f", "str": "OS", "bytes": "u"}
# tiles/ columns readers need: name -> dtype kind; row shapes are checked in _check_tiles.
REQUIRED_TILE_COLUMNS = {"slide": "int", "x": "int", "y": "int", "weights": "float", "nmf_cluster": "int",
                         "outputs": "float", "thumb_offsets": "int", "thumb_jpeg": "bytes"}
PROTOTYPE_COLUMNS = {"cluster": "int", "slide": "int", "tile": "int", "weight": "float", "cell_y": "int",
                     "cell_x": "int"}


def damaged(path: str | os.PathLike, item: str, problem: str, command: str | None = None) -> AtlasFormatError:
    """The error for a damaged atlas: the file, the item, what is wrong with it, and how to rebuild."""
    how = REBUILD + (f" (this atlas was made by: {command})" if command else "")
    return AtlasFormatError(f"{path}: damaged atlas: {item} {problem}. {how}.", path=path, item=item)


class _Check:
    """Helpers of `validate`: each failure raises `damaged(...)` naming the item."""

    def __init__(self, f: h5py.File, path: Path):
        self.f, self.path = f, path
        cmd = f.attrs.get("command_line")
        if isinstance(cmd, bytes):
            cmd = cmd.decode("utf-8", "replace")
        self.command = cmd if isinstance(cmd, str) and cmd else None

    def fail(self, item: str, problem: str) -> None:
        raise damaged(self.path, item, problem, self.command)

    def dataset(self, name: str, kind: str, ndim: int | None = None, required: bool = True) -> h5py.Dataset | None:
        """The dataset `name` (None when optional and absent), checked for dtype kind and rank."""
        obj = self.f.get(name)
        if obj is None:
            if required:
                self.fail(name, "is missing")
            return None
        if not isinstance(obj, h5py.Dataset):
            self.fail(name, "is a group, not a dataset")
        if obj.dtype.kind not in _KINDS[kind] or (kind == "bytes" and obj.dtype != np.uint8):
            self.fail(name, f"has dtype {obj.dtype}, expected {'uint8' if kind == 'bytes' else kind}")
        if ndim is not None and obj.ndim != ndim:
            self.fail(name, f"has shape {obj.shape}, expected {ndim} dimension(s)")
        return obj

    def shape(self, ds: h5py.Dataset, expected: tuple, what: str) -> None:
        if tuple(ds.shape) != tuple(expected):
            self.fail(ds.name.lstrip("/"), f"has shape {tuple(ds.shape)}, expected {tuple(expected)} ({what})")

    def int_attr(self, attrs, name: str, where: str = "root attribute ") -> int | None:
        value = attrs.get(name)
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            self.fail(f"{where}{name}", f"is {value!r} ({type(value).__name__}), expected an integer")
        return int(value)

    def json_attr(self, attrs, name: str, kind: type, where: str = "root attribute ") -> None:
        value = attrs.get(name)
        if value is None:
            return
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        try:
            parsed = json.loads(value) if isinstance(value, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, kind):
            self.fail(f"{where}{name}", f"is not a JSON {'object' if kind is dict else 'list'} ({str(value)[:60]!r})")


def _check_root(c: _Check) -> tuple[int, int]:
    """Counts in the root attributes, checked against the tables. Returns (n_tiles, n_slides)."""
    for name in ("slides", "tiles"):
        if not isinstance(c.f.get(name), h5py.Group):
            c.fail(f"group {name}/", "is missing")
    c.json_attr(c.f.attrs, "config", dict)
    c.json_attr(c.f.attrs, "fit", dict)
    c.json_attr(c.f["tiles"].attrs, "output_names", list, where="attribute tiles/")
    slide_ids = c.dataset("slides/slide_id", "str", ndim=1)
    rows = c.dataset("tiles/slide", "int", ndim=1)
    n, s = rows.shape[0], slide_ids.shape[0]
    for name, actual, table in (("n_tiles", n, "tiles/slide"), ("n_slides", s, "slides/slide_id")):
        value = c.int_attr(c.f.attrs, name)
        if value is None:
            c.fail(f"root attribute {name}", "is missing")
        if value != actual:
            c.fail(f"root attribute {name}", f"is {value} but {table} has {actual} rows")
    return n, s


def _check_clusters(c: _Check, n: int) -> tuple[int, int | None]:
    """clusters/H (K, C) when present (else K = columns of tiles/weights) and the arrays sized by K or C.
    Returns (K, C); C is None without H."""
    H = c.dataset("clusters/H", "float", ndim=2, required=False)
    w = c.f.get("tiles/weights")
    w_k = w.shape[1] if isinstance(w, h5py.Dataset) and w.ndim == 2 and w.shape[0] == n else None
    if H is None:
        return w_k or 0, None
    k, ch = H.shape
    if k < 1:
        c.fail("clusters/H", "has no rows (no concepts)")
    if w_k is not None and w_k != k:
        c.fail("clusters/H", f"has K = {k} rows (concepts) but tiles/weights has {w_k} columns")
    for name in ("distances", "cosine_similarity"):
        ds = c.dataset(f"clusters/{name}", "float", required=False)
        if ds is not None:
            c.shape(ds, (k, k), f"K = {k} concepts from clusters/H")
    for name in ("shift", "scale"):
        ds = c.dataset(f"clusters/{name}", "float", required=False)
        if ds is not None:
            c.shape(ds, (ch,), f"C = {ch} channels from clusters/H")
    for where, attrs in (("root attribute ", c.f.attrs), ("attribute clusters/", c.f["clusters"].attrs)):
        value = c.int_attr(attrs, "k", where=where)
        if value is not None and value != k:
            c.fail(f"{where}k", f"is {value} but clusters/H has K = {k} rows")
    return k, ch


def _check_slides(c: _Check, n: int, s: int) -> np.ndarray:
    """Slide-table columns of length S; n_tiles/tile_start must tile the N rows in order. Returns n_tiles."""
    for name, dt in SLIDE_COLUMNS.items():
        kind = "str" if dt is STR else "float" if np.dtype(dt).kind == "f" else "int"
        c.shape(c.dataset(f"slides/{name}", kind, ndim=1), (s,), f"one row per slide, {s} slides")
    for name in c.f["slides"].get("meta") or {}:
        c.shape(c.dataset(f"slides/meta/{name}", "str", ndim=1), (s,), f"one row per slide, {s} slides")
    counts = c.f["slides/n_tiles"][()].astype(np.int64)
    starts = c.f["slides/tile_start"][()].astype(np.int64)
    if (counts < 0).any() or counts.sum() != n:
        c.fail("slides/n_tiles", f"sums to {int(counts.sum())} tiles (or has negative values); the atlas has {n}")
    expected = np.concatenate([[0], np.cumsum(counts)[:-1]]) if s else counts
    if not np.array_equal(starts, expected):
        c.fail("slides/tile_start", "does not match the cumulative sum of slides/n_tiles")
    return counts


def _check_tiles(c: _Check, n: int, s: int, k: int, ch: int | None, counts: np.ndarray) -> None:
    """Every tiles/ column has N rows and the row shape readers expect; tile->slide and concepts in range."""
    for name, kind in REQUIRED_TILE_COLUMNS.items():
        c.dataset(f"tiles/{name}", kind)
    names = json.loads(c.f["tiles"].attrs.get("output_names", "[]"))
    outputs = c.dataset("tiles/outputs", "float", ndim=2)
    n_out = len(names) or outputs.shape[1]
    rows = {"weights": (k, "float", "K from clusters/H"), "outputs": (n_out, "float", "one per output name"),
            "probs": (n_out, "float", "one per output name"), "proj": (2, "float", "2-D projection"),
            "gradcam_r": (k, "float", "K from clusters/H"),
            "embedding": (ch, "float", "C from clusters/H")}
    for name, ds in c.f["tiles"].items():
        if name == "thumb_jpeg":
            c.dataset("tiles/thumb_jpeg", "bytes", ndim=1)
            continue
        if not isinstance(ds, h5py.Dataset):
            c.fail(f"tiles/{name}", "is a group, not a dataset")
        width, kind, what = rows.get(name, (None, None, ""))
        if kind:
            c.dataset(f"tiles/{name}", kind, ndim=2)
            c.shape(ds, (n, width if width is not None else ds.shape[1]), f"{n} tiles x {what}")
        elif ds.ndim < 1 or ds.shape[0] != n + (name == "thumb_offsets"):
            c.fail(f"tiles/{name}", f"has shape {ds.shape}, expected {n + (name == 'thumb_offsets')} rows "
                                   f"({n} tiles{' + 1' if name == 'thumb_offsets' else ''})")
    slide = c.f["tiles/slide"][()]
    if not np.array_equal(slide, np.repeat(np.arange(s), counts)):
        c.fail("tiles/slide", "does not match the slide table (slides/tile_start, slides/n_tiles)")
    _check_range(c, "tiles/nmf_cluster", c.f["tiles/nmf_cluster"][()], k, "K concepts")
    if "kmeans_cluster" in c.f["tiles"]:
        _check_range(c, "tiles/kmeans_cluster", c.f["tiles/kmeans_cluster"][()], None, "")
    offs = c.f["tiles/thumb_offsets"]
    if n and (int(offs[0]) != 0 or int(offs[-1]) != c.f["tiles/thumb_jpeg"].shape[0]):
        c.fail("tiles/thumb_offsets", f"does not span tiles/thumb_jpeg ({c.f['tiles/thumb_jpeg'].shape[0]} bytes)")


def _check_range(c: _Check, item: str, values: np.ndarray, upper: int | None, what: str) -> None:
    """Integer codes must lie in 0..upper-1 (or be >= 0 when upper is None)."""
    if not len(values):
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or (upper is not None and hi >= upper):
        bound = f"0..{upper - 1} ({what})" if upper is not None else "values >= 0"
        c.fail(item, f"has values from {lo} to {hi}, expected {bound}")


def _check_prototypes(c: _Check, n: int, s: int, k: int) -> None:
    """clusters/prototypes: equal-length columns, rows that point into the atlas, and their JPEG crops."""
    g = c.f.get("clusters/prototypes")
    if g is None:
        return
    p = None
    for name, kind in PROTOTYPE_COLUMNS.items():
        ds = c.dataset(f"clusters/prototypes/{name}", kind, ndim=1)
        p = ds.shape[0] if p is None else p
        c.shape(ds, (p,), "one row per prototype, as clusters/prototypes/cluster")
    for name, upper in (("cluster", k), ("slide", s), ("tile", n)):
        _check_range(c, f"clusters/prototypes/{name}", g[name][()], upper, f"{upper} {name}s")
    if p:
        c.dataset("clusters/prototypes/jpeg_bytes", "bytes", ndim=1)
        offs = c.dataset("clusters/prototypes/jpeg_offsets", "int", ndim=1)
        c.shape(offs, (p + 1,), f"{p} prototypes + 1")
        if int(offs[-1]) != g["jpeg_bytes"].shape[0]:
            c.fail("clusters/prototypes/jpeg_offsets", "does not span clusters/prototypes/jpeg_bytes")


def validate(f: h5py.File, path: str | os.PathLike) -> None:
    """Check what the readers need, once, on open: presence, dtypes, shapes and consistency of the
    root counts, the slide table, every tiles/ column, clusters and prototypes. Slide maps are checked
    when read (`check_slide_maps`). Raises AtlasFormatError naming the first damaged item."""
    c = _Check(f, Path(path))
    n, s = _check_root(c)
    k, ch = _check_clusters(c, n)
    counts = _check_slides(c, n, s)
    _check_tiles(c, n, s, k, ch, counts)
    _check_prototypes(c, n, s, k)


def check_slide_maps(f: h5py.File, path: str | os.PathLike, index: int, k: int, has_tiles: bool) -> None:
    """slide_maps/<index>: thumbnail (h,w,3) uint8 with attr thumb_downsample; for a slide with tiles
    also hard (gh,gw) integers, soft (K,gh,gw) floats and attr cell_l0. Raises AtlasFormatError."""
    c = _Check(f, Path(path))
    base = f"slide_maps/{index}"
    thumb = c.dataset(f"{base}/thumbnail", "int", ndim=3)
    if thumb.shape[2] != 3:
        c.fail(f"{base}/thumbnail", f"has shape {thumb.shape}, expected (h, w, 3)")
    attrs = f[base].attrs
    for name in ("thumb_downsample",) + (("cell_l0",) if has_tiles else ()):
        value = attrs.get(name)
        if not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value) or value <= 0:
            c.fail(f"attribute {base}/{name}", f"is {value!r}, expected a positive number (level-0 px)")
    if has_tiles:
        hard = c.dataset(f"{base}/hard", "int", ndim=2)
        soft = c.dataset(f"{base}/soft", "float", ndim=3)
        c.shape(soft, (k,) + tuple(hard.shape), f"K = {k} maps the size of {base}/hard")


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


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _open_hdf5(path: Path) -> h5py.File:
    """Open read-only without file locking; AtlasFormatError for a missing, foreign or truncated file."""
    if not path.exists():
        raise AtlasFormatError(f"{path}: no such file. Create an atlas with "
                               f"`python -m precompute run ...` or `python -m precompute demo`.", path=path)
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(HDF5_SIGNATURE))
        except OSError:
            head = b""
        if head == HDF5_SIGNATURE:
            raise damaged(path, "the file", f"is a damaged or truncated HDF5 file ({exc})") from exc
        raise AtlasFormatError(f"{path}: not an HDF5 file ({exc}). "
                               "Pass the .h5 atlas written by `python -m precompute run`.", path=path) from exc


class Atlas:
    """Read-only view of an atlas file. Checks format name, version and structure (`validate`) on open.

    Opens the file with mode "r" and no HDF5 file locking, so it works on read-only files and
    while another process holds the file; it never writes.
    """

    def __init__(self, path: str | os.PathLike, *, check: bool = True):
        """Open and check the file; `check=False` skips `validate` (format name and version are
        always checked). Raises AtlasFormatError saying what is wrong and what to do."""
        self.path = Path(path)
        self.f = _open_hdf5(self.path)
        try:
            self._check_format()
            if check:
                validate(self.f, self.path)
        except BaseException:
            self.f.close()
            raise
        self._slides: dict[str, np.ndarray] | None = None
        self._thumb_offsets: np.ndarray | None = None

    def _check_format(self) -> None:
        name = self.f.attrs.get("format")
        version = self.f.attrs.get("format_version")
        if name != FORMAT_NAME:
            raise AtlasFormatError(f"{self.path}: HDF5 file but not a Lumen atlas (format attribute "
                                   f"{name!r}, expected {FORMAT_NAME!r}).", path=self.path, item="format")
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
            raise damaged(self.path, "root attribute format_version",
                          f"is {version!r} ({type(version).__name__}), expected the integer {FORMAT_VERSION}")
        if version != FORMAT_VERSION:
            raise AtlasFormatError(f"{self.path}: atlas format version {version}, this Lumen reads "
                                   f"version {FORMAT_VERSION}. Re-run `python -m precompute run` with this "
                                   "version, or open it with the Lumen version that wrote it.",
                                   path=self.path, item="format_version")

    @contextmanager
    def reading(self, item: str) -> Iterator[None]:
        """Turn a failed read of `item` (a damaged or truncated file) into AtlasFormatError."""
        try:
            yield
        except AtlasFormatError:
            raise
        except (KeyError, OSError, ValueError, IndexError, RuntimeError) as exc:
            raise damaged(self.path, item, f"cannot be read ({type(exc).__name__}: {exc})") from exc

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
        """Number of concepts: rows of clusters/H, else columns of tiles/weights (0 without either)."""
        if "clusters/H" in self.f:
            return int(self.f["clusters/H"].shape[0])
        w = self.f.get("tiles/weights")
        return int(w.shape[1]) if isinstance(w, h5py.Dataset) and w.ndim == 2 else 0

    @property
    def output_names(self) -> list[str]:
        return json.loads(self.f["tiles"].attrs.get("output_names", "[]"))

    # -- slides -------------------------------------------------------------------------
    def slides(self) -> dict[str, np.ndarray]:
        """Slide table: column name -> array of length n_slides (manifest extras as meta.<name>)."""
        if self._slides is None:
            with self.reading("slides/"):
                g = self.f["slides"]
                out = {name: _decode(g[name][()]) for name in g if isinstance(g[name], h5py.Dataset)}
                for name in g.get("meta", {}):
                    out[f"meta.{name}"] = _decode(g["meta"][name][()])
            self._slides = out
        return self._slides

    def slide_maps(self, index: int) -> SlideMaps | None:
        """Images of slide `index`, or None for a slide without maps (failed, no tissue).
        Raises AtlasFormatError when the maps a reader needs are missing or misshapen."""
        key = f"slide_maps/{index}"
        if key not in self.f:
            return None
        with self.reading(key):
            has_tiles = int(self.f["slides/n_tiles"][int(index)]) > 0
            check_slide_maps(self.f, self.path, int(index), self.k, has_tiles)
            g = self.f[key]
            return SlideMaps({n: g[n][()] for n in g}, _plain_attrs(g.attrs))

    def slide_map(self, index: int, name: str) -> np.ndarray | None:
        """One map of slide `index` (e.g. concept_cells), without reading the others; None when absent."""
        key = f"slide_maps/{index}/{name}"
        return self.f[key][()] if key in self.f else None

    # -- tiles --------------------------------------------------------------------------
    def tile_names(self) -> list[str]:
        return [n for n in self.f["tiles"] if n not in ("thumb_jpeg", "thumb_offsets")]

    def tiles(self, names: Iterable[str], rows: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        """Tile columns by name; `rows` (sorted indices or slice) limits the rows read."""
        g = self.f["tiles"]
        out = {}
        for name in names:
            with self.reading(f"tiles/{name}"):
                ds = g[name]
                out[name] = ds[()] if rows is None else ds[rows]
        return out

    def tile_shape(self, name: str) -> tuple[int, ...]:
        """Shape of tile column `name` (e.g. (N, O) for outputs) without reading it."""
        return tuple(self.f["tiles"][name].shape)

    def tile_attrs(self, name: str) -> dict[str, Any]:
        return _plain_attrs(self.f["tiles"][name].attrs)

    def thumbnails(self, rows: Sequence[int]) -> list[bytes]:
        """JPEG bytes of the given tiles' thumbnails (read lazily, one slice each; the offsets, 8 bytes a
        tile, are read once and kept)."""
        with self.reading("tiles/thumb_jpeg"):
            if self._thumb_offsets is None:
                self._thumb_offsets = self.f["tiles/thumb_offsets"][()]
            return unpack_ragged(self.f["tiles/thumb_jpeg"], self._thumb_offsets, rows)

    # -- clusters -----------------------------------------------------------------------
    def group(self, name: str) -> dict[str, np.ndarray]:
        """All arrays of a group such as 'clusters' (ragged byte arrays are left packed)."""
        if name not in self.f:
            return {}
        with self.reading(name):
            g = self.f[name]
            return {n: _decode(g[n][()]) for n in g if isinstance(g[n], h5py.Dataset)}

    def group_attrs(self, name: str) -> dict[str, Any]:
        return _plain_attrs(self.f[name].attrs) if name in self.f else {}

    def ragged(self, group: str, name: str, rows: Sequence[int] | None = None) -> list[bytes]:
        """Byte strings stored with `put_group(..., {name: [bytes, ...]})`."""
        with self.reading(f"{group}/{name}_bytes"):
            return unpack_ragged(self.f[f"{group}/{name}_bytes"], self.f[f"{group}/{name}_offsets"][()], rows)

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "Atlas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
