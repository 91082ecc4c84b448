"""Diagnosis enrichment: rank concepts by how much more of the weight they hold on slides of one
diagnosis than on the others, with slide-level counts so that one slide cannot dominate unnoticed.
Computed over the slides in the diagnosis filter (see precompute/enrichment.py for the definitions).
"""

from __future__ import annotations

import html

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from precompute.enrichment import by_diagnosis, enrichment_table

from .. import state, ui
from ..data import AtlasData
from ..labels import concept_label

DOMINANCE = 0.5  # flag a concept when one slide holds more than this part of its target weight
DEFAULT_PCT = 20  # % of a slide's weight for the slide to count for a concept
BAR_COLOR = "#9ecae1"  # the share bars behind the ranking's percentages (dark text stays readable on it)


def render(data: AtlasData, diagnoses: list[str]) -> None:
    st.header("Diagnosis enrichment")
    present = _present(data, _mask(data, diagnoses))
    if not present:
        st.info("No slide with tiles matches the diagnosis filter.")
        return
    c = st.columns([2, 3, 3])
    with c[0]:
        target = state.bound(st.selectbox, "Enriched in", "target", default=present[-1], options=present)
    with c[1]:
        pct = state.bound(st.slider, "A slide counts for a concept when the concept holds at least (% of the "
                          "slide's weight)", "min_share", default=DEFAULT_PCT, parse=int, min_value=5, max_value=80,
                          step=5)
    labels = tuple(concept_label(j) for j in range(data.k))
    table, long, bars, heat = _figures(data.key, target, pct, tuple(diagnoses), labels, data)
    others = [d for d in present if d != target]
    with c[2]:
        st.markdown(f"<div style='margin-top:1.9rem'><b>{html.escape(target)}</b> "
                    f"({int(table['target_slides'].iat[0])} slides) against "
                    f"{html.escape(', '.join(others) or 'nothing')} ({int(table['other_slides'].iat[0])} slides)"
                    "</div>", unsafe_allow_html=True)  # diagnoses are manifest text: never HTML
    if not others:
        st.warning("Only one diagnosis is in the filter: there is nothing to compare against. "
                   "Widen the diagnosis filter in the sidebar.")

    _ranking(table, target, pct)
    _dominance_warnings(table, target)

    if len(present) <= 4:  # side by side; with more diagnoses the heatmap takes the full width
        left, right = st.columns(2)
        with left:
            _draw(bars)
        with right:
            _draw(heat)
    else:
        _draw(bars)
        _draw(heat)
    ui.csv_button(long.drop(columns="label"), "concepts-by-diagnosis", key="dl_bydx")
    st.caption("Open a concept to see its slides:")
    cols = st.columns(min(data.k, 10))
    for j in range(data.k):
        cols[j % len(cols)].button(labels[j], key=f"open_{j}", on_click=state.go,
                                   kwargs={"page": "cluster", "cluster": j + 1}, width="stretch")


def _present(data: AtlasData, mask) -> list[str]:
    """The diagnoses of the slides in `mask`, in the atlas's order."""
    dx = data.slides["diagnosis"].to_numpy()[mask]
    return [d for d in data.diagnoses if (dx == d).any()]


def _mask(data: AtlasData, diagnoses) -> np.ndarray:
    """Slides in the filter that have any weight (slides, bool)."""
    return data.slide_mask(list(diagnoses)) & (data.slide_weight.sum(axis=1) > 0)


@st.cache_data(max_entries=32, show_spinner=False)
def _figures(key: str, target: str, pct: int, dx: tuple[str, ...], labels: tuple[str, ...], _data: AtlasData):
    """(enrichment table, concept x diagnosis table, bar spec, heatmap spec) for one target, threshold and
    filter. The charts are Vega-Lite specs built and checked once (Altair took about 0.25 s per visit)."""
    data = _data
    mask = _mask(data, dx)
    present = _present(data, mask)
    sw, sd, ids = data.slide_weight[mask], data.slides["diagnosis"].to_numpy()[mask], data.slide_ids()[mask]
    labels = list(labels)
    table = enrichment_table(sw, sd, target, min_share=pct / 100, slide_ids=ids, labels=labels)
    ch = alt.Chart(table, title=f"log2 enrichment in {target} (share of {target} weight / share of other weight)"
                   ).mark_bar().encode(
        y=alt.Y("concept:N", sort="-x", title=None), x=alt.X("log2_enrichment:Q", title="log2 enrichment"),
        color=alt.Color("concept:N", scale=ui.concept_scale(data.k), legend=None),
        tooltip=["concept", alt.Tooltip("log2_enrichment:Q", format=".2f"), "target_slides_ge", "other_slides_ge"],
    ).properties(height=ui.rows_height(data.k))
    long = by_diagnosis(sw, sd, present, min_share=pct / 100, labels=labels)
    heat = _heatmap(long, labels, pct)
    return table, long, *((ui.chart_title(c), ui.styled(c).to_dict()) for c in (ch, heat))


