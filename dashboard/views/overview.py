"""Overview: cohort summary, how the atlas was computed, and the scatter of all tiles.

The scatter is a density image of every selected tile plus at most 20,000 sampled points (5,000 by
default); a brush (drag) or a click selects tiles, resolved here against all tiles, and shows them in a
gallery.
"""

from __future__ import annotations

import html
import json

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from precompute.colors import VIRIDIS_HEX, concept_colors, diagnosis_colors, viridis

from .. import raster, state, ui
from ..guard import guarded
from ..data import AtlasData
from ..labels import concept_label, legend_html

TABS = {"tiles": "All tiles", "concepts": "Concepts", "cohort": "Cohort and method"}
COLOR_MODES = {"nmf": "NMF concept", "kmeans": "k-means cluster", "diagnosis": "Diagnosis",
               "slide": "Slide", "output": "Model output"}
LEGEND_TITLES = {"nmf": "concept", "kmeans": "k-means cluster", "diagnosis": "diagnosis"}  # categorical colourings


def render(data: AtlasData, diagnoses: list[str]) -> None:
    st.header("Overview")
    _headline(data)
    tab, box = state.tabs("tab", TABS, default="tiles")  # only the open tab is drawn
    with box:
        if tab == "tiles":
            _scatter(data, diagnoses)
        elif tab == "concepts":
            _concept_sizes(data, diagnoses)
        else:
            _cohort_and_method(data)


# -- summary ------------------------------------------------------------------------------
def cohort_table(data: AtlasData) -> pd.DataFrame:
    """Slides and tiles by diagnosis and status."""
    s = data.slides
    t = pd.crosstab(s["diagnosis"], s["status"])
    for col in ("ok", "no_tissue", "failed"):
        if col not in t:
            t[col] = 0
    t = t[["ok", "no_tissue", "failed"]].rename_axis(columns=None)
    t.insert(0, "slides", t.sum(axis=1))
    t["tiles"] = s.groupby("diagnosis")["n_tiles"].sum()
    if "patient" in s and (s["patient"] != "").any():
        t["patients"] = s[s["patient"] != ""].groupby("diagnosis")["patient"].nunique()
        t["patients"] = t["patients"].fillna(0).astype(int)
    return t.reset_index()


def _headline(data: AtlasData) -> None:
    """Counts of slides, tiles and concepts, and the model and layer in one line."""
    a, s = data.attrs, data.slides
    status = s["status"].value_counts()
    cols = st.columns(5)
    cols[0].metric("Slides", f"{len(s):,}")
    cols[1].metric("Tiles", f"{data.n:,}")
    cols[2].metric("Concepts (K)", data.k)
    cols[3].metric("No tissue", int(status.get("no_tissue", 0)))
    cols[4].metric("Failed", int(status.get("failed", 0)))
    shape = _layer_shape(a)
    st.markdown(f"Model **`{a.get('model_source', '?')}`**, layer **`{a.get('layer', '?')}`** ({shape}), "
                f"{len(data.output_names)} outputs ({data.out_label}); computed {a.get('created_utc', '?')} "
                f"on {a.get('device', '?')}.")


def _cohort_and_method(data: AtlasData) -> None:
    a, cfg, s = data.attrs, data.attrs.get("config", {}) or {}, data.slides
    shape = _layer_shape(a)
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Cohort")
        table = cohort_table(data)
        st.dataframe(table, hide_index=True, width="stretch")
        ui.csv_button(table, "cohort", key="dl_cohort")
        bad = s[s["status"] != "ok"][["slide_id", "diagnosis", "status", "error", "path"]]
        if len(bad):
            with st.expander(f"{len(bad)} slide(s) without tiles (failed or no tissue)"):
                st.dataframe(bad, hide_index=True, width="stretch")
    with right:
        st.subheader("How it was computed")
        fit = a.get("fit", {}) or {}
        rows = {
            "created (UTC)": a.get("created_utc", ""),
            "tool version": a.get("tool_version", ""),
            "device": a.get("device", ""),
            "model sha256": str(a.get("model_sha256", ""))[:16] + "…",
            "layer shape (C × h × w)": shape,
            "tile / stride (px)": f"{cfg.get('tile_px', '?')} / {cfg.get('stride_px', '?')}",
            "target mpp (µm/px)": cfg.get("target_mpp", ""),
            "projection": cfg.get("projection", ""),
            "NMF relative error (all cells)": _nmf_error(data),
            "NMF fit error (calibration cells)": f"{fit['nmf_relative_error']:.3f}" if "nmf_relative_error" in fit
            else "",
            "seed": cfg.get("seed", ""),
        }
        st.dataframe(pd.DataFrame({"": list(rows), "value": [str(v) for v in rows.values()]}),
                     hide_index=True, width="stretch")
        st.code(a.get("command_line", ""), language="bash", wrap_lines=True)
        with st.expander("Full configuration"):
            st.json({"config": cfg, "fit": fit}, expanded=False)


