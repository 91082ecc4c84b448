"""Fidelity: how much of the model's behaviour do the concepts explain?

Everything here comes from `precompute.report.report_dict` (cached per atlas file, see
dashboard/fidelity.py): the explained output and how it was chosen; R² of a linear regression of
that output's target (log-odds, logit or contrast) on the per-tile concept weights, in-sample and cross-validated with the
tiles of one patient (or slide) kept together; the coefficient and effect per standard deviation of
each concept; GradCAM agreement per concept (when the run computed GradCAM); and the K grid.

These are whole-atlas numbers, as the run computed them: the diagnosis filter does not apply here.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from .. import ui
from ..data import AtlasData
from ..fidelity import (AGREEMENT_MEASURES, DOWN, GRID_MEASURES, NOT_COMPUTED_CAM, UP, FidelityError, agreement_long,
                        cam_long, cam_table, concept_table, cv_band, fmt, grid_long, grid_table, how_chosen,
                        regression_table, report)
from ..labels import concept_label

TARGET_HELP = ("What of the output is explained: log-odds (one-vs-rest log(p / (1 - p))), logit (raw score) or "
               "contrast (logit minus the mean of the other logits). Chosen with --target when the atlas was computed.")
METHOD_COLORS = alt.Scale(domain=["NMF", "k-means"], range=["#333333", "#999999"])

INTRO = (
    "Before a team trusts the concepts, this page asks how much of the model's behaviour they account for. "
    "The model's score for one output is compared, tile by tile, with how much of each concept the tile "
    "contains. If the concepts together predict the score well, they are a fair summary of what the model "
    "reacts to; if they do not, the model relies on things the concepts do not capture.")

HELP = """
- **Explained output**: the model output whose behaviour is explained (for example a tumour class).
- **Target**: which score of that output is explained. *log-odds*: log(p / (1 - p)), the one-vs-rest
  odds of the class (default for softmax heads); *logit*: the raw score before it becomes a
  probability (default for sigmoid heads; for a softmax head it has a free offset, so it can be
  negative even when the class wins); *contrast*: the logit minus the mean of the other logits.
- **R²** (0 to 1): the part of the tile-to-tile variation of that score that the concept weights
  account for. 0.70 means the concepts explain 70 % of it; 1 would be a perfect explanation.
- **In-sample R²** is measured on the same tiles the fit was made on, so it flatters.
  **Cross-validated R²** is measured on patients (or slides) left out of the fit: it is the number to
  trust. Below 0 means the concepts predict new patients worse than a constant guess.
- **Coefficient**: how much the score changes per unit of a concept's weight in a tile, other
  concepts held equal. Positive: the concept *pushes the prediction up*; negative: *down*.
  **Effect per SD** multiplies it by the usual spread of that concept's weight over tiles, so concepts
  can be compared with each other.
- **GradCAM r**: within each tile, how well the concept's map lines up with the GradCAM heat map
  (where the model looks for this output), from -1 to 1. Near 0: no relation; positive: the concept
  sits where the model looks. Shown over all tiles and over the tiles the model calls positive.
- **K grid**: the same analysis for other numbers of concepts (K), and for k-means clusters instead of
  NMF concepts, on the run's calibration sample. Lower reconstruction error = the concepts describe
  the layer's activations more completely; higher R² = they explain the output better.
