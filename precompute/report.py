"""`precompute report`: how faithful an atlas's concepts are, as plain values and as text.

`report_dict` gathers the numbers (JSON-able: NaN becomes None) for the command line and the
dashboard's Fidelity page; `format_report` renders them. Atlases written without fidelity results
still get the output regression, computed here from the tile table. Reads through store.Atlas
only; numpy, no torch and no scikit-learn, so the dashboard that imports this module loads neither.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .explained import DEFAULT_TEXT, default_output
from .regression import regress, tile_groups
from .store import Atlas
from .targets import check_target, default_target, describe, target_values

CAM_KEYS = ("cam_r_mean", "cam_r_std", "cam_n", "cam_r_pos_mean", "cam_r_pos_std", "cam_n_pos")
CV_KEYS = ("r2_cv_median", "r2_cv_p5", "r2_cv_p95")
AGREE_KEYS = tuple(f"{m}{sfx}" for m in ("pooled_r", "pooled_pos_r", "tile_r_mean", "tile_pos_r_mean")
                   for sfx in ("", "_lo", "_hi")) + ("tile_n", "tile_pos_n")
AGREE_ATTRS = ("n_cells", "n_pos_cells", "n_tiles", "n_tiles_used", "n_tiles_excluded", "n_pos_tiles",
               "n_pos_tiles_used", "min_cam_cells", "unit", "n_units", "n_boot")
GRID_KEYS = ("nmf_rel_error", "nmf_r2", "nmf_r2_cv", "kmeans_rel_error", "kmeans_r2", "kmeans_r2_cv",
             "nmf_r2_cv_p5", "nmf_r2_cv_p95", "kmeans_r2_cv_p5", "kmeans_r2_cv_p95", "kmeans_dist_r2",
             "kmeans_dist_r2_cv")


def _num(value: Any) -> float | int | None:
    """A plain Python number, None for NaN or missing."""
    if value is None:
        return None
    value = np.asarray(value).reshape(-1)[0].item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _tile_groups(atlas: Atlas, slide_of_tile: np.ndarray) -> tuple[np.ndarray, str]:
    """Cross-validation groups per tile, as the run makes them: patients when the manifest gave every
    slide one, else slides. Returns (groups (N,), "patient" | "slide")."""
    return tile_groups(slide_of_tile, atlas.slides().get("patient", ()))


def _target_chunked(atlas: Atlas, index: int, target: str, activation: str, chunk: int = 131_072) -> np.ndarray:
    """The target (N,) from the stored logits, read `chunk` tiles at a time (a 10^6-tile atlas's
    float64 logits and their log-sum-exp temporaries would otherwise cost ~0.6 GB at once)."""
    n = atlas.n_tiles
    y = np.empty(n)
    for a in range(0, n, chunk):
        rows = slice(a, min(a + chunk, n))
        y[rows] = target_values(atlas.tiles(["outputs"], rows)["outputs"], index, target, activation)
    return y


def _computed(atlas: Atlas, weights: np.ndarray, groups: np.ndarray) -> tuple[int, str, str, np.ndarray, dict]:
    """The regression of an atlas without fidelity results: (index, name, target, coef, regression dict),
    explaining the run's default output (explained.default_output)."""
    names, config = atlas.output_names, atlas.config
    n_outputs = int(atlas.tile_shape("outputs")[1])
    index, name = default_output(names if len(names) == n_outputs else [f"out_{i}" for i in range(n_outputs)])
    if index is None:
        raise ValueError(f"this atlas stores no fidelity results and its model has {n_outputs} outputs, none of "
                         f"them the default ({DEFAULT_TEXT}); re-run precompute with --explain NAME.")
    activation = str(config.get("output_activation", "auto"))
    target = check_target(config.get("target")) or default_target(activation, n_outputs)
    y = _target_chunked(atlas, index, target, activation)
    res, rcv = regress(weights, y, groups)
    reg = {"r2": _num(res["r2"]), "r2_cv": _num(res["r2_cv"]), "n_folds": res["n_folds"],
           "n_groups": res["n_groups"], "n_tiles": res["n_tiles"], "intercept": _num(res["intercept"]),
           "note": res["note"], **{key: _num(rcv[key]) for key in CV_KEYS}, "n_repeats": rcv["n_repeats"]}
    return index, name, target, res["coef"], reg


