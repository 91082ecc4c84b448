"""Concept display names and colour-chip legends on the dashboard's pages.

The names come from the notes file in use (dashboard/naming.py sets them on every run); the colours
from the fixed palette in precompute/colors.py.
"""

from __future__ import annotations

import html

_NAMES: list[str] = []  # concept names of the notes file in use (one atlas and notes file per server)


def set_concept_names(labels: list[str] | None) -> None:
    """Labels for NMF concepts from the notes file (`precompute.notes.labels`); None = 'C1'..'CK'."""
    _NAMES[:] = list(labels or [])


def concept_label(k: int, prefix: str = "C") -> str:
    """Display name of 0-based cluster k: its name from the notes file, else 'C1' for NMF concept 0
    (1-based like `precompute inspect`). k-means clusters (another prefix) are never named."""
    if prefix == "C" and 0 <= int(k) < len(_NAMES):
        return _NAMES[int(k)]
    return f"{prefix}{int(k) + 1}"


def legend_html(labels: list[str], colors: list[str], title: str = "") -> str:
    """Inline colour chips for st.markdown(..., unsafe_allow_html=True), after `title` in bold if given."""
    chips = [f'<span style="display:inline-block;margin-right:1.2em;white-space:nowrap">'
             f'<span style="display:inline-block;width:1em;height:1em;background:{c};'
             f'border:1px solid #444;vertical-align:middle;margin-right:.35em"></span>{html.escape(str(lab))}</span>'
             for lab, c in zip(labels, colors)]
    head = f"<b>{html.escape(title)}</b>&nbsp; " if title else ""
    return head + "".join(chips)
