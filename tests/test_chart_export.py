"""Chart downloads: every chart's PNG (drawn on the server) has its legend and a name that says which
atlas, page and chart it is, since a PNG taken away from the meeting must say what it shows."""

from __future__ import annotations

import io

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from dashboard import ui


def _chart() -> alt.Chart:
    df = pd.DataFrame({"concept": ["C1", "C2", "C3"], "tiles": [12, 30, 7]})
    return alt.Chart(df, title="Tiles per concept").mark_bar().encode(
        x="concept:N", y="tiles:Q", color=alt.Color("concept:N", scale=ui.concept_scale(3)))


def test_chart_png_is_wide_and_has_the_concept_colours():
    img = Image.open(io.BytesIO(ui.chart_png(_chart()))).convert("RGB")
    assert img.width >= 2 * ui.EXPORT_WIDTH  # 2x scale of the export width, not a 300-px default
    pixels = np.asarray(img).reshape(-1, 3)
    for hex_colour in ui.concept_scale(3).range:
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).sum(axis=1) < 12).sum() > 200, hex_colour  # bars + legend


def test_layered_chart_title_names_the_file(monkeypatch):
    layered = _chart() + alt.Chart(pd.DataFrame({"y": [10]})).mark_rule().encode(y="y:Q")
    assert ui.chart_title(layered) == "Tiles per concept"
    monkeypatch.setattr(ui, "download_prefix", lambda: "atlas-cmu-")
    assert ui._file_name("cluster-Tiles per concept", "png") == "atlas-cmu-cluster-Tiles-per-concept.png"


def test_scatter_png_has_every_drawn_point_past_altairs_row_limit(tmp_path):
    """10,000 points (a choice on the Overview): more rows than Altair converts outside a page."""
    from dashboard.data import load
    from dashboard.views import overview
    from synthetic_atlas import write_atlas

    data = load(str(write_atlas(tmp_path / "big.h5", tiles_per_slide=(5000, 4000, 3000))))
    pts = overview._layers(data, "nmf", 0, (), 10_000)[1]
    assert len(pts) == 10_000
    img = np.asarray(Image.open(io.BytesIO(overview.scatter_png(data, "nmf", 0, (), 10_000))).convert("RGB"))
    assert img.shape[1] >= 2 * ui.EXPORT_WIDTH
    pixels = img.reshape(-1, 3).astype(int)
    for hex_colour in ui.concept_scale(data.k).range:  # every concept's points and legend entry
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(axis=1) < 12).sum() > 50, hex_colour
