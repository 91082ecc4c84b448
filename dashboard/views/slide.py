"""One slide: thumbnail with the cluster map (or one concept's soft map, or a model-output map) laid
over it; click a tile to see it and its concept weights; soft maps of every concept below.

The chart is in level-0 pixel coordinates (y down, no axes so that the image keeps its aspect);
each tile is a transparent clickable rectangle whose tooltip gives its level-0 x, y.
"""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from .. import overlay, raster, state, ui
from ..colors import VIRIDIS_HEX, concept_color, concept_label, legend_html
from ..data import AtlasData

LAYERS = {"clusters": "Cluster map", "soft": "Soft map of one concept", "output": "Model output"}
MAX_RECTS = 20_000  # clickable tiles drawn per slide
STRIP_PX = 260      # width of the small soft maps
CHART_PX = 660      # longest side of the slide chart (fits a 1280-px-wide screen)


def render(data: AtlasData, diagnoses: list[str]) -> None:
    st.header("Slides")
    idx = np.flatnonzero(data.slide_mask(diagnoses))
    if not len(idx):
        st.info("No slide matches the diagnosis filter.")
        return
    s = data.slides
    ids = data.slide_ids()
    label = {ids[i]: f"{ids[i]} — {s['diagnosis'].iat[i]}" + ("" if s["status"].iat[i] == "ok" else
                                                              f" ({s['status'].iat[i]})") for i in idx}
    c = st.columns([3, 2, 2, 2])
    with c[0]:
        sid = state.bound(st.selectbox, f"Slide ({len(idx)} in the filter)", "slide", default=ids[idx[0]],
                          options=[ids[i] for i in idx], format_func=label.get)
    i = int(idx[[ids[j] for j in idx].index(sid)])
    row = s.iloc[i]
    maps = data.slide_maps(i)
    if row["status"] != "ok" or maps is None:
        msg = {"failed": "This slide failed during the run", "no_tissue": "No tissue was found on this slide"}
        st.warning(f"{msg.get(row['status'], 'This slide has no cluster map')} (status: {row['status']}).")
        if row["error"]:
            st.code(row["error"], language=None, wrap_lines=True)
        if maps is not None:
            st.image(maps["thumbnail"], caption=f"{sid} thumbnail", width=400)
        return
    with c[1]:
        layer = state.bound(st.selectbox, "Layer", "layer", default="clusters", options=list(LAYERS),
                            format_func=LAYERS.get)
    concept, output = 0, state.get("output", data.default_output, int)
    if not 0 <= output < len(data.output_names):
        output = data.default_output
    with c[2]:
        if layer == "soft":
            concept = state.bound(st.selectbox, "Concept", "soft", default=1, options=list(range(1, data.k + 1)),
                                  parse=int, format_func=lambda j: concept_label(j - 1)) - 1
        elif layer == "output":
            output = state.bound(st.selectbox, "Model output", "output", default=output,
                                 options=list(range(len(data.output_names))), parse=int,
                                 format_func=lambda j: data.output_names[j])
    with c[3]:
        opacity = state.bound(st.slider, "Overlay opacity (%)", "opacity", default=55, parse=int,
                              min_value=0, max_value=100, step=5)

    jpeg, png_fn = _composite(data, i, layer, concept, output, opacity)
    left, right = st.columns([5, 2])
    with left:
        event = ui.chart(_slide_chart(data, i, maps, jpeg), on_select="rerun", selection_mode="tile_pick",
                         width="content")
        _legend(data, layer, concept, output)
        with st.container(horizontal=True):
            ui.png_button(png_fn, f"{sid}-{layer}", key="dl_overlay", label="PNG of this map")
            start, n = int(row["tile_start"]), int(row["n_tiles"])
            ui.csv_button(lambda: data.tile_table(np.arange(start, start + n)), f"{sid}-tiles", key="dl_slide_tiles",
                          label="CSV of its tiles")
    with right:
        _tile_panel(data, i, event)
    st.subheader("Soft map of every concept, and the model output")
    _soft_strip(data, i, output)



def _soft_vmax(data: AtlasData, k: int, soft: np.ndarray) -> float:
    """Colour-scale top for concept k: its best prototype's cell weight (same scale on every slide),
    else this slide's maximum."""
    p = data.protos
    if "weight" in p and (p["cluster"] == k).any():
        return float(p["weight"][p["cluster"] == k].max())
    return float(np.nanmax(soft)) if soft.size else 1.0