def _layer_shape(attrs: dict) -> str:
    shape = attrs.get("layer_shape", [])
    return " × ".join(str(v) for v in shape) if isinstance(shape, list) else str(shape)


def _nmf_error(data: AtlasData) -> str:
    """The atlas's NMF relative error over all cells (the figure the Fidelity page shows too)."""
    err = data.atlas.group_attrs("clusters").get("relative_error")
    try:
        return f"{float(err):.3f}"
    except (TypeError, ValueError):
        return ""


# -- scatter ------------------------------------------------------------------------------
def _color_spec(data: AtlasData, mode: str):
    """(category codes (n,), category labels) for categorical colourings, else (None, None)."""
    if mode == "nmf":
        return data.nmf, [concept_label(j) for j in range(data.k)]
    if mode == "kmeans":
        kk = int(data.kmeans.max()) + 1 if len(data.kmeans) else 0
        return data.kmeans, [concept_label(j, "K") for j in range(kk)]
    if mode == "diagnosis":
        return data.tile_diag, list(data.diagnoses)
    return None, None


def _output_range(data: AtlasData, output: int) -> tuple[float, float]:
    if data.out_kind == "probs":
        return 0.0, 1.0
    v = data.out[:, output]
    return (float(np.percentile(v, 1)), float(np.percentile(v, 99))) if len(v) else (0.0, 1.0)


def _cat(labels, codes):
    """Dictionary-encoded strings (small to ship, cheap to build); plain strings if labels repeat."""
    labels, codes = list(labels), np.asarray(codes, np.int64)
    if len(set(labels)) < len(labels):
        return np.asarray(labels, dtype=object)[codes]
    return pd.Categorical.from_codes(codes, categories=labels)


@st.cache_data(max_entries=32, show_spinner=False)
def _density(key: str, mode: str, output: int, dx: tuple[str, ...], _data: AtlasData) -> tuple[bytes, tuple, int]:
    """(PNG of the density image of all filtered tiles, extent, number of tiles) for one colouring."""
    data = _data
    mask = data.tile_mask(list(dx))
    ext = raster.extent(data.proj)
    bins = raster.bins_for(data.n)
    cells = raster.bin_index(data.proj[mask], ext, bins)
    codes, labels = _color_spec(data, mode)
    if codes is not None:
        colors = concept_colors(len(labels)) if mode in ("nmf", "kmeans") else diagnosis_colors(labels)
        img = raster.density_rgba(cells, bins, categories=codes[mask], colors=colors)
    elif mode == "output":
        img = raster.density_rgba(cells, bins, values=data.out[mask, output], vrange=_output_range(data, output))
    else:
        img = raster.density_rgba(cells, bins)
    return raster.png_bytes(img), ext, int(mask.sum())


@st.cache_data(max_entries=16, show_spinner=False)
def _points(key: str, dx: tuple[str, ...], n_points: int, labels: tuple[str, ...], _data: AtlasData) -> pd.DataFrame:
    """The sampled points (same for every colouring): row, px, py and the tooltip fields (`labels`:
    the concept labels, part of the cache key so that a renamed concept is not served stale)."""
    data = _data
    rows = raster.sample_rows(data.permutation(), data.tile_mask(list(dx)), min(n_points, raster.MAX_POINTS))
    return pd.DataFrame({
        "row": rows, "px": data.proj[rows, 0], "py": data.proj[rows, 1],
        "slide": _cat(data.slide_ids(), data.tile_slide[rows]),
        "concept": _cat(list(labels), data.nmf[rows]),
        "diagnosis": _cat(data.diagnoses, data.tile_diag[rows]),
        "top output": _cat(data.output_names, data.top[rows]),
        "value": data.out[rows, data.top[rows]].round(3),
    })