def _cluster_row(c: int, coef: np.ndarray, sd: float, dominant: np.ndarray, cam: dict, agreement: dict,
                 importance: dict) -> dict[str, Any]:
    """One concept's row of report_dict()['clusters'] (cam: the fidelity group when GradCAM was computed)."""
    b = float(coef[c]) if c < len(coef) else float("nan")
    row = {"cluster": c + 1, "tiles": int((dominant == c).sum()),
           "share": float((dominant == c).mean()) if len(dominant) else 0.0,
           "coef": _num(b), "effect_sd": _num(b * sd),
           "direction": "pushes the output up" if b > 0 else "pushes the output down" if b < 0 else "no effect"}
    if cam:
        row.update({key: _num(np.asarray(cam[key])[c]) for key in CAM_KEYS})
    row.update({key: _num(np.asarray(agreement[key])[c]) for key in AGREE_KEYS if key in agreement})
    if importance:
        row.update({f"importance{sfx}": _num(np.asarray(importance[key])[c])
                    for key, sfx in (("mean", ""), ("lo", "_lo"), ("hi", "_hi"))})
        row["importance_by_diagnosis"] = {
            str(d): [_num(np.asarray(importance[f"by_diagnosis_{m}"])[i, c]) for m in ("mean", "lo", "hi")]
            for i, d in enumerate(importance.get("diagnoses", []))}
    return row


def _scalar(value):
    """A stored (1,) array as a Python number; anything else unchanged."""
    arr = np.asarray(value)
    if arr.dtype.kind in "biuf" and arr.size == 1:
        return arr.reshape(-1)[0].item()
    return value


def fidelity_from_atlas(atlas: "Atlas") -> dict:
    """What the atlas stores under the group `fidelity`, or {} when it has none.

    Returns the group's attrs (output_index, output_name, threshold, groups, has_gradcam, ...),
    its arrays ((1,) arrays such as r2 as Python floats; coef, cam_r_* as (K,) arrays) and
    "k_grid": the arrays of `fidelity/k_grid` ({} when absent) and "k_grid_attrs" its attrs;
    "agreement": arrays and attrs of `fidelity/agreement` ({} when absent, see precompute/agreement.py). The per-tile `gradcam_r` column is
    not read here (it is N x K); read it with `atlas.tiles(["gradcam_r"])`.
    """
    attrs = atlas.group_attrs("fidelity")
    arrays = atlas.group("fidelity")
    if not attrs and not arrays:
        return {}
    out = dict(attrs)
    out.update({name: _scalar(value) for name, value in arrays.items()})
    out["k_grid"] = atlas.group("fidelity/k_grid")
    out["k_grid_attrs"] = atlas.group_attrs("fidelity/k_grid")
    out["agreement"] = {**atlas.group("fidelity/agreement"), **atlas.group_attrs("fidelity/agreement")}
    out["importance"] = {**atlas.group("fidelity/importance"), **atlas.group_attrs("fidelity/importance")}
    return out


