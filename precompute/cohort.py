"""A cohort of slides from a folder or a manifest CSV, checked before any work starts.

Folder: every file directly inside it whose suffix is in SLIDE_SUFFIXES (case-insensitive), sorted by
name; slide_id = file stem. Hidden files (name starting with ".", e.g. macOS "._x.svs"), other suffixes,
sub-folders and non-regular files are skipped; `folder_skips` lists them with the reason.

Manifest CSV (UTF-8, Excel's BOM accepted; comma, semicolon or tab separated): required columns
`slide_id,path`; optional `diagnosis`, `mpp` (um/px), `patient`; any other column is kept as metadata.
Column names are matched case-insensitively. Relative paths resolve against the manifest's folder.
Every problem found (missing columns, empty or duplicate ids, missing files, symlink loops, FIFOs or
devices instead of files, an mpp outside the plausible range, two rows naming the same file) is reported
at once in one CohortError, with rows numbered as a spreadsheet shows them (header = row 1).
A single slide file (a slide suffix, or TIFF content under another suffix) is accepted as a cohort of one.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

PLAUSIBLE_MPP = (0.05, 20.0)  # um/px; 0.05 is beyond any optical scanner, 20 is a 0.5x overview

SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                                   ".svslide", ".bif", ".dcm", ".qptiff", ".png", ".jpg", ".jpeg")
REQUIRED_COLUMNS = ("slide_id", "path")
KNOWN_COLUMNS = REQUIRED_COLUMNS + ("diagnosis", "mpp", "patient")
_MAX_LISTED = 20  # problems listed in one error; the rest are counted


@dataclass(frozen=True)
class SlideRecord:
    """One slide of the cohort. mpp is the manifest's value in um/px (None if not given)."""

    slide_id: str
    path: Path                 # absolute
    diagnosis: str | None
    mpp: float | None          # manifest override, um/px
    patient: str | None
    meta: dict[str, str] = field(default_factory=dict, hash=False)  # every other manifest column, by header


class CohortError(ValueError):
    """The cohort cannot be used as given; the message names the file and the rows to fix."""


def load_cohort(source: Path) -> list[SlideRecord]:
    """Folder, manifest CSV or single slide file -> slide records (folder: sorted by name; CSV: file order)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise CohortError(f"{source}: not found; pass a folder of slides or a manifest CSV.")
    if source.is_dir():
        return _from_folder(source.resolve())
    if not source.is_file():
        raise CohortError(f"{source}: not a regular file (a FIFO, socket or device); pass a folder of slides, "
                          f"a manifest CSV or a slide file.")
    if source.suffix.lower() in SLIDE_SUFFIXES or _looks_like_tiff(source):
        return [SlideRecord(source.stem, source.resolve(), None, None, None, {})]
    return _from_manifest(source.resolve())


def _looks_like_tiff(path: Path) -> bool:
    """True for TIFF/BigTIFF content (its magic bytes), whatever the suffix."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def folder_skips(folder: Path) -> list[tuple[str, str]]:
    """(name, reason) of every entry of a folder cohort that is not taken as a slide, sorted by name."""
    skipped = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            reason = "hidden file"
        elif p.is_dir():
            reason = "sub-folder (sub-folders are not searched)"
        elif not p.is_file():
            reason = "not a regular file (a FIFO, socket, device or broken link)"
        elif p.suffix.lower() not in SLIDE_SUFFIXES:
            reason = f"suffix {p.suffix or '(none)'!r} is not a slide suffix"
        else:
            continue
        skipped.append((p.name, reason))
    return skipped


def _from_folder(folder: Path) -> list[SlideRecord]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES)
    if not files:
        raise CohortError(f"{folder}: no slide files (suffixes {' '.join(SLIDE_SUFFIXES)}) directly in this "
                          f"folder; sub-folders are not searched. Pass the folder that holds the slides, "
                          f"or a manifest CSV.")
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    clashes = [names for names in by_stem.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(p.name for p in names) for names in clashes)
        raise CohortError(f"{folder}: several files would get the same slide_id (the name without suffix): "
                          f"{listed}. Rename or move one of each, or use a manifest CSV with distinct slide_ids.")
    return [SlideRecord(p.stem, p, None, None, None, {}) for p in files]


def _from_manifest(manifest: Path) -> list[SlideRecord]:
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CohortError(f"{manifest}: not UTF-8 text (byte {exc.start}); save it as 'CSV UTF-8'.") from None
    except OSError as exc:
        raise CohortError(f"{manifest}: cannot be read ({exc.strerror}).") from None
    first = text.split("\n", 1)[0]
    # Excel in many locales writes ';'; tab-separated exports are common too.
    delimiter = "," if "," in first else ";" if ";" in first else "\t" if "\t" in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise CohortError(f"{manifest}: not a readable CSV near line {reader.line_num} ({exc}); "
                          f"save it again as CSV from the spreadsheet.") from None
    if not rows or not any(c.strip() for c in rows[0]):
        raise CohortError(f"{manifest}: empty file; the first row must be a header with at least "
                          f"{','.join(REQUIRED_COLUMNS)}.")
    header = [c.strip() for c in rows[0]]
    columns = _columns(manifest, header)
    base = manifest.parent
    problems: list[str] = []
    records: list[SlideRecord] = []
    first_row_of: dict[str, int] = {}
    rows_of: list[int] = []  # manifest row of each record
    for number, cells in enumerate(rows[1:], start=2):  # spreadsheet numbering: header is row 1
        cells = [c.strip() for c in cells]
        if not any(cells):
            continue  # blank line
        extra = [c for c in cells[len(header):] if c]
        if extra:
            problems.append(f"row {number}: {len(cells)} values but the header has {len(header)} columns")
            continue
        cells += [""] * (len(header) - len(cells))
        values = {name: cells[i] for name, i in columns.items()}
        sid = values["slide_id"]
        if sid and sid in first_row_of:
            problems.append(f"rows {first_row_of[sid]} and {number}: duplicate slide_id {sid!r}")
            continue
        first_row_of.setdefault(sid, number)
        rec = _record(values, number, base, problems)
        if rec is not None:
            records.append(rec)
            rows_of.append(number)
    _same_files(records, rows_of, problems)
    if problems:
        listed = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CohortError(f"{manifest}: {len(problems)} problem{'s' if len(problems) > 1 else ''} to fix "
                          f"(rows numbered as in a spreadsheet, header = row 1):\n  " + "\n  ".join(listed) + more)
    if not records:
        raise CohortError(f"{manifest}: only a header (row 1) and no slides; add one row per slide below it.")
    return records


