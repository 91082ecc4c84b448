"""One slide in a zoomable viewer: pixels of the original slide (or the stored thumbnail when the file
is not reachable) under the concept map, one concept's soft map, a model-output map or GradCAM;
drag a box to zoom into it, buttons to zoom, pan and go back to the whole slide; click a tile to
inspect it. The selected tile is outlined; soft maps of every concept below, on demand.

Viewer choice (docs/dashboard.md): the server renders the viewport (dashboard/pixels.py +
dashboard/viewport.py) and an Altair chart shows it, so nothing but Streamlit runs in the browser.
The chart's axes are level-0 px; its x- and y-ranges follow the chart's own size (Vega expressions),
so one rendered image serves every screen width without distortion.
"""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from precompute import overlay
from precompute.colors import VIRIDIS_HEX, concept_color

from .. import raster, state, ui, viewport as vp
from ..data import AtlasData
from ..labels import concept_label, legend_html
from ..pixels import Pixels
from ..tile_link import set_view as _set_view, slide_size

LAYERS = {"clusters": "Concept map", "soft": "Soft map of one concept", "output": "Model output",
          "gradcam": "GradCAM"}
MAX_RECTS = 20_000  # clickable tiles drawn per view
STRIP_PX = 260      # width of the small soft maps
MIN_BOX_PX = 12     # a dragged box smaller than this (screen px) is a click, not a zoom
# Options per list (slides, tiles). Streamlit's selectbox costs the browser about 0.12 ms per option each
# time it is drawn: 2,000 slides and 500 tiles a slide made 0.2-0.35 s of opening this page at 10^6 tiles,
# and a real slide has 10^4 tiles. Longer lists show the entries around the current one.
LIST_MAX = 100


