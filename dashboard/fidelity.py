"""Fidelity numbers for the dashboard: `precompute.report.report_dict` cached per atlas file, and the
tables the Fidelity page and the concept drill-down draw from it (pure functions, no Streamlit
widgets).

report_dict reads the atlas's `fidelity` group when the run stored one (source "atlas"), else it
computes the output regression from the tile table (source "computed"); see precompute/report.py.
It imports neither torch nor scikit-learn (the computed regression is numpy: precompute/regression.py).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from precompute.cellmask import EDGE_BELOW, GLASS_BELOW, concept_tissue_flags
from precompute.explained import DEFAULT_TEXT
from precompute.report import report_dict
from precompute.store import Atlas

from .data import AtlasData, file_key
from .labels import concept_label

UP, DOWN, NONE = "pushes the prediction up", "pushes the prediction down", "no effect"
NOT_COMPUTED_CAM = "GradCAM was not computed: re-run with --gradcam"

__all__ = ["UP", "DOWN", "NONE", "NOT_COMPUTED_CAM", "FidelityError", "report", "direction", "how_chosen",
           "regression_table", "concept_table", "cam_table", "cam_long", "grid_table", "grid_long", "fmt",
           "fmt_cam", "agreement_long", "cv_band", "glass_flags", "glass_warning"]


class FidelityError(RuntimeError):
    """The fidelity numbers cannot be read or computed for this atlas (message says why)."""


@st.cache_data(max_entries=4, show_spinner="Reading the fidelity statistics…")
def _report(key: str) -> dict[str, Any]:
    return report_dict(key.split("|")[0])


def report(data: AtlasData) -> dict[str, Any]:
    """report_dict of the atlas behind `data`, cached by path + modification time + size.

    Raises FidelityError when it cannot be produced (e.g. fewer than 2 tiles, NaN outputs)."""
    key = data.key or file_key(data.path)
    try:
        return _report(key)
    except (ValueError, KeyError, OSError, IndexError) as exc:
        raise FidelityError(f"{type(exc).__name__}: {exc}") from exc


@st.cache_data(max_entries=4, show_spinner=False)
def _glass(key: str, k: int) -> list[dict[str, Any]]:
    with Atlas(key.split("|")[0]) as atlas:
        return concept_tissue_flags((atlas.slide_map(i, "concept_cells") for i in range(atlas.n_slides)), k)


def glass_flags(data: AtlasData) -> list[dict[str, Any]]:
    """Per concept: its map cells on tissue, edges and glass before glass was blanked, and `flag` when most
    sit on glass or edges (precompute/cellmask.py). Cells are 0 for atlases written before the masking."""
    return _glass(data.key or file_key(data.path), data.k)


def glass_warning(row: dict[str, Any]) -> str:
    """Plain-words warning for a flagged concept, '' otherwise."""
    if not row.get("flag"):
        return ""
    return (f"**Mostly on glass or tissue edges:** {row['glass_share']:.0%} of this concept's map cells had under "
            f"{GLASS_BELOW:.0%} tissue and {row['edge_share']:.0%} under {EDGE_BELOW:.0%}. It may describe the "
            "slide background or the tissue border more than tissue; the maps leave glass cells uncoloured.")


# -- wording -------------------------------------------------------------------------------------
def direction(coef: float | None) -> str:
    """Plain-words sign of a regression coefficient."""
    if coef is None or not np.isfinite(coef) or coef == 0:
        return NONE
    return UP if coef > 0 else DOWN


def fmt(value: Any, spec: str = ".3f") -> str:
    """A number for display; an en dash where it is undefined (None / NaN)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, spec)


def fmt_cam(mean: Any, std: Any) -> str:
    """'+0.10 ± 0.21' (GradCAM r), or an en dash when undefined."""
    if mean is None:
        return "–"
    return f"{mean:+.2f} ± {fmt(std, '.2f')}"


def how_chosen(rep: dict[str, Any], attrs: dict[str, Any]) -> str:
    """One sentence on how the explained output was chosen."""
    name = rep["output"]["name"]
    if rep["source"] == "computed":
        return (f"The run did not choose an output to explain, so the dashboard picked **{name}**: "
                f"{DEFAULT_TEXT}. "
                "To explain another output, re-run with `--explain NAME`.")
    found = re.search(r"--explain(?:=|\s+)(\"[^\"]*\"|'[^']*'|\S+)", str(attrs.get("command_line", "")))
    if found:
        return f"Chosen when the atlas was computed, on the command line: `--explain {found.group(1)}`."
    return f"Chosen by the run's default: {DEFAULT_TEXT}."


# -- tables --------------------------------------------------------------------------------------
def regression_table(rep: dict[str, Any]) -> pd.DataFrame:
    """One row: the output regression (for display and CSV)."""
    reg = rep["regression"]
    return pd.DataFrame([{
        "output": rep["output"]["name"], "output_index": rep["output"]["index"], "threshold": rep["threshold"],
        "r2_in_sample": reg["r2"], "r2_cross_validated": reg["r2_cv"], "n_folds": reg["n_folds"],
        "grouping": rep["grouping"], "n_groups": reg["n_groups"], "n_tiles": reg["n_tiles"],
        "intercept": reg["intercept"], "note": reg["note"], "source": rep["source"],
        "nmf_relative_error": rep["nmf_relative_error"]}])