def prepare(data: AtlasData) -> None:
    """Fill the scatter's caches (density image, points, chart spec) for every colouring of the whole
    cohort (about 0.6 s each at 10^6 tiles): called at server start, see dashboard/warm.py."""
    if data.proj is None or data.n == 0 or data.proj_nonfinite:
        return
    for mode in COLOR_MODES:
        if mode != "kmeans" or data.kmeans is not None:
            _layers(data, mode, data.default_output if mode == "output" else 0, (), raster.DEFAULT_POINTS)
    pts = _points(data.key, (), raster.DEFAULT_POINTS, tuple(concept_label(j) for j in range(data.k)), data)
    _live_spec(data.key, raster.extent(data.proj), *_point_style(len(pts)), data.out_label)


def _layers(data: AtlasData, mode: str, output: int, dx: tuple[str, ...], n_points: int):
    """Density PNG, points table (with the colouring's column), extent, number of filtered tiles."""
    png, ext, n_shown = _density(data.key, mode, output, dx, data)
    pts = _points(data.key, dx, n_points, tuple(concept_label(j) for j in range(data.k)), data)
    rows = pts["row"].to_numpy()
    if mode == "kmeans":
        pts = pts.assign(kmeans=_cat([concept_label(j, "K") for j in range(int(data.kmeans.max()) + 1)],
                                     data.kmeans[rows]))
    elif mode == "output":
        pts = pts.assign(output=data.out[rows, output].round(3))
    elif mode == "slide":
        pts = pts.assign(slide_colour=slide_colours(pts["slide"]))
    return png, pts, ext, n_shown


CATEGORY20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
              "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
              "#17becf", "#9edae5"]
OTHER_SLIDES = "other slides"
OTHER_SLIDES_COLOUR = "#bdbdbd"


def slide_colours(slides: pd.Series) -> np.ndarray:
    """Colour key per point when colouring by slide: the slide id for the 19 slides with the most drawn
    points (20 when there are no more), OTHER_SLIDES for the rest, so every colour has a legend entry."""
    counts = pd.Series(np.asarray(slides, dtype=object)).value_counts(sort=True)
    keep = counts.index[: 20 if len(counts) <= 20 else 19]
    vals = np.asarray(slides, dtype=object)
    return np.where(np.isin(vals, list(keep)), vals, OTHER_SLIDES).astype(object)


def slide_colour_names(pts: pd.DataFrame) -> list[str]:
    """Legend order: the kept slides by number of points, then OTHER_SLIDES when used."""
    counts = pts["slide_colour"].value_counts(sort=True)
    names = [n for n in counts.index if n != OTHER_SLIDES]
    return names + ([OTHER_SLIDES] if OTHER_SLIDES in counts.index else [])


def slide_palette(names: list[str]) -> list[str]:
    """Colours of `slide_colour_names`: CATEGORY20 in order, light grey for OTHER_SLIDES."""
    kept = [n for n in names if n != OTHER_SLIDES]
    return CATEGORY20[:len(kept)] + ([OTHER_SLIDES_COLOUR] if len(kept) < len(names) else [])


OUTPUT_STEPS = 256  # colours of the viridis ramp when colouring points by a model output