def _draw(figure: tuple[str, dict]) -> None:
    title, spec = figure
    ui.spec_chart(spec, lambda: ui.spec_png(spec), title)


def prepare(data: AtlasData) -> None:
    """Fill the page's cache for its first view (default target and threshold, whole cohort): called at
    server start, see dashboard/warm.py."""
    present = _present(data, _mask(data, ()))
    if present:
        _figures(data.key, present[-1], DEFAULT_PCT, (), tuple(concept_label(j) for j in range(data.k)), data)


def _ranking(table, target: str, pct: int) -> None:
    """The enrichment ranking, one row per concept; the full table on request, and the CSV."""
    # Plain tables, not interactive grids: the grid took about 0.5 s of the page's first draw in the
    # browser. The ranking fits 1,400 px without scrolling: slide counts as "n of N" in one column each;
    # the other shares are in the CSV and the full table.
    share, part = f"weight on {target}", "its part"
    shown = pd.DataFrame({
        "concept": table["concept"],
        "log2 enrichment": table["log2_enrichment"],
        share: table["cluster_share_in_target"],
        f"{target} slides ≥ {pct}%": [f"{a} of {b}" for a, b in zip(table["target_slides_ge"],
                                                                   table["target_slides"])],
        f"slides of other diagnoses ≥ {pct}%": [f"{a} of {b}" for a, b in zip(table["other_slides_ge"],
                                                                             table["other_slides"])],
        f"largest {target} slide": table["top_target_slide"],
        part: table["top_slide_share"],
    })
    st.table(shown.style.hide(axis="index").format({"log2 enrichment": "{:.2f}", share: "{:.0%}", part: "{:.0%}"},
                                                   na_rep="–")
             .bar(subset=[share, part], vmin=0, vmax=1, color=BAR_COLOR))
    st.caption(f"{share}: part of the concept's total weight that lies on {target} slides. {part}: part of the "
               f"concept's {target} weight that comes from the largest {target} slide.")
    # drawn only when asked for: even closed in an expander it cost the page 0.3 s in the browser
    if st.toggle("Show all columns (expected share, shares of target and other weight)", key="enrich_all"):
        st.table(table.round(3).style.hide(axis="index"))
    ui.csv_button(table, f"enrichment-{target}", key="dl_enrich")


def _dominance_warnings(table, target: str) -> None:
    """Warn when the target figures rest on one slide, overall or for some concepts."""
    n_target = int(table["target_slides"].iat[0])
    dominated = table[table["top_slide_share"] > DOMINANCE]
    if n_target == 1:
        st.warning(f"Only one {target} slide has tiles: every {target} figure here rests on that slide.")
    elif len(dominated):
        parts = [f"{r.concept} ({r.top_slide_share:.0%} from {r.top_target_slide})" for r in dominated.itertuples()]
        st.warning(f"One slide holds most of the {target} weight of: {'; '.join(parts)}. Read these with care.")


def _heatmap(long, labels: list[str], pct: int):
    """Concept x diagnosis: share of the diagnosis' weight (colour, first text line) and slides with the
    concept >= pct % (second line); names horizontal or slanted, never overlapping."""
    long["label"] = [f"{s:.0%}\n{g}/{n}" for s, g, n in
                     zip(long["share_of_diagnosis_weight"], long["slides_ge"], long["slides"])]
    many = long["diagnosis"].nunique() > 4
    base = alt.Chart(long, title=f"Share of each diagnosis' weight · slides with the concept ≥ {pct}%")
    x = alt.X("diagnosis:N", title=None, axis=alt.Axis(labelAngle=-30 if many else 0, labelLimit=220))
    heat = base.mark_rect().encode(
        x=x, y=alt.Y("concept:N", sort=labels, title=None),
        color=alt.Color("share_of_diagnosis_weight:Q", scale=alt.Scale(scheme="greens"), title="share",
                        legend=alt.Legend(format="%")),
        tooltip=["concept", "diagnosis", alt.Tooltip("share_of_diagnosis_weight:Q", format=".1%"),
                 "slides_ge", "slides"])
    text = base.mark_text(fontSize=15, lineBreak="\n").encode(
        x="diagnosis:N", y=alt.Y("concept:N", sort=labels), text="label:N",
        color=alt.condition("datum.share_of_diagnosis_weight > 0.5", alt.value("white"), alt.value("black")))
    return (heat + text).properties(height=ui.rows_height(len(labels), per=52))