def report_dict(path: str | Path) -> dict[str, Any]:
    """Everything `report` shows, as plain values (None where a number is undefined or not stored).

    Keys: file, n_tiles, n_slides, k, source ("atlas": stored by the run; "computed": the regression
    was computed now because the atlas has no fidelity results), notes (list of str), output
    {index, name}, target (logit | log-odds | contrast), target_text (in words), threshold, grouping,
    gradcam (bool), regression {r2, r2_cv, r2_cv_median, r2_cv_p5, r2_cv_p95, n_repeats, n_folds, n_groups,
    n_tiles, intercept, note}, clusters (one dict per concept: cluster (1-based), tiles (dominant
    concept), share, coef, effect_sd (coef x std of the weight over tiles), direction, cam_* (K,)
    values when GradCAM was computed, pooled_r* / tile_r_mean* with _lo/_hi 95 % bootstrap bounds when the
    atlas stores the agreement, importance with _lo/_hi and importance_by_diagnosis {diagnosis: [mean, lo, hi]}
    with --importance), agreement (counts: cells, tiles used / excluded, bootstrap unit), importance
    ({deletion: [mean, lo, hi] curves (K + 1,), unit, diagnoses} or {}), k_grid (list of rows, [] when
    absent), k_grid_info (n_cells, n_tiles, features), nmf_relative_error.
    """
    with Atlas(path) as atlas:
        t = atlas.tiles(["slide", "weights", "nmf_cluster"])
        fid = fidelity_from_atlas(atlas)
        nmf_err = atlas.group_attrs("clusters").get("relative_error")
        n_slides = atlas.n_slides
        groups, grouping = _tile_groups(atlas, t["slide"])
        weights = np.asarray(t["weights"], dtype=np.float64)
        computed = None if fid else _computed(atlas, weights, groups)

    n_tiles, k = weights.shape
    notes: list[str] = []
    if fid:
        source = "atlas"
        index, name, target, coef, reg = _stored(fid, groups, n_tiles)
        grouping = str(fid.get("groups") or grouping)
        threshold = _num(fid.get("threshold"))
        gradcam = bool(fid.get("has_gradcam", False)) and all(key in fid for key in CAM_KEYS)
        agreement, importance = fid.get("agreement") or {}, fid.get("importance") or {}
        k_grid, k_grid_info = fid.get("k_grid") or {}, fid.get("k_grid_attrs") or {}
    else:
        source = "computed"
        index, name, target, coef, reg = computed
        threshold, gradcam, k_grid, agreement, k_grid_info, importance = None, False, {}, {}, {}, {}
        notes.append(f"this atlas stores no fidelity results: the output regression was computed now from the "
                     f"tile table, explaining output {name!r} (index {index}; the default: {DEFAULT_TEXT}).")
    if not gradcam:
        notes.append("GradCAM was not computed for this atlas (run with --gradcam to compute it).")
    if not k_grid:
        notes.append("no K grid stored in this atlas.")
    dominant, sd = np.asarray(t["nmf_cluster"]), weights.std(axis=0)
    clusters = [_cluster_row(c, coef, float(sd[c]), dominant, fid if gradcam else {}, agreement, importance)
                for c in range(k)]
    return {
        "file": str(path), "n_tiles": int(n_tiles), "n_slides": int(n_slides), "k": int(k), "source": source,
        "notes": notes, "output": {"index": index, "name": name}, "target": target,
        "target_text": describe(target, name), "threshold": threshold, "grouping": grouping,
        "gradcam": gradcam, "regression": reg,
        "agreement": {key: _num(agreement[key]) if key != "unit" else str(agreement[key])
                      for key in AGREE_ATTRS if key in agreement}, "clusters": clusters, "k_grid": _grid_rows(k_grid),
        "nmf_relative_error": _num(nmf_err), "importance": _importance_curves(importance),
        "k_grid_info": {key: _num(v) if key != "features" else str(v) for key, v in k_grid_info.items()},
    }


def _stored(fid: dict, groups: np.ndarray, n_tiles: int) -> tuple[int, str, str, np.ndarray, dict]:
    """(index, name, target, coef, regression dict) of the regression the run stored."""
    index, name = int(fid.get("output_index", 0)), str(fid.get("output_name", ""))
    target = str(fid.get("target") or "logit")  # atlases written before targets existed explained the logit
    n_groups = fid.get("n_groups", len(np.unique(groups)))
    reg = {"r2": _num(fid.get("r2")), "r2_cv": _num(fid.get("r2_cv")), "n_folds": _num(fid.get("n_folds")),
           "n_groups": _num(n_groups), "n_tiles": _num(fid.get("n_tiles", n_tiles)),
           "intercept": _num(fid.get("intercept")), "note": str(fid.get("cv_note", fid.get("note", "")) or ""),
           **{key: _num(fid.get(key)) for key in CV_KEYS}}
    if fid.get("r2_cv_repeats") is not None:
        reg["n_repeats"] = int(np.asarray(fid["r2_cv_repeats"]).size)
    return index, name, target, np.asarray(fid["coef"], dtype=np.float64), reg


def _grid_rows(k_grid: dict) -> list[dict[str, Any]]:
    """One dict per K of the stored K grid ([] when absent)."""
    if not k_grid or "ks" not in k_grid:
        return []
    return [{"k": int(kk), **{key: _num(np.asarray(k_grid[key])[i]) if key in k_grid else None for key in GRID_KEYS}}
            for i, kk in enumerate(np.asarray(k_grid["ks"]))]


def _importance_curves(importance: dict) -> dict[str, Any]:
    """The deletion curves (mean, lo, hi), unit and diagnoses of --importance ({} when absent)."""
    if not importance:
        return {}
    return {"deletion": [[_num(v) for v in np.asarray(importance[f"deletion_{m}"])] for m in ("mean", "lo", "hi")],
            "unit": str(importance.get("unit", "")), "diagnoses": list(importance.get("diagnoses", []))}


