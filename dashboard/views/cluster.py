"""Concept drill-down: prototypes, typical tiles, size, its fidelity numbers (regression coefficient,
direction, GradCAM r; from precompute.report, see the Fidelity page), composition by diagnosis (or
another slide column), model outputs on its tiles, prevalence per slide and distance to the other
concepts.

All numbers respect the diagnosis filter, except the fidelity numbers (whole atlas). "Tiles of concept
k" = tiles whose dominant concept is k; "weight" = summed per-cell NMF weight (atlas tiles/weights).
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from precompute import overlay
from precompute.colors import concept_color, diagnosis_colors
from precompute.enrichment import slide_shares

from .. import naming, state, ui
from ..data import AtlasData
from ..fidelity import NOT_COMPUTED_CAM, FidelityError, direction, fmt, fmt_cam, glass_flags, glass_warning, report
from ..labels import concept_label, legend_html

N_TYPICAL = 24
N_PROTOTYPES = 16
N_SLIDES_SHOWN = 40
TABS = {"tiles": "Prototypes and typical tiles", "composition": "Composition and outputs",
        "slides": "Slides and distances"}


def render(data: AtlasData, diagnoses: list[str]) -> None:
    st.header("Concept drill-down")
    if data.k == 0:
        st.info("This atlas has no concepts.")
        return
    top = st.columns([2, 5])
    with top[0]:
        k = state.bound(st.selectbox, "Concept", "cluster", default=1, options=list(range(1, data.k + 1)),
                        parse=int, format_func=lambda j: concept_label(j - 1)) - 1
    with top[1]:
        chips = legend_html([concept_label(j) for j in range(data.k)], [concept_color(j) for j in range(data.k)])
        st.markdown(f"<div style='margin-top:2.1rem'>{chips}</div>", unsafe_allow_html=True)
    naming.concept_editor(data, k)
    slide_ok = data.slide_mask(diagnoses)
    tile_ok = data.tile_mask(diagnoses)
    members = np.flatnonzero(tile_ok & (data.nmf == k))
    _metrics(data, k, slide_ok, tile_ok, members)
    _fidelity(data, k)
    _on_glass(data, k)
    tab, box = state.tabs("tab", TABS, default="tiles")  # only the open tab is drawn
    with box:
        left, right = st.columns(2)
        if tab == "tiles":
            with left:
                _prototypes(data, k, slide_ok)
            with right:
                _typical(data, k, tuple(diagnoses))
        elif tab == "composition":
            with left:
                _composition(data, k, slide_ok)
            with right:
                _outputs(data, k, tile_ok, members)
        else:
            with left:
                _prevalence(data, k, slide_ok)
            with right:
                _distances(data, k)


def _metrics(data, k, slide_ok, tile_ok, members) -> None:
    w = data.slide_weight[slide_ok]
    total = w.sum()
    present = int((data.slide_count[slide_ok, k] > 0).sum())
    n_ok = int((w.sum(axis=1) > 0).sum())
    c = st.columns(4)
    c[0].metric(f"Tiles where {concept_label(k)} dominates", f"{len(members):,}",
                f"{len(members) / max(1, tile_ok.sum()):.1%} of tiles", delta_color="off", delta_arrow="off")
    c[1].metric("Share of all concept weight", f"{w[:, k].sum() / total:.1%}" if total > 0 else "–")
    c[2].metric("Slides with it", f"{present} / {n_ok}", help="Slides where it dominates at least one tile")
    c[3].metric("Prototypes", int((data.protos.get("cluster", np.zeros(0)) == k).sum()))


def _on_glass(data, k) -> None:
    """A warning when the concept sits mostly on glass or tissue edges (see precompute/cellmask.py)."""
    flags = glass_flags(data)
    if k < len(flags) and glass_warning(flags[k]):
        st.warning(glass_warning(flags[k]), icon=":material/warning:")


def _fidelity(data, k) -> None:
    """This concept's line of the fidelity report: coefficient, direction, effect per SD, GradCAM r."""
    try:
        rep = report(data)
    except FidelityError as exc:
        st.caption(f"Fidelity numbers unavailable for this atlas ({exc}).")
        return
    if k >= len(rep["clusters"]):
        return
    row = rep["clusters"][k]
    name = rep["output"]["name"]
    label = concept_label(k)
    c = st.columns([1.5, 1, 1.2, 1.2])  # the first label and its delta need ~240 px (no cut at 1,280 px)
    c[0].metric(f"Effect on {name} (coefficient)", fmt(row["coef"], "+.4g"), direction(row["coef"]),
                delta_color="off", delta_arrow="off",
                help=f"Change of the {name} {rep.get('target', 'logit')} per unit of {label}'s weight in a tile, other concepts held equal "
                     "(linear regression over all tiles of the atlas).")
    c[1].metric("Effect per SD", fmt(row["effect_sd"], "+.3f"),
                help=f"The coefficient times the usual spread (standard deviation) of {label}'s weight over tiles.")
    if rep["gradcam"]:
        c[2].metric("GradCAM r, all tiles", fmt_cam(row["cam_r_mean"], row["cam_r_std"]),
                    f"n = {row['cam_n']}", delta_color="off", delta_arrow="off",
                    help=f"Per tile, correlation of {label}'s map with the GradCAM map of {name} (mean ± std).")
        c[3].metric("GradCAM r, positive tiles", fmt_cam(row["cam_r_pos_mean"], row["cam_r_pos_std"]),
                    f"n = {row['cam_n_pos']}", delta_color="off", delta_arrow="off",
                    help=f"The same over the tiles the model calls positive for {name}.")
    else:
        c[2].caption(f"{NOT_COMPUTED_CAM}.")
    source = "computed now from the tiles" if rep["source"] == "computed" else "stored by the run"
    cols = st.columns([4, 1.4])
    cols[0].caption(f"Fidelity ({source}; whole atlas, not filtered): the concepts explain {name} with R² "
                    f"{fmt(rep['regression']['r2'])} in-sample, {fmt(rep['regression']['r2_cv'])} cross-validated.")
    cols[1].button("Fidelity page", key="open_fidelity", on_click=state.go, kwargs={"page": "fidelity"},
                   icon=":material/query_stats:")


