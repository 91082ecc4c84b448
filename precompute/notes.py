"""Concept names and meeting notes: a small JSON file beside the atlas, never inside it.

The atlas is read-only evidence; what the team decides in a review meeting ("C3 is tumour
epithelium", "C5: pen ink artefact") lives in `ATLAS.notes.json` (default name: the atlas file name
plus `.notes.json`). The file records the sha256 of the atlas it belongs to, so names never land on
the concepts of a different (e.g. rebuilt) atlas. Writes are atomic (temporary file + rename).

Layout (version 1)::

    {"format": "lumen-notes", "version": 1,
     "atlas": {"file": "atlas.h5", "sha256": "...", "k": 6, "size": 123, "mtime_ns": 456},
     "updated_utc": "2026-11-29T15:00:00+00:00",
     "note": "free text about the whole atlas",
     "concepts": {"3": {"name": "tumour epithelium", "note": "free text"}, ...}}   # 1-based keys

Names are short labels shown in charts, tables, CSV files, the terminal and HTML, so they are
restricted to letters, digits, spaces and `. , : ; - ' ( ) / + % ?`, at most NAME_MAX characters,
and may not begin with a character a spreadsheet reads as a formula. Notes are free text (no
control characters except new lines and tabs); everything that shows them escapes them.
No torch, no streamlit.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_path
from .hashing import sha256_file

FORMAT = "lumen-notes"
VERSION = 1
SUFFIX = ".notes.json"
NAME_MAX = 60
NOTE_MAX = 4000
NAME_PUNCT = set(" .,:;-'()/+%?")
FORMULA_START = ("=", "+", "-", "@")
_WRITE_LOCK = threading.Lock()  # one dashboard process serves many sessions; saves are read-modify-write


class NotesError(Exception):
    """The notes file cannot be used; the message says which file, what is wrong and what to do."""


@dataclass
class ConceptNote:
    name: str = ""
    note: str = ""


@dataclass
class Notes:
    """Names and notes of one atlas's K concepts (0-based keys here, 1-based in the file)."""

    atlas_sha256: str
    k: int
    atlas_file: str = ""
    atlas_size: int = -1      # the atlas's size and mtime when its sha256 was taken: while they match,
    atlas_mtime_ns: int = -1  # the recorded sha256 is reused instead of reading the whole file again
    note: str = ""
    updated_utc: str = ""
    concepts: dict[int, ConceptNote] = field(default_factory=dict)

    def name(self, k: int) -> str:
        c = self.concepts.get(int(k))
        return c.name if c else ""

    def concept_note(self, k: int) -> str:
        c = self.concepts.get(int(k))
        return c.note if c else ""


def default_path(atlas: str | os.PathLike) -> Path:
    """ATLAS.notes.json beside the atlas (like ATLAS.parts/ and ATLAS.log.jsonl)."""
    atlas = Path(atlas)
    return atlas.with_name(atlas.name + SUFFIX)


def atlas_digest(atlas: str | os.PathLike, notes_path: str | os.PathLike | None = None) -> str:
    """sha256 of the atlas. When the notes file at `notes_path` recorded it together with the atlas's
    size and modification time and both still match (an atlas is replaced by rename, never edited in
    place), that value is reused: a stat instead of reading a multi-GB file at every start."""
    if notes_path is not None and Path(notes_path).is_file():
        try:
            rec = json.loads(Path(notes_path).read_text(encoding="utf-8")).get("atlas") or {}
            st = Path(atlas).stat()
            if rec.get("sha256") and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
                return str(rec["sha256"])
        except (OSError, ValueError, AttributeError):
            pass  # unreadable or damaged: hash the atlas; read_notes will report the file's problem
    return sha256_file(atlas)