def _f(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _cam(mean: Any, std: Any, n: Any) -> str:
    if mean is None:
        return f"n/a (n={n or 0})"
    return f"{mean:+.2f} ± {_f(std, '.2f')} (n={n})"


def _ci(d: dict[str, Any], key: str) -> str:
    """'+0.44 [+0.31, +0.55]' from d[key], d[key_lo], d[key_hi]; 'n/a' when undefined."""
    if d.get(key) is None:
        return "n/a"
    lo, hi = d.get(key + "_lo"), d.get(key + "_hi")
    band = f" [{_f(lo, '+.2f')}, {_f(hi, '+.2f')}]" if lo is not None and hi is not None else ""
    return f"{d[key]:+.2f}{band}"


def _cluster_lines(d: dict[str, Any]) -> list[str]:
    old_cam = d["gradcam"] and not d.get("agreement")  # atlases from before the pooled agreement
    lines = ["", f"Per cluster. coef: change of the {d['target']} per unit of the concept's summed weight in a tile;",
             "per SD: per standard deviation of that weight over tiles; tiles: tiles where the concept dominates."]
    header = f"{'cluster':>7}  {'tiles':>7}  {'share':>6}  {'coef':>10}  {'per SD':>8}  {'direction':<23}"
    if old_cam:
        header += f"  {'GradCAM r, all tiles':<24}  {'GradCAM r, positive tiles':<24}"
    lines.append(header)
    for c in d["clusters"]:
        line = (f"{c['cluster']:>7}  {c['tiles']:>7}  {c['share']:>6.1%}  {_f(c['coef'], '+.4g'):>10}  "
                f"{_f(c['effect_sd'], '+.3f'):>8}  {c['direction']:<23}")
        if old_cam:
            line += (f"  {_cam(c['cam_r_mean'], c['cam_r_std'], c['cam_n']):<24}  "
                     f"{_cam(c['cam_r_pos_mean'], c['cam_r_pos_std'], c['cam_n_pos']):<24}")
        lines.append(line)
    return lines


def _regression_lines(d: dict[str, Any]) -> list[str]:
    reg = d["regression"]
    folds = (f"{reg['n_folds']} folds, " if reg.get("n_folds") else "") + \
        (f"tiles of one {d['grouping']} kept together, {reg['n_groups']} {d['grouping']}s"
         if reg.get("n_groups") is not None else f"tiles of one {d['grouping']} kept together")
    lines = ["", f"R^2 of the {d['target']} on the concept weights: in-sample {_f(reg['r2'])}; intercept "
                 f"{_f(reg['intercept'], '+.4g')}"]
    if reg.get("r2_cv_median") is not None:
        lines.append(f"  cross-validated: median {_f(reg['r2_cv_median'])}, 5-95 % band {_f(reg['r2_cv_p5'])} to "
                     f"{_f(reg['r2_cv_p95'])} over {reg.get('n_repeats', '?')} random assignments of whole "
                     f"{d['grouping']}s to folds ({folds}); one fixed assignment gives {_f(reg['r2_cv'])}")
    else:
        lines.append(f"  cross-validated {_f(reg['r2_cv'])} ({folds}; one assignment of {d['grouping']}s to folds)")
    if reg.get("note"):
        lines.append(f"  {reg['note']}")
    lines.append(f"NMF relative reconstruction error of the atlas's concepts: {_f(d['nmf_relative_error'])}")
    return lines


def _agreement_lines(d: dict[str, Any]) -> list[str]:
    a = d.get("agreement") or {}
    if not a:
        return []
    lines = ["", f"Agreement with GradCAM of the {d['target']}: Pearson r [95 % interval, bootstrap over "
                 f"{a.get('n_units')} {a.get('unit')}s, {a.get('n_boot')} draws]",
             f"  pooled over {a.get('n_cells')} tissue cells, and over the {a.get('n_pos_cells')} cells of the "
             f"{a.get('n_pos_tiles')} positive tiles",
             f"  per-tile r only on tiles whose CAM is non-zero on >= {a.get('min_cam_cells')} cells: "
             f"{a.get('n_tiles_used')} of {a.get('n_tiles')} tiles used, {a.get('n_tiles_excluded')} excluded "
             f"({a.get('n_pos_tiles_used')} of {a.get('n_pos_tiles')} positive tiles used)",
             f"{'cluster':>7}  {'pooled r, all cells':<22}  {'pooled r, positive':<22}  "
             f"{'mean per-tile r (n)':<28}  {'positive tiles (n)':<28}"]
    for c in d["clusters"]:
        lines.append(f"{c['cluster']:>7}  {_ci(c, 'pooled_r'):<22}  {_ci(c, 'pooled_pos_r'):<22}  "
                     f"{_ci(c, 'tile_r_mean') + ' (' + _f(c.get('tile_n'), '.0f') + ')':<28}  "
                     f"{_ci(c, 'tile_pos_r_mean') + ' (' + _f(c.get('tile_pos_n'), '.0f') + ')':<28}")
    return lines


def _importance_lines(d: dict[str, Any]) -> list[str]:
    imp = d.get("importance") or {}
    if not imp:
        return []
    diags = imp.get("diagnoses", [])
    lines = ["", f"Importance by removal: drop of the {d['target']} when the concept is removed from the hooked "
                 f"layer and the rest of the network runs (mean over tiles [95 % interval, bootstrap over "
                 f"{imp.get('unit')}s]); positive = the concept supports the target",
             f"{'cluster':>7}  {'all tiles':<24}" + "".join(f"  {str(g)[:24]:<24}" for g in diags)]
    for c in d["clusters"]:
        by = c.get("importance_by_diagnosis", {})
        cells = "".join(f"  {_ci(dict(zip(('v', 'v_lo', 'v_hi'), by.get(str(g), [None] * 3))), 'v'):<24}"
                        for g in diags)
        lines.append(f"{c['cluster']:>7}  {_ci(c, 'importance'):<24}{cells}")
    mean = imp["deletion"][0]
    lines.append("  deletion curve (concepts removed most important first, per tile): "
                 + " -> ".join(_f(v, "+.3f") for v in mean))
    return lines


def _grid_lines(d: dict[str, Any]) -> list[str]:
    if not d["k_grid"]:
        return []
    a = d.get("k_grid_info") or {}
    cells = (f" ({a['n_cells']} cells of {a['n_tiles']} whole tiles)" if a.get("n_cells") else "")
    lines = ["", f"Choosing K on the calibration cells{cells}: relative error; R^2 of the {d['target']} on the "
                 "per-tile features, in-sample / cross-validated median [5-95 %]",
             "  NMF: summed cell weights per tile; k-means: cells per cluster per tile (as in the method's paper); "
             "k-means dist: distances of the tile's mean cell to the centres",
             f"{'K':>4}  {'NMF err':>8}  {'NMF R^2':>8}  {'NMF R^2 cv':>22}  {'k-means err':>11}  {'k-means R^2':>11}  "
             f"{'k-means R^2 cv':>22}  {'k-means dist R^2 / cv':>21}"]
    for r in d["k_grid"]:
        mark = "  <- this atlas" if r["k"] == d["k"] else ""
        nmf_cv = _f(r["nmf_r2_cv"]) + (f" [{_f(r['nmf_r2_cv_p5'])}, {_f(r['nmf_r2_cv_p95'])}]"
                                       if r.get("nmf_r2_cv_p5") is not None else "")
        km_cv = _f(r["kmeans_r2_cv"]) + (f" [{_f(r['kmeans_r2_cv_p5'])}, {_f(r['kmeans_r2_cv_p95'])}]"
                                         if r.get("kmeans_r2_cv_p5") is not None else "")
        dist = f"{_f(r.get('kmeans_dist_r2'))} / {_f(r.get('kmeans_dist_r2_cv'))}"
        lines.append(f"{r['k']:>4}  {_f(r['nmf_rel_error']):>8}  {_f(r['nmf_r2']):>8}  {nmf_cv:>22}  "
                     f"{_f(r['kmeans_rel_error']):>11}  {_f(r['kmeans_r2']):>11}  {km_cv:>22}  {dist:>21}{mark}")
    return lines


def format_report(d: dict[str, Any]) -> str:
    """Plain-text rendering of report_dict()."""
    out = d["output"]
    lines = [f"Fidelity of {d['file']}: {d['n_tiles']} tiles, {d['n_slides']} slides, K={d['k']} concepts",
             f"explained target: {d['target_text']} (output index {out['index']}; --target {d['target']})"
             + (f"; positive tiles: probability >= {d['threshold']:g}" if d.get("threshold") is not None else "")]
    lines += [f"note: {n}" for n in d["notes"]]
    lines += (_cluster_lines(d) + _regression_lines(d) + _agreement_lines(d) + _importance_lines(d)
              + _grid_lines(d))
    return "\n".join(line.rstrip() for line in lines)
