"""Which concepts are enriched in one diagnosis against the others (pure numpy/pandas).

Inputs are per-slide sums, so the tables cost O(S*K) whatever the number of tiles:
  slide_weight (S, K): summed NMF weight of each concept over each slide's tiles;
  slide_diag (S,): diagnosis name of each slide.
Only slides with tiles (total weight > 0) count as slides.

Definitions, for concept k, target diagnosis t and the other slides o:
  cluster_share_t[k] = W_t[k] / (W_t[k] + W_o[k])   share of the concept's weight on target slides
  expected_share     = sum_k W_t / sum_k (W_t + W_o) the same for all weight (what no enrichment gives)
  share_t[k]         = W_t[k] / sum_j W_t[j]          the concept's share of all weight on target slides
  log2_enrichment    = log2((share_t + eps) / (share_o + eps))
  slides_t_ge        = number of target slides where the concept holds >= min_share of the slide's weight
  top_slide_share    = the largest single target slide's part of W_t[k] (near 1: one slide dominates)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EPS = 1e-6


def slide_shares(slide_weight: np.ndarray) -> np.ndarray:
    """(S, K) share of each slide's total weight held by each concept (rows sum to 1; 0 for empty slides)."""
    total = slide_weight.sum(axis=1, keepdims=True)
    return np.divide(slide_weight, total, out=np.zeros_like(slide_weight, dtype=np.float64), where=total > 0)


def enrichment_table(slide_weight: np.ndarray, slide_diag: np.ndarray, target: str, *,
                     min_share: float = 0.2, slide_ids: np.ndarray | None = None,
                     labels: list[str] | None = None) -> pd.DataFrame:
    """One row per concept, ranked by log2 enrichment in `target` against all other slides given."""
    w = np.asarray(slide_weight, np.float64)
    k = w.shape[1]
    has = w.sum(axis=1) > 0
    is_t = (np.asarray(slide_diag) == target) & has
    is_o = ~(np.asarray(slide_diag) == target) & has
    wt, wo = w[is_t].sum(axis=0), w[is_o].sum(axis=0)
    share_t = wt / wt.sum() if wt.sum() > 0 else np.zeros(k)
    share_o = wo / wo.sum() if wo.sum() > 0 else np.zeros(k)
    total = wt + wo
    shares = slide_shares(w)
    top_slide = np.full(k, "", dtype=object)
    top_share = np.zeros(k)
    if is_t.any():
        idx = np.flatnonzero(is_t)
        best = idx[w[idx].argmax(axis=0)]
        top_share = np.divide(w[best, np.arange(k)], wt, out=np.zeros(k), where=wt > 0)
        ids = np.asarray(slide_ids) if slide_ids is not None else np.arange(len(w)).astype(str)
        top_slide = ids[best]
    df = pd.DataFrame({
        "concept": labels or [f"C{j + 1}" for j in range(k)],
        "cluster_share_in_target": np.divide(wt, total, out=np.zeros(k), where=total > 0),
        "expected_share": np.full(k, wt.sum() / total.sum() if total.sum() > 0 else 0.0),
        "share_of_target_weight": share_t,
        "share_of_other_weight": share_o,
        "log2_enrichment": np.log2((share_t + EPS) / (share_o + EPS)),
        "target_slides_ge": (shares[is_t] >= min_share).sum(axis=0),
        "target_slides": np.full(k, int(is_t.sum())),
        "other_slides_ge": (shares[is_o] >= min_share).sum(axis=0),
        "other_slides": np.full(k, int(is_o.sum())),
        "top_target_slide": top_slide,
        "top_slide_share": top_share,
    })
    return df.sort_values("log2_enrichment", ascending=False, kind="stable").reset_index(drop=True)


def by_diagnosis(slide_weight: np.ndarray, slide_diag: np.ndarray, diagnoses: list[str], *,
                 min_share: float = 0.2, labels: list[str] | None = None) -> pd.DataFrame:
    """Long table (concept x diagnosis): weight, share of the diagnosis' weight, slides where the
    concept holds >= min_share, and slides of that diagnosis with tiles."""
    w = np.asarray(slide_weight, np.float64)
    k = w.shape[1]
    has = w.sum(axis=1) > 0
    shares = slide_shares(w)
    labels = labels or [f"C{j + 1}" for j in range(k)]
    rows = []
    for d in diagnoses:
        m = (np.asarray(slide_diag) == d) & has
        wd = w[m].sum(axis=0)
        tot = wd.sum()
        ge = (shares[m] >= min_share).sum(axis=0)
        for j in range(k):
            rows.append({"concept": labels[j], "diagnosis": d, "weight": float(wd[j]),
                         "share_of_diagnosis_weight": float(wd[j] / tot) if tot > 0 else 0.0,
                         "slides_ge": int(ge[j]), "slides": int(m.sum())})
    return pd.DataFrame(rows)