def _prototypes(data, k, slide_ok) -> None:
    st.subheader("Prototypes")
    p = data.protos
    if "cluster" not in p:
        st.info("This atlas stores no prototypes.")
        return
    rows = np.flatnonzero((p["cluster"] == k) & slide_ok[p["slide"]])
    rows = rows[np.argsort(-p["weight"][rows], kind="stable")][:N_PROTOTYPES]
    if not len(rows):
        st.info("No prototypes on slides in the filter.")
        return
    ids = data.slide_ids()
    caps = [f"{ids[p['slide'][r]]} · w {p['weight'][r]:.2f}" for r in rows]
    crops = data.prototype_crops(rows)
    tiles = p["tile"][rows]
    shape = data.attrs.get("layer_shape") or []
    if isinstance(shape, list) and len(shape) == 3:  # each prototype inside its tile, its cell outlined
        grid = (int(shape[1]), int(shape[2]))
        shown = [overlay.tile_with_cell(jpg, int(p["cell_y"][r]), int(p["cell_x"][r]), grid)
                 for jpg, r in zip(data.thumbnails(tiles), rows)]
        note = "Each prototype cell (outlined) inside its tile"
    else:
        shown, note = crops, "Prototype cells with one cell of context"
    ui.image_grid(data, shown, caps, tiles, "proto", width=120, cols=4)
    st.caption(f"{note}: the top-weight cells of the concept over the cohort. A click on one shows the tile "
               "outlined on its slide.")
    table = pd.DataFrame({"slide_id": ids[p["slide"][rows]], "tile": p["tile"][rows], "weight": p["weight"][rows],
                          "cell_y": p["cell_y"][rows], "cell_x": p["cell_x"][rows]})
    with st.container(horizontal=True):
        ui.csv_button(table, f"prototypes-{concept_label(k)}", key="dl_proto_csv")
        ui.png_button(lambda: ui.contact_sheet(crops, caps), f"prototypes-{concept_label(k)}", key="dl_proto_png")


