"""Server start: read the atlas and prepare the first page before the first browser connects.

`streamlit run dashboard/app.py` finds the `st.App` in app.py and starts it with this lifespan hook, so
the atlas read (seconds at 10^6 tiles) and Altair's first chart validation happen while the server starts,
not while the first person in the meeting waits. Every cache filled here is the one the pages use
(Streamlit's caches are per process). A failure here is only logged: the page shows the atlas's own
message when someone opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from typing import AsyncIterator

from .launch import atlas_argument

# Streamlit warns once when a cached function runs outside a page; at server start that is the point.
_CONTEXT_LOG = logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context")


def prepare(path: str) -> float:
    """Read the atlas at `path` into the app's cache, draw the overview's scatter off-screen and read (or,
    for an atlas that stores none, compute) the fidelity figures and glass flags the Cluster and Fidelity
    pages show: about 2 s each at 10^6 tiles; then the Enrichment page's first view and the Slides page's
    tile chart. Returns the seconds it took."""
    from . import fidelity
    from .data import load
    from .views import enrichment, overview, slide

    t0 = time.perf_counter()
    level = _CONTEXT_LOG.level
    _CONTEXT_LOG.setLevel(logging.ERROR)
    try:
        data = load(path)
        fidelity.glass_flags(data)
        try:
            fidelity.report(data)
        except fidelity.FidelityError:
            pass  # the pages say why when they are opened
        overview.prepare(data)
        enrichment.prepare(data)
        slide.prepare(data)
    finally:
        _CONTEXT_LOG.setLevel(level)
    return time.perf_counter() - t0


@contextlib.asynccontextmanager
async def lifespan(_app) -> AsyncIterator[None]:
    """st.App lifespan: warm the caches (in a thread, so the event loop stays free) before serving."""
    path = atlas_argument(sys.argv[1:])
    if path:
        try:
            seconds = await asyncio.to_thread(prepare, path)
            print(f"  Lumen: atlas read and first page prepared in {seconds:.1f} s.", file=sys.stderr, flush=True)
            # What start-up built (the atlas, modules, Altair's schema) lives as long as the server: moved out
            # of the collector's reach, the collections Python still runs have less to walk through.
            gc.collect()
            gc.freeze()
        except Exception:  # noqa: BLE001 - any failure is the page's to report, with its own message
            print("  Lumen: the atlas could not be read at start; the page says why when opened.",
                  file=sys.stderr, flush=True)
    yield
