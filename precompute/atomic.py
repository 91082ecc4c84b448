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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(folder: Path, prefix: str = "") -> int:
    """Delete temporary files in `folder` (names starting with `prefix`) whose writing process is gone.

    The pid is part of each temporary name (see tmp_name); files of living processes are left alone.
    Returns how many files were removed.
    """
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            stem, mark, pid = p.name.rpartition(TMP_MARK)
            if not mark or not stem.startswith(prefix) or not pid.isdigit() or _pid_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n
