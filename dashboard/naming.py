"""Concept names and meeting notes in the dashboard, and the meeting-report download.

The dashboard never writes the atlas. Names and notes go to a notes file (precompute/notes.py) and
only when the dashboard was started with one:

    streamlit run dashboard/app.py -- --atlas atlas.h5 --notes atlas.h5.notes.json   (or $LUMEN_NOTES)

Without `--notes`, the default notes file beside the atlas (ATLAS.notes.json) is shown read-only when
it exists, and the editing controls are replaced by a line saying how to enable them. Every run
reads the file again (it is small), so a name saved in one browser shows in every other at its next
interaction; names reach every page through `labels.concept_label`.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from precompute import notes as nm
from precompute.meeting_report import build_report

from .data import AtlasData
from .labels import set_concept_names


@dataclass
class NotesState:
    """Where names come from this run. path: the notes file (None: none in use); editable: started with
    --notes; notes: the parsed file (None: unnamed); message: why read-only, ignored or failing."""

    path: Path | None = None
    editable: bool = False
    notes: nm.Notes | None = None
    message: str = ""
    error: bool = False
    sha256: str = ""


_CURRENT = NotesState()


def notes_argument(argv: list[str]) -> str | None:
    """`--notes FILE` from the script arguments (after `--`), else $LUMEN_NOTES."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--notes")
    args, _ = parser.parse_known_args([a for a in argv if a != "--"])
    return args.notes or os.environ.get("LUMEN_NOTES") or None


@st.cache_resource(max_entries=4, show_spinner="Checking which atlas the notes belong to (sha256)…")
def _sha256(key: str, notes_path: str) -> str:
    """The atlas's sha256 (key: path|mtime|size), reusing the notes file's record while it matches."""
    return nm.atlas_digest(key.split("|")[0], notes_path)


def setup(data: AtlasData, notes_arg: str | None) -> NotesState:
    """Read the notes for this run and make their names the concept labels everywhere."""
    global _CURRENT
    ns = NotesState()
    try:
        if notes_arg:
            ns.path, ns.editable = nm.check_target(Path(notes_arg).expanduser(), data.path), True
            ns.sha256 = _sha256(data.key, str(ns.path))
            ns.notes = nm.open_or_new(ns.path, data.path, ns.sha256, data.k)
        elif nm.default_path(data.path).exists():
            ns.path = nm.default_path(data.path)
            ns.sha256 = _sha256(data.key, str(ns.path))
            ns.notes = nm.read_notes(ns.path, atlas_sha256=ns.sha256, k=data.k)
    except nm.NotesError as exc:
        ns.notes, ns.editable, ns.message, ns.error = None, False, str(exc), True
    set_concept_names(nm.labels(data.k, ns.notes) if ns.notes else None)
    _CURRENT = ns
    return ns


def current() -> NotesState:
    return _CURRENT


def enable_hint(data: AtlasData) -> str:
    cmd = (f"streamlit run dashboard/app.py -- --atlas {shlex.quote(str(data.path))} --notes "
           f"{shlex.quote(str(nm.default_path(data.path)))}")
    return f"Names and notes are read-only. To name concepts, start the dashboard with a notes file: `{cmd}`"


def sidebar(data: AtlasData) -> None:
    """Where the names come from, the meeting note, and the report download."""
    ns = _CURRENT
    st.subheader("Meeting")
    if ns.error:  # the message may quote text from the file: shown as plain text, never as markdown
        st.error("**Concept names not used**: the notes file cannot be used.")
        st.code(ns.message, language=None, wrap_lines=True)
    elif ns.editable:
        st.caption(f"Concept names and notes are saved to `{ns.path}` (the atlas is never written).")
    elif ns.path:
        st.caption(f"Concept names from `{ns.path}` (read-only).")
    if not ns.editable and not ns.error:
        st.caption(enable_hint(data))
    if ns.editable:
        with st.expander("Meeting notes"):
            st.text_area("Notes about this atlas (in the report)", value=ns.notes.note if ns.notes else "",
                         max_chars=nm.NOTE_MAX, key="notes_atlas")
            st.button("Save notes", key="notes_atlas_save", on_click=_save_atlas_note, args=(data,))
            _message("atlas")
    elif ns.notes and ns.notes.note:
        with st.expander("Meeting notes"):
            st.text(ns.notes.note)
    st.download_button(":material/download: Meeting report (HTML)", key="dl_report", on_click="ignore",
                       data=lambda: build_report(data.path, _CURRENT.notes, sha256=_CURRENT.sha256 or None).encode(),
                       file_name=f"{data.path.stem}-report.html", mime="text/html",
                       help="One self-contained HTML file: cohort, method, every concept with its name, notes, "
                            "prototypes, composition and fidelity, example slides. Prints to PDF from a browser.")


def _message(where: str) -> None:
    kind, text = st.session_state.pop(f"_notes_msg_{where}", (None, ""))
    if kind == "ok":
        st.success(text, icon=":material/check:")
    elif kind == "error":  # quotes what was typed: plain text, never markdown
        st.error("Not saved.")
        st.code(text, language=None, wrap_lines=True)


def _save_atlas_note(data: AtlasData) -> None:
    ns = _CURRENT
    try:
        nm.save_atlas_note(ns.path, data.path, ns.sha256, data.k, st.session_state.get("notes_atlas", ""))
        st.session_state["_notes_msg_atlas"] = ("ok", f"Saved to {ns.path}.")
    except (nm.NotesError, OSError) as exc:
        st.session_state["_notes_msg_atlas"] = ("error", str(exc))


def _save_concept(data: AtlasData, k: int) -> None:
    ns = _CURRENT
    try:
        nm.save_concept(ns.path, data.path, ns.sha256, data.k, k, st.session_state.get(f"notes_name_{k}", ""),
                        st.session_state.get(f"notes_text_{k}", ""))
        st.session_state[f"_notes_msg_{k}"] = ("ok", f"Saved to {ns.path}.")
    except (nm.NotesError, OSError) as exc:
        st.session_state[f"_notes_msg_{k}"] = ("error", str(exc))


def concept_editor(data: AtlasData, k: int) -> None:
    """Name and notes of 0-based concept k: a form when editable, else the text and how to enable editing."""
    ns = _CURRENT
    notes = ns.notes
    name, note = (notes.name(k), notes.concept_note(k)) if notes else ("", "")
    with st.expander(f"Name and notes of C{k + 1}" + (f": {name}" if name else ""), expanded=ns.editable):
        if ns.editable:
            with st.form(key=f"notes_form_{k}", border=False):
                st.text_input("Name (shown instead of the number on every page)", value=name,
                              max_chars=nm.NAME_MAX, key=f"notes_name_{k}", placeholder="e.g. tumour epithelium",
                              help="Letters, digits, spaces and . , : ; - ' ( ) / + % ?")
                st.text_area("Notes", value=note, max_chars=nm.NOTE_MAX, key=f"notes_text_{k}",
                             placeholder="e.g. artefact: pen ink; check on the next batch")
                st.form_submit_button("Save name and notes", on_click=_save_concept, args=(data, k))
            _message(str(k))
            return
        if ns.error:
            st.caption("Concept names are not used (see the sidebar).")
        if name or note:
            st.text(f"Name: {name or '(none)'}")
            if note:
                st.text(note)
        st.caption(enable_hint(data))
