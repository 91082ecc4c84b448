"""Lumen's own message for an atlas that cannot be read, in place of Streamlit's error box.

Every read goes through `precompute.store.Atlas`, which checks the file on open (`validate`) and turns
a failed later read (a missing slide map, a truncated file) into `AtlasFormatError` naming the file,
the damaged item and how to rebuild the atlas. The app shell runs each page inside `atlas_guard()`;
fragments (which rerun on their own) are decorated with `guarded`.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator

import streamlit as st

from precompute.store import AtlasFormatError


def show(exc: AtlasFormatError) -> None:
    """The atlas message, as an error box without links to outside services or a traceback."""
    st.error(f"**Cannot open the atlas.** {exc}", icon=":material/error:")


@contextmanager
def atlas_guard() -> Iterator[None]:
    """Run a page (or part of one); an atlas read error shows `show(...)` and stops this run."""
    try:
        yield
    except AtlasFormatError as exc:
        show(exc)
        st.stop()


def guarded(fn: Callable) -> Callable:
    """`atlas_guard` as a decorator, for st.fragment functions (they rerun outside the page's guard)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with atlas_guard():
            return fn(*args, **kwargs)
    return wrapper