def _layer_rgba(data: AtlasData, i: int, layer: str, concept: int, output: int, shape) -> np.ndarray:
    maps = data.slide_maps(i)
    h, w = shape
    ds, cell = float(maps.attrs["thumb_downsample"]), float(maps.attrs["cell_l0"])
    if layer == "clusters":
        return overlay.grid_to_thumb(overlay.hard_rgba(maps["hard"], data.k), cell, ds, (w, h))
    if layer == "soft":
        soft = maps["soft"][concept].astype(np.float32)
        rgba = overlay.soft_rgba(soft, _soft_vmax(data, concept, soft), concept_color(concept))
        return overlay.grid_to_thumb(rgba, cell, ds, (w, h), resample=overlay.Image.BILINEAR)
    row = data.slides.iloc[i]
    start, n = int(row["tile_start"]), int(row["n_tiles"])
    rows = np.arange(start, start + n)
    grid = overlay.tile_value_grid(data.x[rows], data.y[rows], float(row["tile_l0"]), data.out[rows, output],
                                   ds, (h, w))
    return overlay.value_rgba(grid, _value_range(data, output))


@st.cache_data(max_entries=48, show_spinner=False)
def _composite_cached(key: str, i: int, layer: str, concept: int, output: int, opacity: int, _data: AtlasData):
    thumb = _data.slide_maps(i)["thumbnail"]
    rgba = _layer_rgba(_data, i, layer, concept, output, thumb.shape[:2])
    return overlay.blend(thumb, rgba, opacity / 100.0)


def _composite(data, i, layer, concept, output, opacity):
    """(JPEG bytes for the chart, callable -> PNG bytes for the download)."""
    img = _composite_cached(data.key, i, layer, concept, output, opacity, data)
    return overlay.encode(img, "JPEG"), lambda: overlay.encode(img, "PNG")


def _slide_chart(data: AtlasData, i: int, maps, jpeg: bytes):
    row = data.slides.iloc[i]
    th, tw = maps["thumbnail"].shape[:2]
    ds = float(maps.attrs["thumb_downsample"])
    W, H = tw * ds, th * ds
    width = CHART_PX
    height = int(width * H / W)
    if height > CHART_PX:
        height, width = CHART_PX, int(CHART_PX * W / H)
    xs = alt.Scale(domain=[0, W], nice=False, zero=False)
    ys = alt.Scale(domain=[0, H], nice=False, zero=False, reverse=True)
    img = alt.Chart(pd.DataFrame({"url": [raster.data_url(jpeg, "image/jpeg")], "x": [0.0], "x2": [W], "y": [0.0],
                                  "y2": [H]})).mark_image(aspect=False).encode(
        x=alt.X("x:Q", scale=xs, axis=None), x2="x2:Q",
        y=alt.Y("y:Q", scale=ys, axis=None), y2="y2:Q", url="url:N")
    start, n = int(row["tile_start"]), int(row["n_tiles"])
    rows = np.arange(start, start + n)[: MAX_RECTS]
    t = float(row["tile_l0"])
    tiles = pd.DataFrame({"row": rows, "x": data.x[rows], "y": data.y[rows], "x2": data.x[rows] + t,
                          "y2": data.y[rows] + t, "concept": [concept_label(c) for c in data.nmf[rows]],
                          "top output": np.array(data.output_names, dtype=object)[data.top[rows]],
                          "value": data.out[rows, data.top[rows]]})
    pick = alt.selection_point(name="tile_pick", fields=["row"], on="click", clear=False)
    rects = alt.Chart(tiles).mark_rect(fill="white", fillOpacity=0.01, stroke="black").encode(
        x=alt.X("x:Q", scale=xs), x2="x2:Q", y=alt.Y("y:Q", scale=ys), y2="y2:Q",
        strokeWidth=alt.condition(pick, alt.value(3), alt.value(0), empty=False),
        tooltip=["concept", "top output", alt.Tooltip("value:Q", title=data.out_label, format=".2f"),
                 alt.Tooltip("x:Q", title="x (level-0 px)"), alt.Tooltip("y:Q", title="y (level-0 px)")],
    ).add_params(pick)
    return alt.layer(img, rects).properties(width=width, height=height, padding=0).configure_view(stroke=None)


def _legend(data: AtlasData, layer: str, concept: int, output: int) -> None:
    if layer == "clusters":
        st.markdown(legend_html([concept_label(j) for j in range(data.k)],
                                [concept_color(j) for j in range(data.k)]) + " (no colour = no tissue)",
                    unsafe_allow_html=True)
    elif layer == "soft":
        st.caption(f"Opacity ∝ weight of {concept_label(concept)} per cell; full colour at the weight of the "
                   "concept's top prototype cell (the same scale on every slide).")
    else:
        lo, hi = ("0", "1") if data.out_kind == "probs" else ("min", "max")
        grad = ", ".join(VIRIDIS_HEX)
        st.markdown(f"{html.escape(data.output_names[output])} {data.out_label}: {lo} "
                    f"<span style='display:inline-block;width:12em;height:1em;vertical-align:middle;"
                    f"background:linear-gradient(to right, {grad})'></span> {hi}", unsafe_allow_html=True)
    st.caption("Click a tile to inspect it.")