def clean_name(text: str) -> str:
    """A valid concept name from user input (spaces collapsed), or NotesError saying what to change."""
    name = " ".join(str(text).split())
    if len(name) > NAME_MAX:
        raise NotesError(f"name {name[:NAME_MAX]!r}... is {len(name)} characters; keep it to {NAME_MAX} "
                         "(put the rest in the notes).")
    bad = sorted({c for c in name if not (c.isalnum() or c in NAME_PUNCT)})
    if bad:
        raise NotesError(f"name {name!r} contains {' '.join(repr(c) for c in bad)}; use letters, digits, spaces "
                         f"and {' '.join(sorted(NAME_PUNCT - {' '}))} (free text goes in the notes).")
    if name.startswith(FORMULA_START):
        raise NotesError(f"name {name!r} begins with {name[0]!r}, which spreadsheets read as a formula; "
                         "begin it with a letter or digit.")
    return name


def clean_note(text: str) -> str:
    """Free text without control characters (new lines and tabs kept), at most NOTE_MAX characters."""
    note = str(text).replace("\r\n", "\n").replace("\r", "\n").strip()
    if len(note) > NOTE_MAX:
        raise NotesError(f"the note is {len(note)} characters; keep it to {NOTE_MAX}.")
    bad = sorted({f"U+{ord(c):04X}" for c in note if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) < 0xa0})
    if bad:
        raise NotesError(f"the note contains control characters ({', '.join(bad)}); remove them.")
    return note


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _parse(raw: dict, path: Path) -> Notes:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise NotesError(f"{path}: not a Lumen notes file (no \"format\": \"{FORMAT}\"). Pass the notes file "
                         "written by the dashboard, or a new file name to start one.")
    if raw.get("version") != VERSION:
        raise NotesError(f"{path}: notes version {raw.get('version')!r}; this Lumen reads version {VERSION}.")
    atlas = raw.get("atlas") or {}
    try:
        k = int(atlas["k"])
        notes = Notes(atlas_sha256=str(atlas["sha256"]), k=k, atlas_file=str(atlas.get("file", "")),
                      atlas_size=int(atlas.get("size", -1)), atlas_mtime_ns=int(atlas.get("mtime_ns", -1)),
                      note=clean_note(raw.get("note", "")), updated_utc=str(raw.get("updated_utc", "")))
        for key, entry in (raw.get("concepts") or {}).items():
            j = int(key) - 1
            if not 0 <= j < k:
                raise NotesError(f"concept {key} is outside 1..{k}")
            notes.concepts[j] = ConceptNote(clean_name(entry.get("name", "")), clean_note(entry.get("note", "")))
    except NotesError as exc:
        raise NotesError(f"{path}: {exc}. Fix the file (it is JSON) or remove that entry.") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NotesError(f"{path}: damaged notes file ({type(exc).__name__}: {exc}). Fix it (it is JSON) or "
                         "move it away to start new notes.") from exc
    return notes