"""


def render(data: AtlasData, diagnoses: list[str]) -> None:
    st.header("Fidelity: how much of the model's behaviour do the concepts explain?")
    if data.k == 0:
        st.info("This atlas has no concepts.")
        return
    try:
        rep = report(data)
    except FidelityError as exc:
        st.error(f"**The fidelity statistics cannot be computed for this atlas.** {exc}")
        return
    st.markdown(INTRO)
    with st.expander("How to read this page"):
        st.markdown(HELP)
    if rep["source"] == "computed":
        st.info("**Computed on the fly.** This atlas stores no fidelity results (the run computes them only when "
                "it knows which output to explain), so the regression below was computed now from the atlas's "
                "tiles. GradCAM and the K grid need the run itself: re-run `python -m precompute run` with "
                "`--explain NAME --gradcam`.",
                icon=":material/info:")
    else:
        st.caption("Stored by the run that computed this atlas.")
    if diagnoses:
        st.caption("The diagnosis filter does not apply on this page: these numbers cover every tile of the atlas.")

    _output(data, rep)
    _regression(rep)
    _coefficients(data, rep)
    _importance(data, rep)
    _gradcam(data, rep)
    _k_grid(rep)


def _output(data: AtlasData, rep: dict) -> None:
    st.subheader("Explained output")
    out = rep["output"]
    c = st.columns(4)
    c[0].metric("Explained output", out["name"], help="The model output whose score the concepts are asked to explain.")
    c[1].metric("Target", rep.get("target", "logit"), help=TARGET_HELP)
    c[2].metric("Output index", out["index"], help="0-based column of the model's outputs.")
    thr = rep["threshold"]
    c[3].metric("Positive tiles", f"probability ≥ {thr:g}" if thr is not None else "–",
                help="A tile counts as positive (for the GradCAM figures) when the model's probability for the "
                     "explained output is at least this.")
    st.markdown(how_chosen(rep, data.attrs))
    st.markdown(f"The regression, GradCAM and the importance explain **{rep.get('target_text', out['name'])}**.")


def _regression(rep: dict) -> None:
    st.subheader("How much of the output the concepts explain")
    reg = rep["regression"]
    grouping = rep["grouping"]
    c = st.columns(4)
    c[0].metric("R² in-sample", fmt(reg["r2"]),
                help="Fit and measured on the same tiles: an upper bound of what the concepts explain.")
    c[1].metric("R² cross-validated", fmt(reg["r2_cv"]),
                help=f"Measured on {grouping}s left out of the fit: what to expect on new {grouping}s.")
    c[2].metric("Folds", reg["n_folds"] or "–",
                help=f"Cross-validation rounds; all tiles of one {grouping} stay in the same round.")
    c[3].metric(f"{grouping.capitalize()}s", fmt(reg["n_groups"], "d"),
                help=f"Groups in the cross-validation: tiles of one {grouping} are never split between fit and test.")
    if reg.get("r2_cv_median") is not None:
        st.metric(f"R² cross-validated, median of {reg.get('n_repeats', '')} shuffles", fmt(reg["r2_cv_median"]),
                  cv_band(reg), delta_color="off", delta_arrow="off",
                  help=f"The cross-validation repeated with whole {grouping}s dealt to folds at random: the median "
                       f"and the 5–95 % band show how much one assignment of {grouping}s to folds can change it.")
    r2, r2_cv = reg["r2"], reg["r2_cv"]
    words = []
    if r2 is not None:
        words.append(f"On the tiles the fit was made on, the concepts account for **{r2:.0%}** of the variation "
                     f"of the {rep['output']['name']} score.")
    if r2_cv is not None:
        if r2_cv < 0:
            words.append(f"On {grouping}s left out of the fit, they predict it **worse than a constant guess** "
                         f"(R² {r2_cv:.3f}): the concepts do not carry over to new {grouping}s.")
        else:
            words.append(f"On {grouping}s left out of the fit: **{r2_cv:.0%}** ({reg['n_folds']} folds, tiles of one "
                         f"{grouping} kept together, {reg['n_groups']} {grouping}s).")
    st.markdown(" ".join(words))
    if reg["note"]:
        st.warning(f"**Cross-validated R² not available or undefined:** {reg['note']}. The in-sample R² alone can "
                   "overstate how well the concepts explain the model on new slides.")
    st.caption(f"{reg['n_tiles']:,} tiles; intercept {fmt(reg['intercept'], '+.4g')}; NMF relative reconstruction "
               f"error of this atlas's concepts {fmt(rep['nmf_relative_error'])}.")
    table = regression_table(rep)
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "output_index": st.column_config.NumberColumn("output index"),
        "threshold": st.column_config.NumberColumn("positive threshold"),
        "n_folds": st.column_config.NumberColumn("folds"),
        "n_groups": st.column_config.NumberColumn("groups"),
        "n_tiles": st.column_config.NumberColumn("tiles"),
        "nmf_relative_error": st.column_config.NumberColumn("NMF relative error", format="%.4f"),
        "r2_in_sample": st.column_config.NumberColumn("R² in-sample", format="%.4f"),
        "r2_cross_validated": st.column_config.NumberColumn("R² cross-validated", format="%.4f"),
        "intercept": st.column_config.NumberColumn("intercept", format="%.4g")})
    ui.csv_button(table, "fidelity-regression", key="dl_fid_reg")


def _coef_chart(df: pd.DataFrame, field: str, k: int, title: str, axis: str) -> alt.LayerChart:
    labels = [concept_label(j) for j in range(k)]
    values = pd.to_numeric(df[field], errors="coerce").abs()
    half = float(values.max()) * 1.45 if values.notna().any() and values.max() > 0 else 1.0
    base = alt.Chart(df, title=title)
    bars = base.mark_bar().encode(
        y=alt.Y("concept:N", sort=labels, title=None),
        x=alt.X(f"{field}:Q", title=axis, scale=alt.Scale(domain=[-half, half])),
        color=alt.Color("concept:N", scale=ui.concept_scale(k), legend=None),
        tooltip=["concept", alt.Tooltip("coef:Q", format="+.4g", title="coefficient"),
                 alt.Tooltip("effect_per_sd:Q", format="+.3f", title="effect per SD"), "direction",
                 alt.Tooltip("tiles:Q", title="tiles where it dominates")])
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="black", strokeWidth=2).encode(x="x:Q")
    y = alt.Y("concept:N", sort=labels)
    up = base.transform_filter(f"datum.{field} > 0").mark_text(align="left", dx=5, fontSize=13).encode(
        y=y, x=f"{field}:Q", text=alt.value("▲ up"), color=alt.value("#333"))
    down = base.transform_filter(f"datum.{field} < 0").mark_text(align="right", dx=-5, fontSize=13).encode(
        y=y, x=f"{field}:Q", text=alt.value("▼ down"), color=alt.value("#333"))
    text = up + down
    return (bars + zero + text).properties(height=ui.rows_height(k))


@st.cache_data(max_entries=16, show_spinner=False)
def _coef_spec(df: pd.DataFrame, field: str, k: int, title: str, axis: str) -> dict:
    """Styled Vega-Lite spec of `_coef_chart`, per table (it holds every concept's current name, so a
    renamed concept is not served stale), field and titles: Altair took 0.1 s per chart on every visit."""
    return ui.styled(_coef_chart(df, field, k, title, axis)).to_dict()


def _coefficients(data: AtlasData, rep: dict) -> None:
    st.subheader("Which concepts push the prediction up or down")
    df = concept_table(rep)
    name = rep["output"]["name"]
    left, right = st.columns(2)
    with left:
        title = f"Regression coefficient per concept ({name} {rep.get('target', 'logit')})"
        ui.ready_chart(_coef_spec(df, "coef", data.k, title, "← down · coefficient · up →"), title)
    with right:
        title = "Effect per standard deviation of the concept's weight"
        ui.ready_chart(_coef_spec(df, "effect_per_sd", data.k, title, "← down · effect per SD · up →"), title)
    up = [r.concept for r in df.itertuples() if r.direction == UP]
    down = [r.concept for r in df.itertuples() if r.direction == DOWN]
    st.markdown(f"Bars to the right: more of the concept in a tile raises the {name} score "
                f"({', '.join(up) or 'none'}); to the left: it lowers it ({', '.join(down) or 'none'}). "
                "The effect per SD compares concepts on the same footing: the change of the score when a tile "
                "holds one usual spread more of that concept. Each coefficient is the effect with the other concepts "
                "held equal; when concepts tend to occur together, single coefficients are less reliable than R².")
    st.dataframe(df, hide_index=True, width="stretch", column_config={
        "share_of_tiles": st.column_config.NumberColumn("share of tiles", format="percent"),
        "tiles": st.column_config.NumberColumn("tiles where it dominates"),
        "coef": st.column_config.NumberColumn("coefficient", format="%+.4g"),
        "effect_per_sd": st.column_config.NumberColumn("effect per SD", format="%+.3f")})
    ui.csv_button(df, f"fidelity-coefficients-{name}", key="dl_fid_coef")


def _gradcam(data: AtlasData, rep: dict) -> None:
    st.subheader("Does the model look where the concepts are? (GradCAM)")
    if not rep["gradcam"]:
        st.info(f"{NOT_COMPUTED_CAM} (with `--explain NAME`) to see, per concept, how its map lines up with where "
                "the model looks.", icon=":material/info:")
        return
    _agreement(data, rep)
    long = cam_long(rep)
    labels = [concept_label(j) for j in range(data.k)]
    base = alt.Chart(long, title="GradCAM r per concept: mean ± standard deviation over tiles "
                     f"({rep['output']['name']})")
    y = alt.Y("concept:N", sort=labels, title=None)
    tip = ["concept", "tiles", alt.Tooltip("mean:Q", format="+.3f", title="mean r"),
           alt.Tooltip("std:Q", format=".3f", title="std"), alt.Tooltip("n:Q", title="tiles with a defined r")]
    bars = base.mark_bar().encode(
        y=y, yOffset=alt.YOffset("tiles:N", sort=["all tiles", "positive tiles"]),
        x=alt.X("mean:Q", title="GradCAM r (-1 to 1)", scale=alt.Scale(domain=[-1, 1])),
        color=alt.Color("concept:N", scale=ui.concept_scale(data.k), legend=None),
        opacity=alt.Opacity("tiles:N", scale=alt.Scale(domain=["all tiles", "positive tiles"], range=[1.0, 0.45]),
                            title=None, legend=alt.Legend(orient="top")),
        tooltip=tip)
    errors = base.mark_rule(color="black", strokeWidth=2).encode(
        y=y, yOffset=alt.YOffset("tiles:N", sort=["all tiles", "positive tiles"]), x="lo:Q", x2="hi:Q", tooltip=tip)
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="black").encode(x="x:Q")
    ui.chart((bars + errors + zero).properties(height=ui.rows_height(data.k, per=56, extra=170)))
    thr = rep["threshold"]
    st.caption("Per tile, Pearson r between the concept's weight map and the GradCAM map of the explained output; "
               "the bar is the mean over tiles, the black line ± one standard deviation. Positive tiles: the model's "
               f"probability for {rep['output']['name']} is at least {fmt(thr, 'g')}. Tiles where a map is flat "
               "(e.g. the concept is absent) have no r and are left out (column n).")
    table = cam_table(rep)
    missing = [r.concept for r in table.itertuples() if r.r_mean_positive is None or pd.isna(r.r_mean_positive)]
    if missing:
        st.caption(f"No positive tile with a defined r for: {', '.join(missing)}.")
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "r_mean_all": st.column_config.NumberColumn("r, all tiles (mean)", format="%+.3f"),
        "r_std_all": st.column_config.NumberColumn("std", format="%.3f"),
        "n_all": st.column_config.NumberColumn("n"),
        "r_mean_positive": st.column_config.NumberColumn("r, positive tiles (mean)", format="%+.3f"),
        "r_std_positive": st.column_config.NumberColumn("std", format="%.3f"),
        "n_positive": st.column_config.NumberColumn("n positive")})
    ui.csv_button(table, f"fidelity-gradcam-{rep['output']['name']}", key="dl_fid_cam")


def _importance(data: AtlasData, rep: dict) -> None:
    """Concept importance by removal (--importance), beside the regression coefficients."""
    imp = rep.get("importance") or {}
    if not imp:
        return
    st.subheader("What happens when a concept is removed (importance by intervention)")
    labels = [concept_label(j) for j in range(data.k)]
    df = pd.DataFrame([{"concept": concept_label(c["cluster"] - 1), "importance": c.get("importance"),
                        "lo": c.get("importance_lo"), "hi": c.get("importance_hi"), "coef": c.get("coef")}
                       for c in rep["clusters"]])
    base = alt.Chart(df.dropna(subset=["importance"]), title=f"Drop of the {rep.get('target', 'logit')} when the "
                     "concept is removed (mean, 95 % interval)")
    y = alt.Y("concept:N", sort=labels, title=None)
    tip = ["concept", alt.Tooltip("importance:Q", format="+.3f"), alt.Tooltip("lo:Q", format="+.3f"),
           alt.Tooltip("hi:Q", format="+.3f"), alt.Tooltip("coef:Q", format="+.4g", title="regression coefficient")]
    bars = base.mark_bar().encode(y=y, x=alt.X("importance:Q", title="← lowers · drop of the target · supports →"),
                                  color=alt.Color("concept:N", scale=ui.concept_scale(data.k), legend=None),
                                  tooltip=tip)
    ci = base.mark_rule(color="black", strokeWidth=2).encode(y=y, x="lo:Q", x2="hi:Q", tooltip=tip)
    curve = pd.DataFrame({"removed": list(range(len(imp["deletion"][0]))), "target": imp["deletion"][0]})
    left, right = st.columns(2)
    with left:
        ui.chart((bars + ci).properties(height=ui.rows_height(data.k)))
    with right:
        ui.chart(alt.Chart(curve, title="Deletion curve: concepts removed, most important first").mark_line(
            point=True, strokeWidth=3, color="#333").encode(
            x=alt.X("removed:Q", title="concepts removed", axis=alt.Axis(format="d")),
            y=alt.Y("target:Q", title=f"mean {rep.get('target', 'logit')}", scale=alt.Scale(zero=False)),
            tooltip=["removed", alt.Tooltip("target:Q", format="+.3f")]).properties(height=ui.rows_height(data.k)))
    st.caption("Each concept's part of the hooked layer's activations is taken out of every cell and the rest of "
               "the network runs on what is left: the bar is how much the explained score drops on average (a "
               "causal measure, unlike the coefficients above). Intervals: bootstrap over "
               f"{imp.get('unit')}s. The curve removes each tile's concepts one by one, most important first.")
    ui.csv_button(df, f"fidelity-importance-{rep['output']['name']}", key="dl_fid_imp")


def _agreement(data: AtlasData, rep: dict) -> None:
    """Pooled r with 95 % bootstrap intervals, and the counts of tiles used for per-tile r."""
    a = rep.get("agreement") or {}
    long = agreement_long(rep)
    if not a or long.empty:
        return
    labels = [concept_label(j) for j in range(data.k)]
    order = list(AGREEMENT_MEASURES.values())
    base = alt.Chart(long.dropna(subset=["r"]), title=f"Agreement with GradCAM of the {rep.get('target', 'logit')} "
                     "(Pearson r, 95 % interval)")
    y = alt.Y("concept:N", sort=labels, title=None)
    off = alt.YOffset("measure:N", sort=order)
    tip = ["concept", "measure", alt.Tooltip("r:Q", format="+.3f"), alt.Tooltip("lo:Q", format="+.3f"),
           alt.Tooltip("hi:Q", format="+.3f")]
    dots = base.mark_point(filled=True, size=70).encode(
        y=y, yOffset=off, x=alt.X("r:Q", title="r (-1 to 1)", scale=alt.Scale(domain=[-1, 1])),
        shape=alt.Shape("measure:N", sort=order, title=None, legend=alt.Legend(orient="top", columns=2)),
        color=alt.Color("concept:N", scale=ui.concept_scale(data.k), legend=None), tooltip=tip)
    bars = base.mark_rule(color="black").encode(y=y, yOffset=off, x="lo:Q", x2="hi:Q", tooltip=tip)
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="black").encode(x="x:Q")
    ui.chart((bars + dots + zero).properties(height=ui.rows_height(data.k, per=70, extra=170)))
    st.caption(f"Pooled: one r over the {a.get('n_cells')} tissue cells of the cohort (and over the "
               f"{a.get('n_pos_cells')} cells of the {a.get('n_pos_tiles')} positive tiles). Per-tile r only on "
               f"tiles whose GradCAM is non-zero on at least {a.get('min_cam_cells')} cells: "
               f"{a.get('n_tiles_used')} of {a.get('n_tiles')} tiles used, {a.get('n_tiles_excluded')} excluded. "
               f"Intervals: bootstrap over {a.get('n_units')} {a.get('unit')}s ({a.get('n_boot')} draws).")
    ui.csv_button(long, f"fidelity-agreement-{rep['output']['name']}", key="dl_fid_agree")


def _k_grid(rep: dict) -> None:
    st.subheader("Was K a good choice? (K grid)")
    if not rep["k_grid"]:
        hint = ("the run computes it when it is told which output to explain (`--explain NAME`; `--k-grid` sets "
                "the K values)")
        st.info(f"No K grid is stored in this atlas: {hint}.", icon=":material/info:")
        return
    long = grid_long(rep)
    k = rep["k"]
    mark = alt.Chart(pd.DataFrame({"k": [k], "label": [f"this atlas (K = {k})"]}))
    rule = mark.mark_rule(color="#d62728", strokeDash=[6, 4], strokeWidth=2).encode(x="k:Q")
    label = mark.mark_text(color="#d62728", align="left", dx=4, dy=-6, fontSize=13).encode(
        x="k:Q", y=alt.value(8), text="label:N")
    ks = sorted({int(r["k"]) for r in rep["k_grid"]} | {k})
    xk = alt.X("k:Q", title="K (number of concepts / clusters)", axis=alt.Axis(values=ks, format="d"),
               scale=alt.Scale(domain=[min(ks), max(ks)], nice=False))
    tip = ["method", "measure", "k", alt.Tooltip("value:Q", format=".3f")]
    err = long[long["measure"] == "reconstruction error"]
    r2 = long[long["measure"] != "reconstruction error"]
    left, right = st.columns(2)
    with left:
        lines = alt.Chart(err, title="Reconstruction error (lower = the concepts describe the layer better)"
                          ).mark_line(point=True, strokeWidth=3).encode(
            x=xk, y=alt.Y("value:Q", title="relative error", scale=alt.Scale(zero=False)),
            color=alt.Color("method:N", scale=METHOD_COLORS, title=None, legend=alt.Legend(orient="top")),
            tooltip=tip)
        ui.chart((lines + rule + label).properties(height=340))
    with right:
        r2 = r2.assign(series=r2["method"] + ", " + r2["measure"].str.replace("R² ", ""))
        series = [f"{m}, {s}" for m in ("NMF", "k-means") for s in ("in-sample", "cross-validated")]
        lines = alt.Chart(r2, title="R² of the output (higher = the concepts explain it better)").mark_line(
            point=True, strokeWidth=3).encode(
            x=xk, y=alt.Y("value:Q", title="R²"),
            color=alt.Color("series:N", title=None, legend=alt.Legend(orient="top", symbolType="stroke",
                                                                      symbolStrokeWidth=3, columns=2),
                            scale=alt.Scale(domain=series, range=["#333333", "#333333", "#999999", "#999999"])),
            strokeDash=alt.StrokeDash("series:N", title=None, scale=alt.Scale(domain=series,
                                                                              range=[[1, 0], [6, 3], [1, 0], [6, 3]])),
            tooltip=tip)
        ui.chart((lines + rule + label).properties(height=360))
    info = rep.get("k_grid_info") or {}
    where = f" ({info['n_cells']:,} cells of {info['n_tiles']:,} whole tiles)" if info.get("n_cells") else ""
    st.caption(f"Computed by the run on its calibration cells{where}, for each K: NMF concepts against k-means "
               "clusters fitted on the same cells. Tile features: NMF, the summed cell weights; k-means, the number "
               "of the tile's cells in each cluster (as in the method's paper). Cross-validated R²: median over "
               "random assignments of whole groups to folds. A K past which the cross-validated R² stops rising "
               "explains the model about as well with fewer, easier-to-review concepts.")
    table = grid_table(rep)
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "k": st.column_config.NumberColumn("K"),
        **{key: st.column_config.NumberColumn(f"{method} {measure.replace('reconstruction ', 'relative ')}",
                                              format="%.3f")
           for key, (method, measure) in GRID_MEASURES.items()},
        "this_atlas": st.column_config.CheckboxColumn("this atlas")})
    ui.csv_button(table, "fidelity-k-grid", key="dl_fid_grid")