def _colouring(data: AtlasData, mode: str, output: int, pts: pd.DataFrame) -> tuple[pd.Categorical, str]:
    """(CSS colour of each point (len(pts),), HTML legend) for one colouring of the points `pts` (from
    `_layers`, with the colouring's column)."""
    rows = pts["row"].to_numpy()
    if mode == "output":
        lo, hi = _output_range(data, output)
        ramp = ["#%02x%02x%02x" % tuple(c) for c in viridis(np.linspace(0, 1, OUTPUT_STEPS))]
        t = np.clip((data.out[rows, output] - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        codes = np.nan_to_num(t * (OUTPUT_STEPS - 1)).round().astype(np.int64)
        return _cat_colours(ramp, codes), gradient_legend(data.output_names[output], lo, hi)
    if mode == "slide":
        names = slide_colour_names(pts)
        colours = slide_palette(names)
        codes = pd.Categorical(pts["slide_colour"], categories=names).codes
        return _cat_colours(colours, codes), legend_html(names, colours, title="slide")
    codes, labels = _color_spec(data, mode)
    colours = diagnosis_colors(labels) if mode == "diagnosis" else concept_colors(len(labels))
    return _cat_colours(colours, codes[rows]), legend_html(labels, colours, title=LEGEND_TITLES[mode])


def _cat_colours(colours: list[str], codes: np.ndarray) -> pd.Categorical:
    # a palette may repeat a colour (many diagnoses), so the categories are the distinct colours used
    return pd.Categorical(np.asarray(colours, dtype=object)[np.asarray(codes, np.int64)])


def gradient_legend(title: str, lo: float, hi: float) -> str:
    """HTML legend of the viridis ramp from `lo` to `hi` (values outside are drawn at the ends)."""
    stops = ", ".join(VIRIDIS_HEX)
    return (f'<b>{html.escape(title)}</b>&nbsp; {lo:.3g} <span style="display:inline-block;width:14em;height:1em;'
            f'vertical-align:middle;border:1px solid #444;background:linear-gradient(to right, {stops})"></span>'
            f' {hi:.3g}')


CANVAS_ROWS = 2_000  # Streamlit renders a chart with more rows than this per data set on a canvas, not SVG


POINTS = "points"  # the scatter's named data set of sampled points
DENSITY = "density"  # the scatter's named data set of one row: the density image's corners and URL


def _point_style(n: int) -> tuple[int, bool]:
    """(marker area in px^2, ARIA text per point?) for n drawn points."""
    # No ARIA text past CANVAS_ROWS: Streamlit then draws on a canvas, where the per-point descriptions
    # never reach the page, yet the browser would still build one string per point (~0.1 s at 5,000).
    return (60 if n < 2_000 else 22 if n < 8_000 else 14), n <= CANVAS_ROWS


def _scatter_chart(ext, image, points, color, size: int, aria: bool, out_label: str):
    """The density image (`image`: a data set of x, x2, y, y2, url) with the points over it."""
    x0, x1, y0, y1 = ext
    xs = alt.Scale(domain=[x0, x1], nice=False, zero=False)
    ys = alt.Scale(domain=[y0, y1], nice=False, zero=False)
    density = alt.Chart(image).mark_image(aspect=False, aria=False).encode(
        x=alt.X("x:Q", scale=xs, title="projection 1"), x2="x2:Q",
        y=alt.Y("y:Q", scale=ys, title="projection 2"), y2="y2:Q", url="url:N")
    brush = alt.selection_interval(name="brush", encodings=["x", "y"])
    pick = alt.selection_point(name="pick", fields=["row"], on="click", clear="dblclick")
    # No outline: a stroke per point costs the software renderer a sixth of the chart's drawing time.
    dots = alt.Chart(points).mark_circle(size=size, opacity=0.8, aria=aria).encode(
        x=alt.X("px:Q", scale=xs), y=alt.Y("py:Q", scale=ys), color=color,
        tooltip=["slide:N", "diagnosis:N", "concept:N", "top output:N",
                 alt.Tooltip("value:Q", title=out_label, format=".2f")],
    ).add_params(brush, pick)
    return alt.layer(density, dots).properties(height=680)


def _density_row(ext, url: str) -> pd.DataFrame:
    x0, x1, y0, y1 = ext
    return pd.DataFrame({"x": [x0], "x2": [x1], "y": [y1], "y2": [y0], "url": [url]})


@st.cache_data(max_entries=8, show_spinner=False)
def _live_spec(key: str, ext: tuple, size: int, aria: bool, out_label: str) -> dict:
    """Vega-Lite spec of the scatter on the page, the same for every colouring and filter: each point
    brings its colour (the column "colour", no scale) and the density image is the data set DENSITY.
    Streamlit then keeps the browser's chart (and its brush) and swaps only its data when the colouring
    or the filter changes. Built and checked once: Altair's check of the whole spec took 0.1-0.3 s on
    every rerun (a brush too)."""
    color = alt.Color("colour:N", scale=None)
    ch = _scatter_chart(ext, alt.Data(name=DENSITY), alt.Data(name=POINTS), color, size, aria, out_label)
    return ui.styled(ch).to_dict()


def _legend_color(data: AtlasData, mode: str, output: int, pts: pd.DataFrame):
    """The colour encoding with its legend for one colouring (the PNG download draws its legend in the
    chart; the page shows it as HTML, see `_colouring`)."""
    if mode == "nmf":
        return alt.Color("concept:N", scale=ui.concept_scale(data.k), title="concept")
    if mode == "kmeans":
        kk = int(data.kmeans.max()) + 1
        return alt.Color("kmeans:N", title="k-means", scale=alt.Scale(
            domain=[concept_label(j, "K") for j in range(kk)], range=concept_colors(kk)))
    if mode == "diagnosis":
        return alt.Color("diagnosis:N", title="diagnosis",
                         scale=alt.Scale(domain=data.diagnoses, range=diagnosis_colors(data.diagnoses)))
    if mode == "slide":
        names = slide_colour_names(pts)
        return alt.Color("slide_colour:N", title="slide", scale=alt.Scale(domain=names, range=slide_palette(names)),
                         legend=alt.Legend(title="slide", columns=1, symbolLimit=len(names)))
    lo, hi = _output_range(data, output)
    return alt.Color("output:Q", title=data.output_names[output],
                     scale=alt.Scale(domain=[lo, hi], range=VIRIDIS_HEX, clamp=True))


def scatter_png(data: AtlasData, mode: str, output: int, dx: tuple[str, ...], n_points: int) -> bytes:
    """PNG of the scatter as drawn (density image, points) with the colouring's legend in the chart, made on
    the server when asked for."""
    png, pts, ext, _ = _layers(data, mode, output, dx, n_points)
    color = _legend_color(data, mode, output, pts)
    ch = _scatter_chart(ext, _density_row(ext, raster.data_url(png)), alt.Data(name=POINTS), color,
                        *_point_style(len(pts)), data.out_label)
    spec = ui.styled(ch).to_dict()
    # the points inline as plain JSON values (Altair itself refuses more than 5,000 rows outside a page)
    values = json.loads(pts.to_json(orient="records"))
    return ui.spec_png({**spec, "datasets": {**spec.get("datasets", {}), POINTS: values}})


@state.fragment
@guarded
def _scatter(data: AtlasData, diagnoses: list[str]) -> None:
    """Scatter, brush and gallery; a fragment, so brushing reruns only this part of the page."""
    if data.proj is None or data.n == 0:
        st.info("This atlas has no 2-D projection of its tiles (or no tiles), so there is no scatter to show.")
        return
    if data.proj_nonfinite:
        st.warning(f"The 2-D projection of this atlas (tiles/proj in {data.path.name}) is NaN or infinite for "
                   f"{data.proj_nonfinite:,} of {data.n:,} tiles, so the scatter cannot be drawn. The atlas is "
                   "damaged: re-run `python -m precompute run` with the same command to rebuild it.")
        return
    modes = [m for m in COLOR_MODES if m != "kmeans" or data.kmeans is not None]
    c1, c2, _, c4 = st.columns([2, 2, 1, 2])
    with c1:
        mode = state.bound(st.selectbox, "Colour by", "color", default="nmf", options=modes,
                           format_func=COLOR_MODES.get)
    with c4:
        n_points = state.bound(st.selectbox, "Points drawn (at most)", "points", default=raster.DEFAULT_POINTS,
                               options=list(raster.POINT_CHOICES), parse=int, format_func=lambda v: f"{v:,}",
                               help="All tiles are always in the density image; more points cost browser time.")
    output = 0
    if mode == "output":
        with c2:
            output = state.bound(st.selectbox, "Model output", "output", default=data.default_output,
                                 options=list(range(len(data.output_names))), parse=int,
                                 format_func=lambda i: data.output_names[i])
    png, pts, ext, n_shown = _layers(data, mode, output, tuple(diagnoses), n_points)
    if n_shown == 0:
        st.info("No tiles match the diagnosis filter.")
        return
    colours, legend = _colouring(data, mode, output, pts)
    st.markdown(legend, unsafe_allow_html=True)
    # the browser needs the tooltip fields and each point's colour, not the colouring's own column
    live = pts.drop(columns=["kmeans", "output", "slide_colour"], errors="ignore")
    # the image by a short link (the chart's "Show data" then lists no base64), one per session and run
    image = _density_row(ext, ui.media_url(png, "image/png", "overview-scatter-density"))
    spec = _live_spec(data.key, ext, *_point_style(len(pts)), data.out_label)
    event = ui.spec_chart({**spec, "datasets": {POINTS: live.assign(colour=colours), DENSITY: image}},
                          lambda: scatter_png(data, mode, output, tuple(diagnoses), n_points), "scatter",
                          on_select="rerun", selection_mode=["brush", "pick"], key="scatter")
    st.caption(f"Density image: all {n_shown:,} tiles in the filter; points: {len(pts):,} of them "
               f"(a fixed random sample, at most {n_points:,}). Drag to select a region (resolved "
               "against all tiles), click a point to pick one tile, double-click to clear. "
               "\"PNG of this chart\" (below it) saves the chart with its legend.")
    ui.csv_button(pts, f"scatter-points-{mode}", key="dl_points", label="CSV of the drawn points")
    _selection(data, diagnoses, event)



def _selection(data: AtlasData, diagnoses: list[str], event) -> None:
    sel = (event or {}).get("selection", {}) if event else {}
    box = sel.get("brush") or {}
    picked = [int(p["row"]) for p in sel.get("pick") or [] if "row" in p]
    if picked:
        st.markdown("**Picked tile**")
        ui.tile_gallery(data, picked[:1], "picked-tile", key="gal_pick", width=200)
    if not box or "px" not in box or "py" not in box:
        return
    mask = data.tile_mask(diagnoses)
    rows = raster.rows_in_box(data.proj, mask, box["px"], box["py"])
    st.markdown(f"**Selection: {len(rows):,} tiles** (all tiles in the box, not only the drawn points)")
    if not len(rows):
        return
    sel_mask = np.zeros(data.n, bool)
    sel_mask[rows] = True
    c1, c2 = st.columns(2)
    comp = pd.DataFrame({"concept": [concept_label(j) for j in range(data.k)],
                         "tiles": np.bincount(data.nmf[rows], minlength=data.k)})
    with c1:
        ui.chart(ui.bar(comp, "concept", "tiles", color="concept", scale=ui.concept_scale(data.k),
                        title="Selected tiles by dominant concept", sort=None, height=300))
    by_dx = pd.DataFrame({"diagnosis": data.diagnoses,
                          "tiles": np.bincount(data.tile_diag[rows], minlength=len(data.diagnoses))})
    with c2:
        # horizontal: every diagnosis name gets its own line, however many there are
        ui.chart(ui.bar(by_dx, "diagnosis", "tiles", color="diagnosis", title="Selected tiles by diagnosis",
                        scale=alt.Scale(domain=data.diagnoses, range=diagnosis_colors(data.diagnoses)),
                        sort=None, height=ui.rows_height(len(data.diagnoses), per=30, extra=80), horizontal=True))
    shown = raster.sample_rows(data.permutation(), sel_mask, ui.GALLERY_MAX)
    st.caption(f"Gallery: {len(shown)} of the {len(rows):,} selected tiles (random); caption: slide · concept · "
               f"top model output and its {data.out_label}. CSV = these tiles; the full selection below.")
    ui.tile_gallery(data, shown, "selection-gallery", key="gal_sel")
    ui.csv_button(lambda: data.tile_table(rows), "selection-all-tiles", key="dl_sel_all",
                  label=f"CSV of all {len(rows):,} selected tiles")


def _concept_sizes(data: AtlasData, diagnoses: list[str]) -> None:
    mask = data.slide_mask(diagnoses)
    w = data.slide_weight[mask].sum(axis=0)
    n = data.slide_count[mask].sum(axis=0)
    df = pd.DataFrame({"concept": [concept_label(j) for j in range(data.k)], "tiles": n,
                       "weight_share": w / w.sum() if w.sum() > 0 else np.zeros(data.k)})
    pick = alt.selection_point(name="open", fields=["concept"], on="click")
    ch = ui.bar(df, "concept", "tiles", color="concept", scale=ui.concept_scale(data.k), sort=None, height=320,
                title="Tiles per dominant concept — click a bar to open the concept",
                tooltip=["concept", "tiles", alt.Tooltip("weight_share:Q", format=".1%")]).add_params(pick)
    ui.chart(ch, on_select=_open_concept, selection_mode="open", key="concept_bars")
    ui.csv_button(df, "concept-sizes", key="dl_sizes")


def _open_concept() -> None:
    """Callback of the concept bar chart: switch to the drill-down of the clicked concept."""
    sel = st.session_state.get("concept_bars", {}).get("selection", {}).get("open") or []
    if sel and "concept" in sel[0]:
        state.go(page="cluster", cluster=int(str(sel[0]["concept"]).lstrip("C")))

