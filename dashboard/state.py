"""The view lives in the URL: every view-defining widget is bound to one query parameter.

A widget's value is seeded from `st.query_params` when it is first drawn in a session (so a pasted
link reopens the same view) and written back on every run. Parameters of widgets that are not on
the current page stay in the URL, so switching pages and back keeps them.

Parameters: page (overview, cluster, slides, enrichment, fidelity), dx (diagnosis filter, repeated),
color, algo, output, cluster (1-based), slide (slide id), layer, opacity (0-100), soft (1-based
concept), tile (global tile row), target, min_share, tab (the open tab of a page with tabs).
"""

from __future__ import annotations

import functools

from typing import Any, Callable

import streamlit as st

_PREFIX = "url_"


def widget_key(name: str) -> str:
    return _PREFIX + name


def _read(name: str, multi: bool):
    if multi:
        return st.query_params.get_all(name)
    return st.query_params.get(name)


def write(name: str, value: Any) -> None:
    """Set query parameter `name` (a list sets repeated values; None or [] removes it)."""
    if value is None or (isinstance(value, list) and not value):
        if name in st.query_params:
            del st.query_params[name]
        return
    new = [str(v) for v in value] if isinstance(value, list) else str(value)
    old = st.query_params.get_all(name) if isinstance(value, list) else st.query_params.get(name)
    if old != new:
        st.query_params[name] = new


def bound(widget: Callable, label: str, name: str, *, default: Any, options: list | None = None,
          parse: Callable[[Any], Any] = str, multi: bool = False, **kwargs) -> Any:
    """Draw `widget` (st.selectbox, st.radio, st.slider, st.multiselect, ...) bound to URL param `name`.

    `options` (if given) are the allowed values; a URL value outside them falls back to `default`.
    `parse` turns the URL string into a widget value. Returns the widget's value.
    """
    key = widget_key(name)
    current = st.session_state.get(key, None)
    if key not in st.session_state:
        raw = _read(name, multi)
        try:
            current = ([parse(v) for v in raw] if multi else parse(raw)) if raw not in (None, []) else default
        except (TypeError, ValueError):
            current = default
    if options is not None:
        if multi:
            current = [v for v in (current or []) if v in options]
        elif current not in options:
            current = default
    st.session_state[key] = current
    if options is not None:
        value = widget(label, options, key=key, **kwargs)
    else:
        value = widget(label, key=key, **kwargs)
    write(name, list(value) if multi else value)
    return value


def tabs(name: str, labels: dict[str, str], *, default: str) -> tuple[str, Any]:
    """st.tabs bound to URL param `name` that tracks which tab is open, so a page draws only that tab's
    content (a page's charts and galleries cost the browser most of its time; see bench/README.md).

    labels: URL value -> tab label, in display order. Returns (URL value of the open tab, its container).
    """
    key = widget_key(name)
    by_label = {label: value for value, label in labels.items()}
    if st.session_state.get(key) not in by_label:  # first draw, or the parameter of another page's tabs
        st.session_state[key] = labels.get(st.query_params.get(name), labels[default])
    boxes = st.tabs(list(labels.values()), key=key, on_change="rerun")
    value = by_label[st.session_state[key]]
    write(name, value)
    return value, boxes[list(labels).index(value)]


def get(name: str, default: Any = None, parse: Callable[[Any], Any] = str) -> Any:
    """Current value of a parameter whose widget may not be on this page."""
    key = widget_key(name)
    if key in st.session_state:
        return st.session_state[key]
    raw = st.query_params.get(name)
    try:
        return default if raw is None else parse(raw)
    except (TypeError, ValueError):
        return default


def go(**params: Any) -> None:
    """Callback for buttons that change the view (e.g. open a concept): sets widgets and URL.
    A page change asks for a rerun of the whole app (see `fragment`)."""
    for name, value in params.items():
        st.session_state[widget_key(name)] = value
        write(name, value)
    if "page" in params:
        st.session_state["_rerun_app"] = True


def fragment(fn: Callable) -> Callable:
    """st.fragment that honours a page change asked by a widget inside it: a fragment's widget reruns
    only its fragment, so without this an 'Open on slide' in the overview's gallery changed the URL
    while the overview stayed on screen."""
    @functools.wraps(fn)
    def body(*args, **kwargs):
        if st.session_state.pop("_rerun_app", False):
            st.rerun(scope="app")
        return fn(*args, **kwargs)
    return st.fragment(body)


def full_run_started() -> None:
    """Called at the top of every full run: any page change asked for is being shown now."""
    st.session_state.pop("_rerun_app", None)
