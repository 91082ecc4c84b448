"""Concept names and notes: the notes file beside the atlas (precompute/notes.py) and `inspect`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from precompute import notes as nm
from tiny_atlas import REPO, cli_env, tiny_atlas  # noqa: F401  (tiny_atlas is a fixture)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "precompute", "inspect", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=cli_env())


@pytest.fixture
def fake_atlas(tmp_path) -> Path:
    """Any file stands in for the atlas here: the notes module only hashes it."""
    p = tmp_path / "atlas.h5"
    p.write_bytes(b"not really an atlas" * 100)
    return p


@pytest.mark.parametrize("text", ["tumour epithelium", "artefact: pen ink", "Tumör (grade 2)", "C-rich 5%"])
def test_plain_names_are_accepted(text):
    assert nm.clean_name(f"  {text} ") == text


@pytest.mark.parametrize("text, why", [("=HYPERLINK(\"x\")", "contains"), ("+1 tumour", "formula"),
                                       ("-tumour", "formula"), ("@sum", "contains"),
                                       ("<script>alert(1)</script>", "contains"), ("[bold red]x[/]", "contains"),
                                       ("**bold**", "contains"), ("a" * 61, "keep it to 60"), ("a\nb\x07", "contains")])
def test_names_that_would_act_as_markup_or_formulas_are_refused(text, why):
    with pytest.raises(nm.NotesError, match=why.replace("(", r"\(")):
        nm.clean_name(text)


def test_notes_keep_free_text_but_no_control_characters():
    assert nm.clean_note("line 1\n<b>=1+1</b>\tend") == "line 1\n<b>=1+1</b>\tend"
    with pytest.raises(nm.NotesError, match="control characters"):
        nm.clean_note("bell \x07")


def test_save_and_read_back_without_touching_the_atlas(fake_atlas):
    before = sha(fake_atlas)
    path = nm.default_path(fake_atlas)
    assert path.name == "atlas.h5.notes.json"
    nm.save_concept(path, fake_atlas, before, 4, 2, "tumour epithelium", "seen on\nall slides")
    nm.save_concept(path, fake_atlas, before, 4, 0, "artefact: pen ink", "")
    nm.save_atlas_note(path, fake_atlas, before, 4, "meeting of 29 Nov")
    raw = json.loads(path.read_text())
    assert raw["format"] == "lumen-notes" and raw["version"] == 1
    assert raw["atlas"] == {"file": "atlas.h5", "sha256": before, "k": 4, "size": fake_atlas.stat().st_size,
                            "mtime_ns": fake_atlas.stat().st_mtime_ns}
    assert raw["concepts"]["3"] == {"name": "tumour epithelium", "note": "seen on\nall slides"}
    notes = nm.read_notes(path, atlas_sha256=before, k=4)
    assert nm.labels(4, notes) == ["artefact: pen ink", "C2", "tumour epithelium", "C4"]
    assert notes.note == "meeting of 29 Nov"
    assert sha(fake_atlas) == before
    assert sorted(p.name for p in fake_atlas.parent.iterdir()) == ["atlas.h5", "atlas.h5.notes.json"]  # no temp left


def test_a_save_keeps_what_another_session_saved_meanwhile(fake_atlas):
    path, digest = fake_atlas.with_name("n.json"), sha(fake_atlas)
    nm.save_concept(path, fake_atlas, digest, 3, 0, "stroma", "")
    nm.save_concept(path, fake_atlas, digest, 3, 1, "fat", "")  # as another browser would
    assert nm.labels(3, nm.read_notes(path)) == ["stroma", "fat", "C3"]


def test_the_recorded_sha256_is_reused_only_while_the_atlas_is_unchanged(fake_atlas):
    path, digest = nm.default_path(fake_atlas), sha(fake_atlas)
    nm.save_concept(path, fake_atlas, digest, 3, 0, "stroma", "")
    raw = json.loads(path.read_text())
    assert raw["atlas"]["size"] == fake_atlas.stat().st_size
    assert nm.atlas_digest(fake_atlas, path) == digest
    raw["atlas"]["sha256"] = "f" * 64  # proves the record, not the file, answered while size and mtime match
    path.write_text(json.dumps(raw))
    assert nm.atlas_digest(fake_atlas, path) == "f" * 64
    fake_atlas.write_bytes(fake_atlas.read_bytes())  # rewritten: new mtime, so the file is hashed again
    os.utime(fake_atlas, ns=(1, raw["atlas"]["mtime_ns"] + 1))
    assert nm.atlas_digest(fake_atlas, path) == digest


def test_labels_stay_unique():
    notes = nm.Notes(atlas_sha256="x", k=4, concepts={0: nm.ConceptNote("tumour"), 1: nm.ConceptNote("Tumour"),
                                                      2: nm.ConceptNote("C4")})
    assert nm.labels(4, notes) == ["tumour (C1)", "Tumour (C2)", "C4 (C3)", "C4"]


def test_notes_of_another_atlas_or_k_are_refused(fake_atlas, tmp_path):
    path = tmp_path / "n.json"
    nm.save_concept(path, fake_atlas, sha(fake_atlas), 3, 0, "stroma", "")
    with pytest.raises(nm.NotesError, match="belongs to another atlas"):
        nm.read_notes(path, atlas_sha256="0" * 64)
    with pytest.raises(nm.NotesError, match="names 3 concepts; this atlas has 5"):
        nm.read_notes(path, k=5)


@pytest.mark.parametrize("content, why", [("{", "cannot read it as JSON"), ('{"format": "x"}', "not a Lumen notes"),
                                          ('{"format": "lumen-notes", "version": 9}', "version 9"),
                                          ('{"format": "lumen-notes", "version": 1, "atlas": {}}', "damaged")])
def test_broken_notes_files_say_what_is_wrong(tmp_path, content, why):
    path = tmp_path / "n.json"
    path.write_text(content)
    with pytest.raises(nm.NotesError, match=why):
        nm.read_notes(path)


def test_the_atlas_itself_is_never_a_notes_target(fake_atlas):
    with pytest.raises(nm.NotesError, match="is the atlas itself"):
        nm.save_concept(fake_atlas, fake_atlas, sha(fake_atlas), 3, 0, "x", "")
    with pytest.raises(nm.NotesError, match=".json"):
        nm.check_target(fake_atlas.with_name("notes.h5"), fake_atlas)


def test_inspect_shows_names_from_the_default_notes_file(tiny_atlas, tmp_path):
    atlas = tmp_path / "a.h5"
    atlas.write_bytes(tiny_atlas.read_bytes())
    assert "tumour epithelium" not in inspect(str(atlas)).stdout
    nm.save_concept(nm.default_path(atlas), atlas, sha(atlas), 3, 1, "tumour epithelium", "[bold]kept as typed[/]")
    proc = inspect(str(atlas))
    assert proc.returncode == 0, proc.stderr
    assert "names and notes from" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("2 "))
    assert "tumour epithelium" in line
    assert "[bold]kept as typed[/]" in proc.stdout  # printed as typed, not read as markup
    data = json.loads(inspect(str(atlas), "--json").stdout)
    assert data["clusters"]["nmf"][1]["name"] == "tumour epithelium"


def test_inspect_refuses_notes_of_another_atlas(tiny_atlas, tmp_path, fake_atlas):
    other = tmp_path / "other.notes.json"
    nm.save_concept(other, fake_atlas, sha(fake_atlas), 3, 0, "stroma", "")
    proc = inspect(str(tiny_atlas), "--notes", str(other))
    assert proc.returncode == 2
    assert "belongs to another atlas" in proc.stdout + proc.stderr
    # a default file of another atlas is ignored with a line saying so, not an error
    copy = tmp_path / "c.h5"
    copy.write_bytes(tiny_atlas.read_bytes())
    os.replace(other, nm.default_path(copy))
    proc = inspect(str(copy))
    assert proc.returncode == 0 and "ignored" in proc.stdout and "stroma" not in proc.stdout