def _tile_panel(data: AtlasData, i: int, event) -> None:
    st.subheader("Tile")
    row = data.slides.iloc[i]
    start, n = int(row["tile_start"]), int(row["n_tiles"])
    rows = list(range(start, start + n))
    if not rows:
        st.info("This slide has no tiles.")
        return
    clicked = [int(p["row"]) for p in ((event or {}).get("selection", {}).get("tile_pick") or []) if "row" in p]
    if clicked and clicked[0] in rows and clicked[0] != st.session_state.get("_tile_click"):
        st.session_state["_tile_click"] = clicked[0]
        st.session_state[state.widget_key("tile")] = clicked[0]
    r = state.bound(st.selectbox, "Tile (x, y in level-0 px)", "tile", default=rows[0], options=rows, parse=int,
                    format_func=lambda t: f"#{t - start} ({data.x[t]}, {data.y[t]}) · {concept_label(data.nmf[t])}")
    st.image(data.thumbnails([r])[0], caption=ui.tile_captions(data, [r])[0], width=200)
    top = np.argsort(-data.out[r])[:3]
    st.markdown("Top outputs: " + ", ".join(f"**{data.output_names[j]}** {data.out[r, j]:.2f}" for j in top))
    w = data.weights[r]
    df = pd.DataFrame({"concept": [concept_label(j) for j in range(data.k)], "weight": w,
                       "share": w / max(w.sum(), 1e-12)})
    ui.chart(ui.bar(df, "concept", "weight", color="concept", scale=ui.concept_scale(data.k), sort=None, height=300,
                    title="Concept weights (sum over cells)",
                    tooltip=["concept", alt.Tooltip("weight:Q", format=".3f"), alt.Tooltip("share:Q", format=".1%")]))
    ui.csv_button(df, f"{data.slide_ids()[i]}-tile-{r - start}-weights", key="dl_tile_w")


@st.cache_data(max_entries=16, show_spinner=False)
def _strip_cached(key: str, i: int, output: int, _data: AtlasData) -> list[np.ndarray]:
    """Small images: the soft map of every concept, then the map of model output `output`."""
    maps = _data.slide_maps(i)
    thumb = maps["thumbnail"]
    f = max(1, int(np.ceil(thumb.shape[1] / STRIP_PX)))
    small = thumb[::f, ::f]
    size = (small.shape[1], small.shape[0])
    cell, ds = float(maps.attrs["cell_l0"]), float(maps.attrs["thumb_downsample"]) * f
    out = []
    for j in range(_data.k):
        soft = maps["soft"][j].astype(np.float32)
        rgba = overlay.soft_rgba(soft, _soft_vmax(_data, j, soft), concept_color(j))
        out.append(overlay.blend(small, overlay.grid_to_thumb(rgba, cell, ds, size, resample=overlay.Image.BILINEAR),
                                 0.85))
    row = _data.slides.iloc[i]
    rows = np.arange(int(row["tile_start"]), int(row["tile_start"]) + int(row["n_tiles"]))
    grid = overlay.tile_value_grid(_data.x[rows], _data.y[rows], float(row["tile_l0"]), _data.out[rows, output], ds,
                                   small.shape[:2])
    out.append(overlay.blend(small, overlay.value_rgba(grid, _value_range(_data, output)), 0.75))
    return out


def _value_range(data: AtlasData, output: int) -> tuple[float, float]:
    """Colour range of an output map: [0, 1] for probabilities, the cohort's min..max for logits."""
    if data.out_kind == "probs":
        return 0.0, 1.0
    return float(data.out[:, output].min()), float(data.out[:, output].max())


def _soft_strip(data: AtlasData, i: int, output: int) -> None:
    images = _strip_cached(data.key, i, output, data)
    caps = [concept_label(j) for j in range(data.k)] + [f"{data.output_names[output]} {data.out_label}"]
    st.image(images, caption=caps, width=STRIP_PX)
    ui.png_button(lambda: ui.contact_sheet([overlay.encode(im) for im in images], caps, cols=min(6, len(images)),
                                           cell=STRIP_PX), f"{data.slide_ids()[i]}-soft-maps", key="dl_strip")
