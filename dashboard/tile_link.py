"""Opening a tile on its slide (galleries, prototypes, points) and the slide viewer's per-slide view
state. Shared by ui.py and the slide page, so neither imports the other."""

from __future__ import annotations

import streamlit as st

from . import state, viewport as vp
from .data import AtlasData


def slide_size(data: AtlasData, i: int) -> tuple[float, float]:
    """Level-0 (width, height) of slide i (from the slide table, else from its thumbnail)."""
    row = data.slides.iloc[i]
    w, h = float(row.get("width", 0) or 0), float(row.get("height", 0) or 0)
    if w > 0 and h > 0:
        return w, h
    maps = data.slide_maps(i)
    ds = float(maps.attrs["thumb_downsample"])
    return maps["thumbnail"].shape[1] * ds, maps["thumbnail"].shape[0] * ds


def set_view(view: vp.View, sid: str) -> None:
    st.session_state[state.widget_key("view")] = view.param()
    st.session_state["_view_slide"] = sid
    state.write("view", view.param())


def open_tile(data: AtlasData, row: int) -> None:
    """Callback: open tile `row` on its slide, centred, outlined (from prototypes, galleries, points)."""
    i = int(data.tile_slide[row])
    sid = str(data.slide_ids()[i])
    w, h = slide_size(data, i)
    t = float(data.slides["tile_l0"].iat[i])
    state.go(page="slides", slide=sid, tile=int(row))
    set_view(vp.tile_view(float(data.x[row]), float(data.y[row]), t, w, h), sid)
