"""The output of a run: checked writable before any work, locked against a second run on the same atlas.

`ATLAS.lock` beside the atlas is held with `fcntl.flock` for the whole run and records who holds it
(pid, host, start time, command) so a second run can say so. The kernel releases a flock when its
process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from pathlib import Path


class OutputError(Exception):
    """The output cannot be written or is in use; the message names the path and what to do."""


# errno values that mean "this place cannot take the output", with what to do about each
_WRITE_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space there or give --out on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space there or give --out on another disk",
    errno.EFBIG: "the file grew past the size this process may write (ulimit -f) or the filesystem allows: "
                 "raise the limit or give --out on another disk",
    errno.EROFS: "the filesystem is read-only: give --out on a writable disk",
    errno.EACCES: "permission denied: give --out in a folder you may write to",
    errno.EPERM: "permission denied: give --out in a folder you may write to",
}
WRITE_ERRNOS = frozenset(_WRITE_ADVICE)


def write_advice(exc: OSError) -> str:
    """Plain words for an OSError met while writing output ('' when it is not a disk/permission error)."""
    return _WRITE_ADVICE.get(exc.errno or 0, "")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def write_errno(exc: BaseException) -> int | None:
    """The disk/permission errno behind `exc`, also when h5py reports it only in its text
    ("... errno = 28, error message = 'No space left on device'"); None when it is not one."""
    import re

    code = getattr(exc, "errno", None)
    if code not in WRITE_ERRNOS:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return code if code in WRITE_ERRNOS else None


def check_writable(out: Path) -> None:
    """Create (if needed) the folder of `out` and write and remove a probe file there; OutputError if not."""
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=folder)
        try:
            os.write(fd, b"lumen")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        why = write_advice(exc) or f"{exc.strerror or exc}: give --out in another folder"
        raise OutputError(f"cannot write the atlas in {folder}: {why}.") from None


def check_free_space(path: Path, need_bytes: int) -> None:
    """OSError(ENOSPC) naming `path` when its disk has less than `need_bytes` free: an HDF5 library that
    hits a full disk mid-write can crash the process, so a write that cannot fit is not started."""
    import shutil

    free = shutil.disk_usage(path.parent).free
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MiB free, about {need_bytes / 2**20:.0f} MiB needed",
                      str(path))


class RunLock:
    """Exclusive lock on `<atlas>.lock` for one run. Use as a context manager."""

    def __init__(self, out: Path, command_line: str = ""):
        self.path = lock_path(out)
        self.command_line = command_line
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        for _ in range(5):  # retry when the file was replaced between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(self._held_message()) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we locked it: lock the new one
        else:
            raise OutputError(f"cannot lock {self.path}: it keeps being replaced; is another run starting?")
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command_line": self.command_line}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        return self

    def _held_message(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        who = (f"process {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
               if info else "another process")
        return (f"another run is writing this atlas: {who} holds {self.path}. Wait for it to finish (the same "
                f"command then resumes from its work), or give another --out.")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still locked, so no other run can hold this inode
            os.close(self.fd)
            self.fd = None
