"""Tile-reading worker processes end with the run that started them.

A DataLoader worker busy reading a slide does not notice that its parent was killed (SIGKILL, OOM
killer) and could keep reading, holding hundreds of MB, for minutes. On Linux each worker asks the
kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere, and as a fallback, a
daemon thread checks once a second that the parent is still its parent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _ask_kernel_for_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog thread below still applies


def _watch_parent(parent_pid: int, interval_s: float) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(interval_s)


def die_with_parent(worker_id: int, *, parent_pid: int, interval_s: float = 1.0) -> None:
    """DataLoader worker_init_fn: end this worker when the process `parent_pid` ends."""
    _ask_kernel_for_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, interval_s), daemon=True,
                     name=f"lumen-parent-watch-{worker_id}").start()


def worker_init() -> functools.partial:
    """A worker_init_fn bound to the current (parent) process."""
    return functools.partial(die_with_parent, parent_pid=os.getpid())
