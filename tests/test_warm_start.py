"""The server reads the atlas when it starts, so the first person to open the dashboard does not wait for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from streamlit.web.server.app_discovery import discover_asgi_app

from dashboard import data as data_mod
from dashboard import fidelity, raster
from dashboard import warm
from dashboard_fixtures import APP, dash_atlas, run_app  # noqa: F401  (dash_atlas is a fixture)
from synthetic_atlas import write_atlas


def test_streamlit_run_serves_the_app_with_its_start_hook():
    found = discover_asgi_app(Path(APP))  # what `streamlit run dashboard/app.py` does before serving
    assert found.is_asgi_app and found.import_string == "app:app"


def test_the_pages_use_what_was_read_at_start(dash_atlas, monkeypatch):
    opened, reported = [], []
    real_open, real_report = data_mod.AtlasData.open.__func__, fidelity.report_dict

    def counting_open(cls, path, key=""):
        opened.append(Path(path))
        return real_open(cls, path, key)

    monkeypatch.setattr(data_mod.AtlasData, "open", classmethod(counting_open))
    monkeypatch.setattr(fidelity, "report_dict", lambda path: reported.append(path) or real_report(path))
    data_mod._load.clear()
    fidelity._report.clear()
    assert warm.prepare(str(dash_atlas)) >= 0
    assert opened == [Path(dash_atlas)] and len(reported) == 1
    for page in ("overview", "cluster"):
        at = run_app(dash_atlas, monkeypatch, lambda at: None, page=page)
        assert not at.exception and (at.get("vega_lite_chart") or page == "cluster")
        assert any(m.label.startswith("Effect on") for m in at.metric) or page == "overview"
    # the pages found the atlas and its fidelity figures in the caches: nothing read or computed again
    assert opened == [Path(dash_atlas)] and len(reported) == 1


def test_a_cohort_scale_atlas_is_prepared(tmp_path, monkeypatch):
    """More tiles than the scatter draws points, as in any real cohort; with a default of 10,000 points,
    more rows than Altair validates outside a page (5,000)."""
    monkeypatch.setattr(raster, "DEFAULT_POINTS", 10_000)
    path = write_atlas(tmp_path / "big.h5", tiles_per_slide=(5000, 4000, 3000))
    assert warm.prepare(str(path)) >= 0  # raised before: Altair refuses 10,000 rows outside a page
    at = run_app(path, monkeypatch, lambda at: None, page="overview")
    assert not at.exception and at.get("vega_lite_chart")


def test_a_bad_atlas_at_start_leaves_the_message_to_the_page(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "not-an-atlas.h5"
    bad.write_bytes(b"plain text, not HDF5")
    monkeypatch.setattr("sys.argv", ["app.py", "--atlas", str(bad)])

    async def start_and_stop():
        async with warm.lifespan(None):
            pass

    asyncio.run(start_and_stop())  # the server still starts
    assert "the page says why" in capsys.readouterr().err
    at = run_app(bad, monkeypatch, lambda at: None)
    assert "not-an-atlas.h5" in " ".join(e.value for e in at.error)