def _same_files(records: list[SlideRecord], rows: list[int], problems: list[str]) -> None:
    """Two ids for one file (same path, or links to one file) would put its tiles in two CV folds."""
    first: dict[tuple[int, int], int] = {}
    for i, rec in enumerate(records):
        try:
            st = rec.path.stat()
        except OSError:
            continue
        j = first.setdefault((st.st_dev, st.st_ino), i)
        if j != i:
            problems.append(f"rows {rows[j]} and {rows[i]}: slide_ids {records[j].slide_id!r} and {rec.slide_id!r} "
                            f"name the same file {rec.path}; its tiles would count twice (and sit in two "
                            f"cross-validation folds). Keep one of the rows.")


def _columns(manifest: Path, header: list[str]) -> dict[str, int]:
    """Header -> {column name: index}; known columns under their lowercase name, others as written."""
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        if not name:
            continue  # unnamed column (often trailing commas from Excel); its values are ignored
        key = name.lower() if name.lower() in KNOWN_COLUMNS else name
        if key in columns:
            raise CohortError(f"{manifest}: column {name!r} appears twice in the header (row 1); keep one.")
        columns[key] = i
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise CohortError(f"{manifest}: header (row 1) lacks the required column{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}; found {', '.join(h for h in header if h) or 'nothing'}. "
                          f"The header must name at least slide_id,path (plus diagnosis, mpp, patient if known).")
    return columns


def _row_path(raw_path: str, number: int, base: Path, problems: list[str]) -> Path | None:
    """A row's path, absolute and checked to be a regular file; None after appending what is wrong."""
    if not raw_path:
        problems.append(f"row {number}: empty path")
        return None
    try:
        path = Path(raw_path).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        exists = path.exists()
    except RuntimeError:  # Path.resolve: "Symlink loop from ..."
        problems.append(f"row {number}: path {raw_path!r} is a symbolic link that loops back on itself; "
                        f"point it at the slide file")
        return None
    except (OSError, ValueError) as exc:  # e.g. a NUL byte or an over-long name
        problems.append(f"row {number}: path {raw_path!r} is not a usable file path ({exc})")
        return None
    if not exists:
        problems.append(f"row {number}: file not found: {path}" +
                        ("" if Path(raw_path).is_absolute() else f" (path {raw_path!r} taken relative to {base})"))
    elif path.is_dir():
        problems.append(f"row {number}: {path} is a folder, not a slide file")
    elif not path.is_file():
        problems.append(f"row {number}: {path} is not a regular file (a FIFO, socket or device); "
                        f"give the slide file itself")
    else:
        return path
    return None


def _record(values: dict[str, str], number: int, base: Path, problems: list[str]) -> SlideRecord | None:
    """One manifest row -> SlideRecord, or None after appending what is wrong with it to `problems`."""
    ok = True
    slide_id = values["slide_id"]
    if not slide_id:
        problems.append(f"row {number}: empty slide_id")
        ok = False
    elif any(ch in slide_id for ch in "/\\\0"):
        # Ids name per-slide output files, so they must not contain path separators.
        problems.append(f"row {number}: slide_id {slide_id!r} contains '/' or '\\'; use a plain name")
        ok = False
    path = _row_path(values["path"], number, base, problems)
    ok = ok and path is not None
    mpp = None
    raw_mpp = values.get("mpp", "")
    if raw_mpp:
        try:
            mpp = float(raw_mpp.replace(",", "."))  # decimal comma from European spreadsheets
        except ValueError:
            problems.append(f"row {number}: mpp {raw_mpp!r} is not a number (um/px, e.g. 0.5); "
                            f"leave it empty if unknown")
            ok = False
        else:
            if not (math.isfinite(mpp) and mpp > 0):
                problems.append(f"row {number}: mpp {raw_mpp!r} must be a positive number of um/px (e.g. 0.5)")
                ok = False
            elif not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
                problems.append(f"row {number}: mpp {raw_mpp!r} um/px is outside the plausible range "
                                f"{PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} (0.25 for 40x, 0.5 for 20x); check the "
                                f"unit (um per pixel, not nm or mm)")
                ok = False
    if not ok:
        return None
    meta = {k: v for k, v in values.items() if k not in KNOWN_COLUMNS}
    return SlideRecord(slide_id, path, values.get("diagnosis") or None, mpp, values.get("patient") or None, meta)