def window(options: list, at: int, n: int | None = None) -> list:
    """At most n (LIST_MAX) consecutive options, centred on position `at` where the ends allow."""
    n = LIST_MAX if n is None else n
    lo = min(max(0, at - n // 2), max(0, len(options) - n))
    return options[lo:lo + n]


def find_slide(typed: str, in_filter: list[str]) -> str | None:
    """The slide id of `in_filter` that a typed text names: itself, the id without its case, the id of a
    list entry typed in full ("id — diagnosis"), else the first id containing it (ignoring case)."""
    typed = typed.strip()
    if typed in in_filter:
        return typed
    low = typed.split(" — ")[0].strip().lower()
    if not low:
        return None
    return next((v for v in in_filter if v.lower() == low), None) or next((v for v in in_filter if low in v.lower()),
                                                                         None)


def _find_slide(in_filter: list[str], previous: str) -> None:
    """Callback of a cut slide list (it accepts typed text): open the slide the text names (find_slide);
    nothing found: the open slide stays and a notice says so."""
    key = state.widget_key("slide")
    typed = str(st.session_state.get(key) or "")
    found = find_slide(typed, in_filter)
    if found is None and typed.strip():
        shown = typed.strip().replace("`", "")[:60]  # a code span: the typed text is shown, never read as Markdown
        st.toast(f"No slide in the filter has an id containing `{shown}`.", icon=":material/search_off:")
    st.session_state[key] = found or previous


def render(data: AtlasData, diagnoses: list[str]) -> None:
    st.header("Slides")
    idx = np.flatnonzero(data.slide_mask(diagnoses))
    if not len(idx):
        st.info("No slide matches the diagnosis filter.")
        return
    s, ids = data.slides, data.slide_ids()
    dx, status = s["diagnosis"].to_numpy(), s["status"].to_numpy()  # arrays: 2,000 pandas lookups took 0.27 s
    in_filter = [str(ids[i]) for i in idx]
    current = state.get("slide", in_filter[0])
    listed = window(in_filter, in_filter.index(current) if current in in_filter else 0)
    label = {str(ids[i]): f"{ids[i]} — {dx[i]}" + ("" if status[i] == "ok" else f" ({status[i]})") for i in idx}
    capped = len(listed) < len(in_filter)
    c = st.columns([3, 2, 2, 2])
    with c[0]:
        # a long list is cut to the slides around the open one (see LIST_MAX); typing an id finds any slide
        sid = state.bound(st.selectbox, f"Slide ({len(idx):,} in the filter)", "slide", default=listed[0],
                          options=listed, format_func=lambda v: label.get(v, v),
                          **({"accept_new_options": True, "filter_mode": "contains", "on_change": _find_slide,
                              "args": (in_filter, current), "help": f"The list shows the {len(listed)} slides around "
                              "the open one. Type a slide id (or part of one) and press Enter to open any slide "
                              "in the filter."} if capped else {}))
    if sid not in label:  # a typed text that _find_slide could not resolve
        sid = current if current in label else listed[0]
    i = int(idx[in_filter.index(sid)])
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
    layers = [name for name in LAYERS if name != "gradcam" or maps.get("gradcam") is not None]
    with c[1]:
        layer = state.bound(st.selectbox, "Layer", "layer", default="clusters", options=layers,
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
    _viewer(data, i, sid, layer, concept, output, opacity)
    # drawn only while open: its K + 1 images cost opening the page 0.1 s at 10^6 tiles (the viewer's
    # "Soft map of one concept" layer shows each of them larger)
    strip = st.expander("Soft map of every concept, and the model output", key="slide_strip", on_change="rerun")
    if strip.open:
        with strip:
            _soft_strip(data, i, output)


# -- view state ---------------------------------------------------------------------------
def _current_view(data: AtlasData, i: int, sid: str, tile: int | None) -> vp.View:
    """The view of this slide: kept while the slide stays; from the URL when a link is opened; else the
    selected tile (when the link names one) or the whole slide."""
    w, h = slide_size(data, i)
    owner = st.session_state.get("_view_slide")
    view = None
    if owner == sid or owner is None:  # same slide, or the first draw of this session (a link)
        view = vp.View.parse(state.get("view"))
    if view is None:
        t = float(data.slides["tile_l0"].iat[i])
        view = vp.tile_view(float(data.x[tile]), float(data.y[tile]), t, w, h) if tile is not None else vp.fit(w, h)
    view = vp.clamp(view, w, h)
    _set_view(view, sid)
    return view


def _move(sid: str, w: float, h: float, how: str, a: float = 0.0, b: float = 0.0) -> None:
    """Callback of the viewer buttons: zoom by a, pan by (a, b) chart sizes, whole slide, or 1:1."""
    view = vp.View.parse(st.session_state.get(state.widget_key("view"))) or vp.fit(w, h)
    if how == "zoom":
        view = vp.zoom(view, a, w, h)
    elif how == "pan":
        view = vp.pan(view, a, b, w, h)
    elif how == "full":
        view = vp.clamp(vp.View(view.cx, view.cy, 1.0), w, h)
    else:
        view = vp.fit(w, h)
    _set_view(view, sid)


def _on_chart(key: str, sid: str, w: float, h: float, rows: tuple[int, int]) -> None:
    """Callback of the viewer chart: a click picks a tile; a dragged box zooms into it. The chart's key
    names its view and tile, so each view starts with no leftover box or click."""
    sel = (st.session_state.get(key) or {}).get("selection", {}) or {}
    picked = [int(p["row"]) for p in sel.get("tile_pick") or [] if "row" in p]
    box = sel.get("zoom") or {}
    if "x" in box and "y" in box:
        view = vp.View.parse(st.session_state.get(state.widget_key("view"))) or vp.fit(w, h)
        (x0, x1), (y0, y1) = box["x"], box["y"]
        if min(abs(x1 - x0), abs(y1 - y0)) / view.s >= MIN_BOX_PX:
            _set_view(vp.box_view(x0, x1, y0, y1, w, h), sid)
            return  # the browser also reports the end of a drag as a click: not a tile pick
    if picked and rows[0] <= picked[0] < rows[1]:
        st.session_state[state.widget_key("tile")] = picked[0]
        state.write("tile", picked[0])


def _on_tile_pick(data: AtlasData, i: int, sid: str) -> None:
    """Callback of the tile list: bring the picked tile into view when it is outside it."""
    r = st.session_state.get(state.widget_key("tile"))
    view = vp.View.parse(st.session_state.get(state.widget_key("view")))
    if r is None or view is None:
        return
    t = float(data.slides["tile_l0"].iat[i])
    if not vp.contains(view, float(data.x[r]), float(data.y[r]), t):
        w, h = slide_size(data, i)
        _set_view(vp.clamp(vp.View(float(data.x[r]) + t / 2, float(data.y[r]) + t / 2, view.s), w, h), sid)


# -- the viewer ---------------------------------------------------------------------------
def _selected_tile(data: AtlasData, i: int) -> int | None:
    """The tile named by the URL / tile list when it is on slide i, else None."""
    row = data.slides.iloc[i]
    start, n = int(row["tile_start"]), int(row["n_tiles"])
    r = state.get("tile", None, int)
    return r if r is not None and start <= r < start + n else None


@state.fragment
def _viewer(data: AtlasData, i: int, sid: str, layer: str, concept: int, output: int, opacity: int) -> None:
    """Viewer, its buttons and the tile panel: a fragment, so a zoom, pan or tile pick reruns only this part."""
    w, h = slide_size(data, i)
    tile = _selected_tile(data, i)
    view = _current_view(data, i, sid, tile)
    pix = _pixels(data.key, i, data)
    _toolbar(sid, w, h, view)
    img = _view_image(data.key, i, layer, concept, output, opacity, view.param(), data)
    row = data.slides.iloc[i]
    start, n = int(row["tile_start"]), int(row["n_tiles"])
    mpp = float(row["mpp"]) if np.isfinite(row["mpp"]) else None
    key = f"viewer|{sid}|{view.param()}|{tile}"
    shown = _annotate(data, i, view, img, tile, mpp)
    tiles, spec = _viewer_spec(data, i, view, overlay.encode(shown, quality=80))
    st.vega_lite_chart(tiles, spec, width="stretch", on_select=lambda: _on_chart(key, sid, w, h, (start, start + n)),
                       selection_mode=["tile_pick", "zoom"], key=key)
    kind, level, ds = pix.source(view)
    where = (f"original slide via {pix.slide.backend} (level {level}, {ds:g} level-0 px per px)" if kind == "slide"
             else "the thumbnail stored in the atlas")
    st.caption(f"1 screen px = {view.s:.3g} level-0 px ({100 / view.s:.0f} % of full resolution); pixels from "
               f"{where}. Drag a box to zoom into it; click a tile to inspect it (outlined).")
    if pix.slide is None:
        st.warning(f"The original slide is not reachable, so the viewer shows the thumbnail stored in the atlas "
                   f"(1 px = {pix.thumb_ds:.3g} level-0 px); zooming in only enlarges it. {pix.why}",
                   icon=":material/zoom_in:")  # not an emoji: its first use loads Streamlit's emoji table (0.2 s)
    _legend(data, i, layer, concept, output)
    with st.container(horizontal=True):
        name = f"{ui.download_prefix()}{sid}-{layer}-x{round(view.cx)}-y{round(view.cy)}-s{view.s:.3g}"
        ui.png_button(lambda: _png_with_legend(data, i, shown, view, layer, concept, output), name,
                      key="dl_overlay", label="PNG of this view (with legend)")
        ui.csv_button(lambda: data.tile_table(np.arange(start, start + n)), f"{sid}-tiles", key="dl_slide_tiles",
                      label="CSV of its tiles")
    _tile_panel(data, i, sid)


def _toolbar(sid: str, w: float, h: float, view: vp.View) -> None:
    with st.container(horizontal=True):
        for label, how, a, b in (("Whole slide", "fit", 0, 0), ("Zoom in", "zoom", vp.ZOOM_STEP, 0),
                                 ("Zoom out", "zoom", 1 / vp.ZOOM_STEP, 0), ("Full resolution", "full", 0, 0),
                                 ("←", "pan", -0.5, 0), ("→", "pan", 0.5, 0), ("↑", "pan", 0, -0.5),
                                 ("↓", "pan", 0, 0.5)):
            st.button(label, key=f"view_{label}", on_click=_move, args=(sid, w, h, how, a, b))


@st.cache_resource(max_entries=8, show_spinner=False)
def _pixels(key: str, i: int, _data: AtlasData) -> Pixels:
    row = _data.slides.iloc[i]
    maps = _data.slide_maps(i)
    w, h = slide_size(_data, i)
    return Pixels.open(str(row["path"]), maps["thumbnail"], float(maps.attrs["thumb_downsample"]), w, h)


def _soft_vmax(data: AtlasData, k: int, soft: np.ndarray) -> float:
    """Colour-scale top for concept k: its best prototype's cell weight (same scale on every slide),
    else this slide's maximum."""
    p = data.protos
    if "weight" in p and (p["cluster"] == k).any():
        return float(p["weight"][p["cluster"] == k].max())
    return float(np.nanmax(soft)) if soft.size else 1.0


@st.cache_data(max_entries=16, show_spinner=False)
def _layer_grid(key: str, i: int, layer: str, concept: int, output: int, _data: AtlasData) -> np.ndarray:
    """(gh, gw, 4) uint8 RGBA of the layer per map cell."""
    data, maps = _data, _data.slide_maps(i)
    hard = maps["hard"]
    if layer == "clusters":
        return overlay.hard_rgba(hard, data.k)
    if layer == "soft":
        soft = maps["soft"][concept].astype(np.float32)
        return overlay.soft_rgba(soft, _soft_vmax(data, concept, soft), concept_color(concept))
    if layer == "gradcam":
        cam = np.where(hard > 0, maps["gradcam"].astype(np.float32), np.nan)
        top = float(np.nanmax(cam)) if np.isfinite(cam).any() else 1.0
        return overlay.value_rgba(cam, (0.0, top if top > 0 else 1.0))
    row = data.slides.iloc[i]
    start, n = int(row["tile_start"]), int(row["n_tiles"])
    rows = np.arange(start, start + n)
    grid = overlay.tile_value_grid(data.x[rows], data.y[rows], float(row["tile_l0"]), data.out[rows, output],
                                   float(maps.attrs["cell_l0"]), hard.shape)
    return overlay.value_rgba(grid, _value_range(data, output))


@st.cache_resource(max_entries=24, show_spinner=False)  # resource: no pickling of 3 MB per hit; never mutated
def _view_image(key: str, i: int, layer: str, concept: int, output: int, opacity: int, view: str,
                _data: AtlasData) -> np.ndarray:
    """(VIEW_H, RENDER_W, 3) uint8: the slide's pixels of `view` under the layer at `opacity` %."""
    v = vp.View.parse(view)
    base = _pixels(key, i, _data).render(v)
    grid = _layer_grid(key, i, layer, concept, output, _data)
    rows, cols = vp.cell_index(v, float(_data.slide_maps(i).attrs["cell_l0"]), grid.shape[:2])
    return overlay.blend(base, vp.sample_grid(grid, rows, cols), opacity / 100.0)


def _viewer_spec(data: AtlasData, i: int, view: vp.View, jpeg: bytes) -> tuple[pd.DataFrame, dict]:
    """(tiles table, Vega-Lite spec): the view's image (outline and scale bar drawn in) under clickable
    tiles. x and y follow the chart's size (Vega `width` / `height` signals), so the image is never
    stretched. A plain spec, not Altair: Altair's schema validation took longer than the rest of a view
    change. The image is a constant, not a data field, so "Show data" lists tiles, never base64."""
    x0, y0, x1, y1 = view.box()
    row = data.slides.iloc[i]
    start, n, t = int(row["tile_start"]), int(row["n_tiles"]), float(row["tile_l0"])
    rows = np.arange(start, start + n)
    on = (data.x[rows] + t > x0) & (data.x[rows] < x1) & (data.y[rows] + t > y0) & (data.y[rows] < y1)
    rows = rows[on][:MAX_RECTS]
    tiles = pd.DataFrame({"row": rows, "x": data.x[rows], "y": data.y[rows], "x2": data.x[rows] + t,
                          "y2": data.y[rows] + t, "concept": [concept_label(c) for c in data.nmf[rows]],
                          "top output": np.array(data.output_names, dtype=object)[data.top[rows]],
                          "value": data.out[rows, data.top[rows]].round(3)})

    def scale(c: float, size: str) -> dict:
        return {"domain": {"expr": f"[{c} - {size} * {view.s} / 2, {c} + {size} * {view.s} / 2]"}, "nice": False,
                "zero": False, **({"reverse": True} if size == "height" else {})}

    def q(field: str, size: str | None = None, **extra) -> dict:
        return {"field": field, "type": "quantitative", **({"scale": scale(view.cx if size == "width" else view.cy,
                                                                           size)} if size else {}), **extra}
    pos = {"x": q("x", "width", axis=None), "x2": {"field": "x2"}, "y": q("y", "height", axis=None),
           "y2": {"field": "y2"}}
    spec = {"height": vp.VIEW_H, "padding": 0, "config": {"view": {"stroke": None}}, "layer": [
        {"data": {"values": [{"x": x0, "x2": x1, "y": y0, "y2": y1}]},
         "mark": {"type": "image", "aspect": False, "clip": True},
         "encoding": {**pos, "url": {"value": raster.data_url(jpeg, "image/jpeg")}}},
        {"mark": {"type": "rect", "fill": "white", "fillOpacity": 0.01, "strokeOpacity": 0, "clip": True},
         "params": [{"name": "tile_pick", "select": {"type": "point", "fields": ["row"], "on": "click", "clear": False}},
                    {"name": "zoom", "select": {"type": "interval", "encodings": ["x", "y"], "clear": "dblclick"}}],
         "encoding": {**pos, "tooltip": [
             {"field": "concept", "type": "nominal"}, {"field": "top output", "type": "nominal"},
             {"field": "value", "type": "quantitative", "title": data.out_label, "format": ".2f"},
             {"field": "x", "type": "quantitative", "title": "x (level-0 px)"},
             {"field": "y", "type": "quantitative", "title": "y (level-0 px)"}]}}]}
    return tiles, spec


def _annotate(data: AtlasData, i: int, view: vp.View, img: np.ndarray, tile: int | None, mpp: float | None) -> np.ndarray:
    """A copy of the view image with the selected tile outlined and the scale bar drawn in."""
    t = float(data.slides["tile_l0"].iat[i])
    outline = None
    if tile is not None:
        x0, y0, _, _ = view.box()
        outline = ((data.x[tile] - x0) / view.s, (data.y[tile] - y0) / view.s, t / view.s)
    return overlay.annotate_view(img, outline, *vp.scale_bar(view.s, mpp))


def _legend_items(data: AtlasData, i: int, layer: str, concept: int, output: int):
    """(kind, payload): ('chips', [(label, colour)]) or ('ramp', (left text, right text, caption))."""
    if layer == "clusters":
        return "chips", [(concept_label(j), concept_color(j)) for j in range(data.k)]
    if layer == "soft":
        return "ramp1", (concept_label(concept), concept_color(concept))
    if layer == "gradcam":
        return "ramp", ("0", "slide max", "GradCAM of the explained output (per slide, 0 to its maximum)")
    lo, hi = ("0", "1") if data.out_kind == "probs" else (f"{_value_range(data, output)[0]:.2f}",
                                                          f"{_value_range(data, output)[1]:.2f}")
    return "ramp", (lo, hi, f"{data.output_names[output]} {data.out_label}")


def _legend(data: AtlasData, i: int, layer: str, concept: int, output: int) -> None:
    kind, payload = _legend_items(data, i, layer, concept, output)
    if kind == "chips":
        st.markdown(legend_html([lab for lab, _ in payload], [c for _, c in payload]) + " (no colour = no tissue)",
                    unsafe_allow_html=True)
    elif kind == "ramp1":
        name, color = payload
        st.markdown(f"{html.escape(name)} weight per cell: 0 <span style='display:inline-block;width:12em;height:1em;"
                    f"vertical-align:middle;background:linear-gradient(to right, transparent, {color})'></span> "
                    "weight of the concept's top prototype cell (same scale on every slide)", unsafe_allow_html=True)
    else:
        lo, hi, cap = payload
        grad = ", ".join(VIRIDIS_HEX)
        st.markdown(f"{html.escape(cap)}: {lo} <span style='display:inline-block;width:12em;height:1em;"
                    f"vertical-align:middle;background:linear-gradient(to right, {grad})'></span> {hi}",
                    unsafe_allow_html=True)


def _png_with_legend(data, i, img, view, layer, concept, output) -> bytes:
    """PNG of the middle of the view (what a 1,280-px screen shows; scale bar and outline drawn in)
    with a title and the legend under it."""
    kind, payload = _legend_items(data, i, layer, concept, output)
    mid = img[:, (vp.RENDER_W - vp.FIT_W) // 2:(vp.RENDER_W + vp.FIT_W) // 2]
    return overlay.legend_png(mid, kind, payload, f"{data.path.name} · {data.slide_ids()[i]} · {LAYERS[layer]} · "
                                                  f"1 px = {view.s:.3g} level-0 px")


# -- the tile panel -----------------------------------------------------------------------
def _tile_panel(data: AtlasData, i: int, sid: str) -> None:
    row = data.slides.iloc[i]
    start, n = int(row["tile_start"]), int(row["n_tiles"])
    if not n:
        st.info("This slide has no tiles.")
        return
    picked = _selected_tile(data, i)
    rows = window(range(start, start + n), 0 if picked is None else picked - start)
    st.subheader("Selected tile")
    left, mid, right = st.columns([2, 2, 3])
    with left:
        r = state.bound(st.selectbox, "Tile (x, y in level-0 px)", "tile", default=rows[0], options=list(rows),
                        parse=int,
                        help=None if len(rows) == n else f"The list shows the {len(rows)} tiles around the selected "
                        f"one (of {n:,} on this slide); click a tile in the viewer to pick any tile.",
                        format_func=lambda t: f"#{t - start} ({data.x[t]}, {data.y[t]}) · {concept_label(data.nmf[t])}",
                        on_change=_on_tile_pick, args=(data, i, sid))
        top = np.argsort(-data.out[r])[:3]
        st.markdown("Top outputs: " + ", ".join(f"**{html.escape(data.output_names[j])}** {data.out[r, j]:.2f}"
                                                for j in top))
    with mid:
        # an inline figure, not st.image: Streamlit loads its image component on first use, 0.3 s after the page
        cap = html.escape(ui.tile_captions(data, [r])[0])
        st.markdown(f"<figure style='margin:0'><img src='{ui.inline_image(data.thumbnails([r])[0])}' alt='{cap}' "
                    "style='width:200px;max-width:100%;display:block;object-fit:contain'><figcaption style='font-size:0.85rem;"
                    f"color:#444;margin-top:0.3rem'>{cap}</figcaption></figure>", unsafe_allow_html=True)
    with right:
        st.vega_lite_chart(spec=_weights_spec(data, r, tuple(concept_label(j) for j in range(data.k))),
                           width="stretch")
        w = data.weights[r]
        ui.csv_button(pd.DataFrame({"concept": [concept_label(j) for j in range(data.k)], "weight": w,
                                    "share": w / max(w.sum(), 1e-12)}), f"{sid}-tile-{r - start}-weights",
                      key="dl_tile_w")


@st.cache_data(max_entries=8, show_spinner=False)
def _weights_template(key: str, labels: tuple[str, ...], _data: AtlasData) -> dict:
    """Vega-Lite spec of a tile's concept-weight bars, built and validated once per atlas and naming;
    each tile only puts its own rows in (Altair's check took about 0.1 s per tile)."""
    df = pd.DataFrame({"concept": list(labels), "weight": np.zeros(len(labels)), "share": np.zeros(len(labels))})
    ch = ui.bar(df, "concept", "weight", color="concept", scale=ui.concept_scale(_data.k), sort=None, height=260,
                title="Concept weights (sum over cells)",
                tooltip=["concept", alt.Tooltip("weight:Q", format=".3f"), alt.Tooltip("share:Q", format=".1%")])
    return ui.styled(ch).to_dict()


def prepare(data: AtlasData) -> None:
    """Build the tile panel's chart spec at server start (see dashboard/warm.py)."""
    _weights_template(data.key, tuple(concept_label(j) for j in range(data.k)), data)


def _weights_spec(data: AtlasData, r: int, labels: tuple[str, ...]) -> dict:
    """The bars of tile r: the template with tile r's weights (sum over cells) and shares as its data."""
    spec = _weights_template(data.key, labels, data)
    w = data.weights[r].astype(float)
    share = w / max(w.sum(), 1e-12)
    rows = [{"concept": c, "weight": float(a), "share": float(b)} for c, a, b in zip(labels, w, share)]
    return {**spec, "datasets": {spec["data"]["name"]: rows}}


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
    # inline: served as files, the 7-8 images of this page arrived 0.3 s after the page itself
    st.image([ui.inline_image(im) for im in images], caption=caps, width=STRIP_PX)
    ui.png_button(lambda: ui.contact_sheet([overlay.encode(im) for im in images], caps, cols=min(6, len(images)),
                                           cell=STRIP_PX), f"{data.slide_ids()[i]}-soft-maps", key="dl_strip")
