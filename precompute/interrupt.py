"""Ctrl-C during a run is never lost.

Python turns SIGINT into KeyboardInterrupt wherever the main thread happens to be. When that is a
weakref callback or a `__del__` (torch and h5py run many), Python prints "Exception ignored" and goes
on, and the run would finish as if nothing had been pressed. Inside `watched()` the signal is also
recorded, and the passes call `check()` at every tile batch, so the run stops with exit code 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_seen = threading.Event()


def _on_sigint(signum, frame) -> None:
    _seen.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """Record Ctrl-C (and raise KeyboardInterrupt as usual) for the duration of the block. A SIGINT
    that was ignored when the process started (e.g. `nohup`) stays ignored."""
    _seen.clear()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside `watched()`, even if it was swallowed."""
    if _seen.is_set():
        raise KeyboardInterrupt
