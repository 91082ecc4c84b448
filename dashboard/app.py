"""Lumen review dashboard (read-only). Launch from the repository root after README's install command
(`pip install -e .` makes the `dashboard` and `precompute` packages importable from anywhere):

    streamlit run dashboard/app.py -- --atlas demo/atlas.h5      (or: lumen-dashboard --atlas demo/atlas.h5)

dashboard/.streamlit/config.toml binds it to 127.0.0.1 (override with --server.address). The atlas
path can also come from the LUMEN_ATLAS environment variable. See docs/dashboard.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import streamlit as st

if __name__ == "app":  # imported by `streamlit run` before Streamlit's runtime exists (the st.App at the end):
    # each cache then logs that it keeps its entries in memory, which it always does here; keep it quiet.
    logging.getLogger("streamlit.runtime.caching.cache_data_api").setLevel(logging.ERROR)

from dashboard import links, naming, state, warm
from dashboard.launch import atlas_argument
from dashboard.guard import atlas_guard, show
from dashboard.data import AtlasFormatError, load
from dashboard.views import cluster, enrichment, fidelity, overview, slide

# The one page registry: URL name -> (title in the sidebar, module with render(data, diagnoses)).
VIEWS = {"overview": ("Overview", overview), "cluster": ("Cluster", cluster), "slides": ("Slides", slide),
         "enrichment": ("Diagnosis enrichment", enrichment), "fidelity": ("Fidelity", fidelity)}

CSS = """<style>
[data-testid="stCaptionContainer"], [data-testid="stImageCaption"] {font-size: 0.95rem;}
[data-testid="stMetricValue"] {font-size: 1.9rem;}
.block-container {padding-top: 2.2rem;}
/* Streamlit's chart toolbar names its PNG by time only; each chart has a named "PNG of this chart" button */
[data-testid="stElementToolbarButton"]:has(button[aria-label^="Download as PNG"]) {display: none;}
/* a gallery is a chart of images with its own CSV and PNG buttons: its toolbar would only offer base64 data */
[class*="st-key-gallery_"] [data-testid="stElementToolbar"] {display: none;}
</style>"""

USAGE = "streamlit run dashboard/app.py -- --atlas path/to/atlas.h5"
ICON = Path(__file__).with_name("icon.png")  # 2 x 2 cells in the first four concept colours


def main() -> None:
    # our own file: a Material icon as page icon is fetched from fonts.gstatic.com by every page (a
    # request leaving the hospital network), an emoji loads Streamlit's emoji catalogue (0.15 s)
    st.set_page_config(page_title="Lumen atlas", page_icon=ICON, layout="wide")
    st.markdown(CSS, unsafe_allow_html=True)
    path = atlas_argument(sys.argv[1:])
    if not path:
        st.error(f"No atlas given. Start the dashboard with:\n\n`{USAGE}`")
        st.stop()
    try:
        data = load(path)
    except AtlasFormatError as exc:
        show(exc)
        st.caption(f"Usage: `{USAGE}`")
        st.stop()
    links.check(data.attrs, data.path.name)
    st.session_state["_download_prefix"] = f"{data.path.stem}-"
    naming.setup(data, naming.notes_argument(sys.argv[1:]))

    with st.sidebar:
        st.title("Lumen")
        page = state.bound(st.radio, "View", "page", default="overview", options=list(VIEWS),
                           format_func=lambda name: VIEWS[name][0])
        diagnoses = state.bound(st.multiselect, "Diagnosis filter (all views)", "dx", default=[],
                                options=data.diagnoses, multi=True, placeholder="All diagnoses",
                                help="Only slides with these diagnoses count in every view. Empty = all.")
        st.caption(f"Atlas `{data.path.name}`: {data.n_slides} slides, {data.n:,} tiles, K = {data.k}.")
        st.caption("The address bar holds this view (page, concept, slide, filters, colouring): "
                   "copy it to reopen the same view.")
        naming.sidebar(data)
    state.full_run_started()
    st.session_state["_charts_drawn"] = 0  # numbers the charts' PNG buttons in page order (stable keys)
    st.session_state["_page_name"] = page
    with atlas_guard():  # a damaged part of the atlas gets Lumen's message, not a Streamlit error box
        VIEWS[page][1].render(data, diagnoses)


if __name__ == "__main__":  # `streamlit run` (and AppTest) run the script as __main__
    main()
elif __name__ == "app":  # `streamlit run` imports this file as module `app` to serve the st.App below
    # Streamlit's own server with a start-up hook: the atlas is read before the first browser connects.
    app = st.App(__file__, lifespan=warm.lifespan)