def concept_table(rep: dict[str, Any]) -> pd.DataFrame:
    """Per concept: tiles, share, coefficient, effect per SD, direction (plain words)."""
    rows = [{"concept": concept_label(c["cluster"] - 1), "tiles": c["tiles"], "share_of_tiles": c["share"],
             "coef": c["coef"], "effect_per_sd": c["effect_sd"], "direction": direction(c["coef"])}
            for c in rep["clusters"]]
    return pd.DataFrame(rows, columns=["concept", "tiles", "share_of_tiles", "coef", "effect_per_sd", "direction"])


def cam_table(rep: dict[str, Any]) -> pd.DataFrame:
    """Per concept: GradCAM r mean, std and tile count over all tiles and over positive tiles.
    Empty when GradCAM was not computed."""
    cols = ["concept", "r_mean_all", "r_std_all", "n_all", "r_mean_positive", "r_std_positive", "n_positive"]
    if not rep["gradcam"]:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame([{"concept": concept_label(c["cluster"] - 1), "r_mean_all": c["cam_r_mean"],
                          "r_std_all": c["cam_r_std"], "n_all": c["cam_n"], "r_mean_positive": c["cam_r_pos_mean"],
                          "r_std_positive": c["cam_r_pos_std"], "n_positive": c["cam_n_pos"]}
                         for c in rep["clusters"]], columns=cols)


def cam_long(rep: dict[str, Any]) -> pd.DataFrame:
    """Long form of cam_table for the error-bar chart: concept, tiles (set), mean, std, lo, hi, n."""
    rows = []
    for c in rep.get("clusters", []) if rep["gradcam"] else []:
        for label, m, s, n in (("all tiles", "cam_r_mean", "cam_r_std", "cam_n"),
                               ("positive tiles", "cam_r_pos_mean", "cam_r_pos_std", "cam_n_pos")):
            mean, std = c[m], c[s]
            lo = hi = None
            if mean is not None:
                lo, hi = max(-1.0, mean - (std or 0.0)), min(1.0, mean + (std or 0.0))
            rows.append({"concept": concept_label(c["cluster"] - 1), "tiles": label, "mean": mean, "std": std,
                         "lo": lo, "hi": hi, "n": c[n]})
    return pd.DataFrame(rows, columns=["concept", "tiles", "mean", "std", "lo", "hi", "n"])


AGREEMENT_MEASURES = {"pooled_r": "pooled, all tissue cells", "pooled_pos_r": "pooled, cells of positive tiles",
                      "tile_r_mean": "mean per-tile r", "tile_pos_r_mean": "mean per-tile r, positive tiles"}


def agreement_long(rep: dict[str, Any]) -> pd.DataFrame:
    """Pooled and per-tile GradCAM agreement with 95 % bootstrap bounds, one row per concept and measure:
    concept, measure, r, lo, hi. Empty when the atlas stores no agreement."""
    cols = ["concept", "measure", "r", "lo", "hi"]
    if not rep.get("agreement"):
        return pd.DataFrame(columns=cols)
    rows = [{"concept": concept_label(c["cluster"] - 1), "measure": label, "r": c.get(key),
             "lo": c.get(key + "_lo"), "hi": c.get(key + "_hi")}
            for c in rep["clusters"] for key, label in AGREEMENT_MEASURES.items()]
    return pd.DataFrame(rows, columns=cols)


def cv_band(reg: dict[str, Any]) -> str:
    """'5–95 %: 0.12 to 0.64' for the repeated cross-validation, or '' when not computed."""
    if reg.get("r2_cv_p5") is None or reg.get("r2_cv_p95") is None:
        return ""
    return f"5–95 %: {reg['r2_cv_p5']:.3f} to {reg['r2_cv_p95']:.3f}"


GRID_MEASURES = {"nmf_rel_error": ("NMF", "reconstruction error"), "nmf_r2": ("NMF", "R² in-sample"),
                 "nmf_r2_cv": ("NMF", "R² cross-validated"), "kmeans_rel_error": ("k-means", "reconstruction error"),
                 "kmeans_r2": ("k-means", "R² in-sample"), "kmeans_r2_cv": ("k-means", "R² cross-validated")}


def grid_table(rep: dict[str, Any]) -> pd.DataFrame:
    """The K grid, one row per K, with a flag on this atlas's K."""
    cols = ["k", *GRID_MEASURES, "this_atlas"]
    rows = [{**r, "this_atlas": r["k"] == rep["k"]} for r in rep["k_grid"]]
    return pd.DataFrame(rows, columns=cols)


def grid_long(rep: dict[str, Any]) -> pd.DataFrame:
    """Long form of the K grid for the line charts: k, method, measure, value (undefined values dropped)."""
    rows = [{"k": r["k"], "method": method, "measure": measure, "value": r[key]}
            for r in rep["k_grid"] for key, (method, measure) in GRID_MEASURES.items() if r.get(key) is not None]
    return pd.DataFrame(rows, columns=["k", "method", "measure", "value"])