def typical_rows(data: AtlasData, k: int, members: np.ndarray, n: int = N_TYPICAL) -> np.ndarray:
    """Member tiles with the largest share of their weight in concept k (ties: larger weight first)."""
    if not len(members):
        return members
    w = data.weights[members]
    share = w[:, k] / np.maximum(w.sum(axis=1), 1e-12)
    order = np.lexsort((-w[:, k], -share))
    return members[order[:n]]


@st.cache_data(max_entries=32, show_spinner=False)
def _typical_rows(key: str, k: int, dx: tuple[str, ...], _data: AtlasData) -> np.ndarray:
    """`typical_rows` of concept k among the tiles in the filter `dx`, per atlas (`key`), concept and
    filter: it sorts every member tile, 0.08 s at 10^6 tiles, which each rerun of the page repeated."""
    members = np.flatnonzero(_data.tile_mask(list(dx)) & (_data.nmf == k))
    return typical_rows(_data, k, members)


def _typical(data, k, dx: tuple[str, ...]) -> None:
    st.subheader("Most typical tiles")
    rows = _typical_rows(data.key, k, dx, data)
    if not len(rows):
        st.info("No tile in the filter has this concept as its dominant one.")
        return
    share = data.weights[rows, k] / np.maximum(data.weights[rows].sum(axis=1), 1e-12)
    caps = [f"{c} · {s:.0%} {concept_label(k)}" for c, s in zip(ui.tile_captions(data, rows), share)]
    ui.tile_gallery(data, rows, f"typical-tiles-{concept_label(k)}", key="gal_typical", width=110, captions=caps)
    st.caption(f"Tiles with the highest share of their weight in {concept_label(k)}; caption: slide · concept · "
               f"top output and its {data.out_label} · share.")


def _composition(data, k, slide_ok) -> None:
    st.subheader("Composition")
    cols = ["diagnosis"] + [c for c in data.slides.columns if c.startswith("meta.")] + \
        (["patient"] if (data.slides["patient"] != "").any() else [])
    by = state.bound(st.selectbox, "Group by", "by", default="diagnosis", options=cols,
                     format_func=lambda c: c.removeprefix("meta."))
    groups = data.slides[by].astype(str).to_numpy()
    df = pd.DataFrame({"group": groups[slide_ok], "weight": data.slide_weight[slide_ok, k],
                       "all_weight": data.slide_weight[slide_ok].sum(axis=1), "tiles": data.slide_count[slide_ok, k]})
    df = df.groupby("group", as_index=False).sum()
    df["share_of_concept"] = df["weight"] / max(df["weight"].sum(), 1e-12)
    df["expected_share"] = df["all_weight"] / max(df["all_weight"].sum(), 1e-12)
    order = df.sort_values("share_of_concept", ascending=False)["group"].tolist()
    base = alt.Chart(df, title=f"Where {concept_label(k)}'s weight lies (bar) vs all weight (tick)")
    y = alt.Y("group:N", title=by.removeprefix("meta."), sort=order)
    color = alt.Color("group:N", legend=None, scale=alt.Scale(domain=data.diagnoses, range=diagnosis_colors(
        data.diagnoses)) if by == "diagnosis" else alt.Undefined)
    bars = base.mark_bar().encode(
        y=y, x=alt.X("share_of_concept:Q", title="share of the concept's weight", axis=alt.Axis(format="%")),
        color=color, tooltip=["group", alt.Tooltip("share_of_concept:Q", format=".1%"),
                              alt.Tooltip("expected_share:Q", format=".1%"), "tiles"])
    ticks = base.mark_tick(color="black", thickness=3).encode(y=y, x="expected_share:Q")
    ui.chart((bars + ticks).properties(height=ui.rows_height(len(df))))
    ui.csv_button(df, f"composition-{concept_label(k)}-by-{by}", key="dl_comp")


