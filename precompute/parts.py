"""Per-slide part files: the crash-safe unit of work of a run.

A run keeps one small HDF5 file per slide and pass under `<atlas>.parts/`. Each is written under a
temporary name and renamed into place, and carries the key of the configuration that made it, so a
re-run reuses exactly the parts made with the same settings and redoes everything else.
Part files are an internal cache, not the atlas format; they may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from .atomic import atomic_path
from .runlock import write_errno
from .store import pack_ragged, unpack_ragged

PART_VERSION = 1


def part_name(index: int, slide_id: str) -> str:
    """File name of a slide's part: index plus a filesystem-safe id (ids may hold any characters)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id)[:80]
    digest = hashlib.sha1(slide_id.encode()).hexdigest()[:8]
    return f"{index:06d}-{safe}-{digest}.h5"


def save_part(path: Path, arrays: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    """Write arrays (lists of bytes are stored ragged) and JSON-able attrs atomically.

    A full disk or a lost write permission is raised as OSError naming `path`; the temporary file is
    removed and an earlier part at `path` is kept."""
    try:
        _write_part(path, arrays, attrs)
    except (OSError, RuntimeError) as exc:
        code = write_errno(exc)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from None


def _write_part(path: Path, arrays: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    # Built in memory and written with plain file I/O: an HDF5 library that meets a full disk mid-write
    # cannot close its file and crashes the process later; a plain write just raises OSError.
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["part_version"] = PART_VERSION
        f.attrs["attrs_json"] = json.dumps(dict(attrs), default=_jsonable)
        for name, value in arrays.items():
            if isinstance(value, list):
                data, offsets = pack_ragged(value)
                f.create_dataset(f"{name}__bytes", data=data)
                f.create_dataset(f"{name}__offsets", data=offsets)
            else:
                value = np.asarray(value)
                big = value.ndim >= 1 and value.nbytes > (1 << 16)
                f.create_dataset(name, data=value, compression="lzf" if big else None)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a part file")


def read_part_attrs(path: Path) -> dict[str, Any] | None:
    """Attrs of a part, or None when it is missing or unreadable (then it is simply redone)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("part_version") != PART_VERSION:
                return None
            return json.loads(f.attrs["attrs_json"])
    except (OSError, KeyError, ValueError):
        return None


def load_part(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Arrays and attrs of a part. Ragged byte columns come back as lists of bytes."""
    with h5py.File(path, "r") as f:
        attrs = json.loads(f.attrs["attrs_json"])
        arrays: dict[str, Any] = {}
        for name in f:
            if name.endswith("__offsets"):
                continue
            if name.endswith("__bytes"):
                base = name[: -len("__bytes")]
                arrays[base] = unpack_ragged(f[name][()], f[f"{base}__offsets"][()])
            else:
                arrays[name] = f[name][()]
    return arrays, attrs


def is_done(path: Path, key: str) -> bool:
    """True when the part exists, was made with `key`, and did not fail (failed slides are retried)."""
    return attrs_done(read_part_attrs(path), key)


def attrs_done(attrs: dict[str, Any] | None, key: str) -> bool:
    """is_done for a part's attrs already read (None: missing or unreadable)."""
    return attrs is not None and attrs.get("key") == key and attrs.get("status") in ("ok", "no_tissue")
