"""Links that know their atlas: every URL carries `atlas=<fingerprint>`, a short hash of what identifies
the atlas (creation time, command line, model hash, settings, sizes). A link opened on a dashboard
showing another atlas says so and shows nothing of the link's view, instead of showing another slide.
"""

from __future__ import annotations

import hashlib
import json

import streamlit as st

from . import state

PARAM = "atlas"
_IDENTITY = ("created_utc", "command_line", "model_sha256", "config", "n_slides", "n_tiles", "tool_version")


def fingerprint(attrs: dict) -> str:
    """8 hex digits of the sha256 of the atlas's identifying root attributes (no file read: instant at any size)."""
    ident = {name: attrs.get(name) for name in _IDENTITY}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _start_fresh(fp: str) -> None:
    """Callback: drop the foreign link's view and open this atlas's overview."""
    for name in list(st.query_params):
        del st.query_params[name]
    for key in [k for k in st.session_state if str(k).startswith(state.widget_key(""))]:
        del st.session_state[key]
    st.session_state["_link_checked"] = fp
    st.query_params[PARAM] = fp


def check(attrs: dict, atlas_name: str) -> None:
    """Stop the page with an explanation when the URL was made on another atlas; else stamp the URL."""
    fp = fingerprint(attrs)
    given = st.query_params.get(PARAM)
    if given and given != fp and st.session_state.get("_link_checked") != fp:
        st.warning(f"**This link was made on another atlas** (fingerprint `{given}`). This dashboard shows "
                   f"`{atlas_name}` (fingerprint `{fp}`), so the link's slide, tile, concept and filter are not "
                   "shown: they would point at something else. Open the link on the dashboard of its own atlas, "
                   "or start afresh on this one.", icon=":material/link_off:")
        st.button("Open this atlas's overview", on_click=_start_fresh, args=(fp,), type="primary")
        st.stop()
    st.session_state["_link_checked"] = fp
    state.write(PARAM, fp)
