"""Diagnosis enrichment: rank concepts by how much more of the weight they hold on slides of one
diagnosis than on the others, with slide-level counts so that one slide cannot dominate unnoticed.
Computed over the slides in the diagnosis filter (see dashboard/enrichment.py for the definitions).
"""

from __future__ import annotations

import html

import altair as alt
import streamlit as st

from .. import state, ui
from ..colors import concept_label
from ..data import AtlasData
from ..enrichment import by_diagnosis, enrichment_table

DOMINANCE = 0.5  # flag a concept when one slide holds more than this part of its target weight


def render(data: AtlasData, diagnoses: list[str]) -> None:
    st.header("Diagnosis enrichment")
    mask = data.slide_mask(diagnoses) & (data.slide_weight.sum(axis=1) > 0)
    present = [d for d in data.diagnoses if (data.slides["diagnosis"].to_numpy()[mask] == d).any()]
    if not present:
        st.info("No slide with tiles matches the diagnosis filter.")
        return
    c = st.columns([2, 3, 3])
    with c[0]:
        target = state.bound(st.selectbox, "Enriched in", "target", default=present[-1], options=present)
    with c[1]:
        pct = state.bound(st.slider, "A slide counts for a concept when the concept holds at least (% of the "
                          "slide's weight)", "min_share", default=20, parse=int, min_value=5, max_value=80, step=5)
    labels = [concept_label(j) for j in range(data.k)]
    sw, sd, ids = data.slide_weight[mask], data.slides["diagnosis"].to_numpy()[mask], data.slide_ids()[mask]
    table = enrichment_table(sw, sd, target, min_share=pct / 100, slide_ids=ids, labels=labels)
    others = [d for d in present if d != target]
    with c[2]:
        st.markdown(f"<div style='margin-top:1.9rem'><b>{html.escape(target)}</b> "
                    f"({int(table['target_slides'].iat[0])} slides) against "
                    f"{html.escape(', '.join(others) or 'nothing')} ({int(table['other_slides'].iat[0])} slides)"
                    "</div>", unsafe_allow_html=True)  # diagnoses are manifest text: never HTML
    if not others:
        st.warning("Only one diagnosis is in the filter: there is nothing to compare against. "
                   "Widen the diagnosis filter in the sidebar.")

    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "concept": st.column_config.TextColumn("concept"),
        "cluster_share_in_target": st.column_config.ProgressColumn(
            f"share of concept weight on {target}", format="percent", min_value=0, max_value=1,
            help="Part of the concept's total weight that lies on slides of the target diagnosis"),
        "expected_share": st.column_config.NumberColumn(
            "expected (all weight)", format="percent", help="The same for all concept weight: no enrichment"),
        "share_of_target_weight": st.column_config.NumberColumn(f"share of {target} weight", format="percent"),
        "share_of_other_weight": st.column_config.NumberColumn("share of other weight", format="percent"),
        "log2_enrichment": st.column_config.NumberColumn("log2 enrichment", format="%.2f"),
        "target_slides_ge": st.column_config.NumberColumn(f"{target} slides ≥ {pct}%"),
        "target_slides": st.column_config.NumberColumn(f"{target} slides"),
        "other_slides_ge": st.column_config.NumberColumn(f"other slides ≥ {pct}%"),
        "other_slides": st.column_config.NumberColumn("other slides"),
        "top_target_slide": st.column_config.TextColumn(f"largest {target} slide"),
        "top_slide_share": st.column_config.ProgressColumn(
            "its part", format="percent", min_value=0, max_value=1,
            help=f"Part of the concept's {target} weight that comes from that one slide"),
    })
    ui.csv_button(table, f"enrichment-{target}", key="dl_enrich")
    n_target = int(table["target_slides"].iat[0])
    dominated = table[table["top_slide_share"] > DOMINANCE]
    if n_target == 1:
        st.warning(f"Only one {target} slide has tiles: every {target} figure here rests on that slide.")
    elif len(dominated):
        parts = [f"{r.concept} ({r.top_slide_share:.0%} from {r.top_target_slide})" for r in dominated.itertuples()]
        st.warning(f"One slide holds most of the {target} weight of: {'; '.join(parts)}. Read these with care.")

    left, right = st.columns(2)
    with left:
        ch = alt.Chart(table, title=f"log2 enrichment in {target} (share of {target} weight / share of other weight)"
                       ).mark_bar().encode(
            y=alt.Y("concept:N", sort="-x", title=None), x=alt.X("log2_enrichment:Q", title="log2 enrichment"),
            color=alt.Color("concept:N", scale=ui.concept_scale(data.k), legend=None),
            tooltip=["concept", alt.Tooltip("log2_enrichment:Q", format=".2f"), "target_slides_ge", "other_slides_ge"],
        ).properties(height=ui.rows_height(data.k))
        ui.chart(ch)
    long = by_diagnosis(sw, sd, present, min_share=pct / 100, labels=labels)
    with right:
        long["label"] = [f"{s:.0%} · {g}/{n}" for s, g, n in
                         zip(long["share_of_diagnosis_weight"], long["slides_ge"], long["slides"])]
        base = alt.Chart(long, title=f"Share of each diagnosis' weight · slides with the concept ≥ {pct}%")
        heat = base.mark_rect().encode(
            x=alt.X("diagnosis:N", title=None), y=alt.Y("concept:N", sort=labels, title=None),
            color=alt.Color("share_of_diagnosis_weight:Q", scale=alt.Scale(scheme="greens"), title="share",
                            legend=alt.Legend(format="%")),
            tooltip=["concept", "diagnosis", alt.Tooltip("share_of_diagnosis_weight:Q", format=".1%"),
                     "slides_ge", "slides"])
        text = base.mark_text(fontSize=14).encode(x="diagnosis:N", y=alt.Y("concept:N", sort=labels), text="label:N")
        ui.chart((heat + text).properties(height=ui.rows_height(data.k)))
    ui.csv_button(long.drop(columns="label"), "concepts-by-diagnosis", key="dl_bydx")
    st.caption("Open a concept to see its slides:")
    cols = st.columns(min(data.k, 10))
    for j in range(data.k):
        cols[j % len(cols)].button(labels[j], key=f"open_{j}", on_click=state.go,
                                   kwargs={"page": "cluster", "cluster": j + 1}, width="stretch")