def _outputs(data, k, tile_ok, members) -> None:
    st.subheader("Model outputs on its tiles")
    names = data.output_names
    o = len(names)
    all_rows = tile_ok
    cnt_k = np.bincount(data.top[members], minlength=o)
    cnt_all = np.bincount(data.top[all_rows], minlength=o)
    df = pd.DataFrame({"output": names * 2,
                       "share": np.r_[cnt_k / max(cnt_k.sum(), 1), cnt_all / max(cnt_all.sum(), 1)],
                       "tiles": np.r_[cnt_k, cnt_all],
                       "set": [concept_label(k)] * o + ["all tiles"] * o})
    df = df[df.groupby("output")["tiles"].transform("sum") > 0]
    ch = alt.Chart(df, title="Top predicted output (share of tiles)").mark_bar().encode(
        x=alt.X("output:N", sort="-y", title=None), xOffset="set:N",
        y=alt.Y("share:Q", axis=alt.Axis(format="%"), title="share of tiles"),
        color=alt.Color("set:N", scale=alt.Scale(domain=[concept_label(k), "all tiles"],
                                                 range=[concept_color(k), "#bbbbbb"]), title=None),
        tooltip=["output", "set", "tiles", alt.Tooltip("share:Q", format=".1%")]).properties(height=360)
    ui.chart(ch)
    ui.csv_button(df, f"top-output-{concept_label(k)}", key="dl_top_out")
    j = state.bound(st.selectbox, "Distribution of one output", "output", default=data.default_output,
                    options=list(range(o)), parse=int, format_func=lambda i: names[i])
    lo, hi = (0.0, 1.0) if data.out_kind == "probs" else (float(data.out[:, j].min()), float(data.out[:, j].max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1, 21)
    hk = np.histogram(data.out[members, j], edges)[0]
    ha = np.histogram(data.out[all_rows, j], edges)[0]
    hist = pd.DataFrame({"from": np.r_[edges[:-1], edges[:-1]], "to": np.r_[edges[1:], edges[1:]],
                         "share": np.r_[hk / max(hk.sum(), 1), ha / max(ha.sum(), 1)],
                         "tiles": np.r_[hk, ha], "set": [concept_label(k)] * 20 + ["all tiles"] * 20})
    ch = alt.Chart(hist, title=f"{names[j]} {data.out_label} on {concept_label(k)} tiles vs all").mark_bar(
        opacity=0.65, binSpacing=0).encode(
        x=alt.X("from:Q", bin="binned", title=f"{names[j]} ({data.out_label})"), x2="to:Q",
        y=alt.Y("share:Q", stack=None, axis=alt.Axis(format="%"), title="share of tiles"),
        color=alt.Color("set:N", scale=alt.Scale(domain=[concept_label(k), "all tiles"],
                                                 range=[concept_color(k), "#999999"]), title=None),
        tooltip=["set", "tiles", alt.Tooltip("from:Q", format=".2f"), alt.Tooltip("to:Q", format=".2f")],
    ).properties(height=300)
    ui.chart(ch)
    ui.csv_button(hist, f"{names[j]}-histogram-{concept_label(k)}", key="dl_hist")



def _prevalence(data, k, slide_ok) -> None:
    st.subheader("Prevalence per slide")
    shares = slide_shares(data.slide_weight)[:, k]
    has = data.slide_weight.sum(axis=1) > 0
    idx = np.flatnonzero(slide_ok & has)
    df = pd.DataFrame({"slide_id": data.slide_ids()[idx], "diagnosis": data.slides["diagnosis"].to_numpy()[idx],
                       "share": shares[idx], "tiles_dominant": data.slide_count[idx, k],
                       "tiles": data.slides["n_tiles"].to_numpy()[idx]}).sort_values("share", ascending=False)
    shown = df.head(N_SLIDES_SHOWN)
    pick = alt.selection_point(name="open", fields=["slide_id"], on="click")
    ch = alt.Chart(shown, title=f"Share of each slide's weight in {concept_label(k)} — click a bar to open the slide"
                   ).mark_bar().encode(
        y=alt.Y("slide_id:N", sort="-x", title=None),
        x=alt.X("share:Q", axis=alt.Axis(format="%"), title=f"share of slide weight in {concept_label(k)}"),
        color=alt.Color("diagnosis:N", scale=alt.Scale(domain=data.diagnoses, range=diagnosis_colors(data.diagnoses))),
        tooltip=["slide_id", "diagnosis", alt.Tooltip("share:Q", format=".1%"), "tiles_dominant", "tiles"],
    ).add_params(pick).properties(height=ui.rows_height(len(shown), per=26))
    ui.chart(ch, on_select=_open_slide, selection_mode="open", key="prevalence_bars")
    if len(df) > N_SLIDES_SHOWN:
        st.caption(f"Top {N_SLIDES_SHOWN} of {len(df)} slides; the CSV has all of them.")
    ui.csv_button(df, f"prevalence-{concept_label(k)}", key="dl_prev")


def _open_slide() -> None:
    sel = st.session_state.get("prevalence_bars", {}).get("selection", {}).get("open") or []
    if sel and "slide_id" in sel[0]:
        state.go(page="slides", slide=str(sel[0]["slide_id"]))


def _distances(data, k) -> None:
    st.subheader("Distance to the other concepts")
    c = data.clusters
    if "distances" not in c:
        st.info("This atlas stores no concept distances.")
        return
    labels = [concept_label(j) for j in range(data.k)]
    df = pd.DataFrame({"concept": labels, "euclidean": c["distances"][k],
                       "cosine_similarity": c["cosine_similarity"][k]}).drop(index=k)
    ch = ui.bar(df, "concept", "euclidean", color="concept", scale=ui.concept_scale(data.k), sort="y", height=300,
                title=f"Euclidean distance between prototype rows of H ({concept_label(k)} to others)",
                tooltip=["concept", alt.Tooltip("euclidean:Q", format=".3g"),
                         alt.Tooltip("cosine_similarity:Q", format=".3f")])
    ui.chart(ch)
    cos = c["cosine_similarity"]
    dist = c["distances"]
    grid = pd.DataFrame([(labels[i], labels[j], float(cos[i, j]), float(dist[i, j]))
                         for i in range(data.k) for j in range(data.k)],
                        columns=["concept", "other", "cosine", "euclidean"])
    heat = alt.Chart(grid, title="Cosine similarity of all concept prototypes (rows of H)").mark_rect().encode(
        x=alt.X("other:N", sort=labels, title=None), y=alt.Y("concept:N", sort=labels, title=None),
        color=alt.Color("cosine:Q", scale=alt.Scale(scheme="blues", domain=[0, 1])),
        tooltip=["concept", "other", alt.Tooltip("cosine:Q", format=".3f")])
    text = alt.Chart(grid).mark_text(fontSize=13).encode(
        x=alt.X("other:N", sort=labels), y=alt.Y("concept:N", sort=labels), text=alt.Text("cosine:Q", format=".2f"),
        color=alt.condition("datum.cosine > 0.6", alt.value("white"), alt.value("black")))
    ui.chart((heat + text).properties(height=ui.rows_height(data.k, extra=80)))
    ui.csv_button(grid, "concept-distances", key="dl_dist", label="CSV (all pairs)")
