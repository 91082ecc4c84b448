"""Crash-safe file writes: write under a temporary name, then rename into place.

`os.replace` is atomic on one filesystem, so a reader (or a resumed run) sees either
the previous file or the complete new one, never half a file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    """Temporary sibling of `path`, unique per process (same folder, so the rename is atomic)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync and rename it to `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_tmp(folder: Path) -> int:
    """Delete temporary files left by killed runs in `folder`; returns how many."""
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if TMP_MARK in p.name:
                with contextlib.suppress(OSError):
                    p.unlink()
                    n += 1
    return n