def read_notes(path: str | os.PathLike, *, atlas_sha256: str | None = None, k: int | None = None) -> Notes:
    """Read and check a notes file. With `atlas_sha256` / `k`, refuse notes made for another atlas."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotesError(f"{path}: no such notes file.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise NotesError(f"{path}: cannot read it as JSON ({exc}).") from exc
    notes = _parse(raw, path)
    if atlas_sha256 is not None and notes.atlas_sha256 != atlas_sha256:
        raise NotesError(f"{path} belongs to another atlas ({notes.atlas_file or '?'}, sha256 "
                         f"{notes.atlas_sha256[:12]}...; this atlas is {atlas_sha256[:12]}...). Its names would "
                         "label the wrong concepts: pass the notes file of this atlas, or a new file name.")
    if k is not None and notes.k != k:
        raise NotesError(f"{path} names {notes.k} concepts; this atlas has {k}.")
    return notes


def open_or_new(path: str | os.PathLike, atlas: str | os.PathLike, atlas_sha256: str, k: int) -> Notes:
    """The notes at `path` for this atlas, or empty notes when the file does not exist yet."""
    if Path(path).exists():
        notes = read_notes(path, atlas_sha256=atlas_sha256, k=k)
    else:
        notes = Notes(atlas_sha256=atlas_sha256, k=k, atlas_file=Path(atlas).name)
    st = Path(atlas).stat()
    notes.atlas_size, notes.atlas_mtime_ns = st.st_size, st.st_mtime_ns
    return notes


def to_json(notes: Notes) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "atlas": {"file": notes.atlas_file, "sha256": notes.atlas_sha256, "k": notes.k,
                      "size": notes.atlas_size, "mtime_ns": notes.atlas_mtime_ns},
            "updated_utc": notes.updated_utc, "note": notes.note,
            "concepts": {str(j + 1): {"name": c.name, "note": c.note}
                         for j, c in sorted(notes.concepts.items()) if c.name or c.note}}


def check_target(path: str | os.PathLike, atlas: str | os.PathLike) -> Path:
    """Refuse a notes path that is the atlas itself (the atlas is never written) or not a .json file."""
    path, atlas = Path(path), Path(atlas)
    if path.resolve() == atlas.resolve() or (path.exists() and atlas.exists() and path.samefile(atlas)):
        raise NotesError(f"--notes {path} is the atlas itself; the atlas is never written. Pass a notes file "
                         f"such as {default_path(atlas)}.")
    if path.suffix.lower() != ".json":
        raise NotesError(f"--notes {path}: give a .json file name, such as {default_path(atlas)}.")
    if path.is_dir():
        raise NotesError(f"--notes {path} is a folder; give a file name such as {default_path(atlas)}.")
    return path


def write_notes(path: str | os.PathLike, notes: Notes) -> None:
    """Write atomically (readers see the old or the new file, never half of one)."""
    notes.updated_utc = _now()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_json(notes), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_concept(path: str | os.PathLike, atlas: str | os.PathLike, atlas_sha256: str, k: int, concept: int,
                 name: str, note: str) -> Notes:
    """Set the name and note of 0-based `concept` (re-reading the file first, so that edits of other
    concepts made meanwhile are kept). Raises NotesError for invalid text. Returns the saved notes."""
    entry = ConceptNote(clean_name(name), clean_note(note))
    if not 0 <= concept < k:
        raise NotesError(f"concept {concept + 1} is outside 1..{k}.")
    with _WRITE_LOCK:
        notes = open_or_new(check_target(path, atlas), atlas, atlas_sha256, k)
        notes.concepts[concept] = entry
        write_notes(path, notes)
    return notes


def save_atlas_note(path: str | os.PathLike, atlas: str | os.PathLike, atlas_sha256: str, k: int,
                    note: str) -> Notes:
    """Set the free note about the whole atlas (same read-modify-write as save_concept)."""
    text = clean_note(note)
    with _WRITE_LOCK:
        notes = open_or_new(check_target(path, atlas), atlas, atlas_sha256, k)
        notes.note = text
        write_notes(path, notes)
    return notes


def labels(k: int, notes: Notes | None) -> list[str]:
    """Display labels of the K concepts: the name where one is set, else 'C1'..'CK'; a name that two
    concepts share (or that equals another concept's 'Cn') gets ' (Cn)' appended, so labels stay unique."""
    base = [f"C{j + 1}" for j in range(k)]
    names = [(notes.name(j) if notes else "") or base[j] for j in range(k)]
    seen: dict[str, int] = {}
    for n in names:
        seen[n.casefold()] = seen.get(n.casefold(), 0) + 1
    return [n if (n == base[j] or seen[n.casefold()] == 1) and n not in base[:j] + base[j + 1:]
            else f"{n} ({base[j]})" for j, n in enumerate(names)]


def resolve(atlas: str | os.PathLike, notes_path: str | os.PathLike | None, k: int,
            atlas_sha256: str | None = None) -> tuple[Notes | None, str]:
    """Notes for a read-only view (inspect, report): `notes_path` if given (errors raise NotesError),
    else the default file beside the atlas when it exists and belongs to it. Returns (notes or None,
    a line saying where the names come from or why the default file was ignored; '' when none)."""
    if notes_path is not None:
        sha = atlas_sha256 or atlas_digest(atlas, notes_path)
        return read_notes(notes_path, atlas_sha256=sha, k=k), f"names and notes from {notes_path}"
    default = default_path(atlas)
    if not default.exists():
        return None, ""
    try:
        sha = atlas_sha256 or atlas_digest(atlas, default)
        return read_notes(default, atlas_sha256=sha, k=k), f"names and notes from {default}"
    except NotesError as exc:
        return None, f"ignored {default}: {exc}"
