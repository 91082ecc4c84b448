"""Cohorts from manifests and folders, and manifest mistakes reported with the row to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import real_data
from generated import write_slide
from precompute.cohort import SLIDE_SUFFIXES, CohortError, SlideRecord, load_cohort

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLIDES = DATA / "slides"


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A generated slide file (its content does not matter to a manifest)."""
    return write_slide(tmp_path_factory.mktemp("cohort") / "gen-1.svs", seed=0, width=256, height=256)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- real cohorts --------------------------------------------------------------------------------

@real_data
def test_breakhis_manifest():
    recs = load_cohort(DATA / "cohort" / "breakhis" / "manifest.csv")
    assert len(recs) == 32
    assert {r.diagnosis for r in recs} == {"benign", "malignant"}
    assert len({r.patient for r in recs}) == 8
    assert len({r.meta["subtype"] for r in recs}) == 8
    assert all(set(r.meta) == {"subtype"} for r in recs)
    assert all(r.mpp is None for r in recs)  # BreakHis has no pixel size: it must come from the user
    first = recs[0]
    assert first.slide_id == "SOB_B_A-14-22549AB-100-001"
    assert first.path == DATA.resolve() / "cohort" / "breakhis" / "SOB_B_A-14-22549AB-100-001.png"
    assert first.path.is_absolute() and first.path.is_file()
    assert (first.diagnosis, first.patient, first.meta["subtype"]) == ("benign", "22549AB", "adenosis")
    assert len({r.slide_id for r in recs}) == 32


@real_data
def test_kather_manifest_has_pixel_size():
    recs = load_cohort(DATA / "tiles" / "kather-crc" / "manifest.csv")
    assert len(recs) == 32
    assert all(r.mpp == 0.5 for r in recs)
    assert {r.diagnosis for r in recs} == {"adipose", "debris", "lymphocytes", "mucus", "smooth_muscle",
                                           "normal_mucosa", "stroma", "tumour_epithelium"}
    # The class is also the file-name prefix.
    assert all(r.path.name.startswith(r.slide_id.split("-")[0]) for r in recs)
    assert all(r.patient is None and r.meta == {} for r in recs)


@real_data
def test_folder_source_lists_slides_sorted_by_name():
    recs = load_cohort(SLIDES)
    assert [r.slide_id for r in recs] == ["CMU-1-Small-Region", "boxes", "kidney-48-5", "small"]
    assert all(r.path.is_absolute() and r.diagnosis is None and r.mpp is None for r in recs)
    assert recs[0].path == (SLIDES / "CMU-1-Small-Region.svs").resolve()


def test_folder_skips_non_slides_hidden_files_and_subfolders(tmp_path):
    (tmp_path / "a.SVS").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "._a.svs").write_bytes(b"x")  # macOS metadata file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.svs").write_bytes(b"x")
    assert [r.slide_id for r in load_cohort(tmp_path)] == ["a", "b"]


def test_folder_with_clashing_stems(tmp_path):
    (tmp_path / "s1.svs").write_bytes(b"x")
    (tmp_path / "s1.tif").write_bytes(b"x")
    with pytest.raises(CohortError) as err:
        load_cohort(tmp_path)
    assert "s1.svs" in str(err.value) and "s1.tif" in str(err.value)


def test_empty_folder(tmp_path):
    with pytest.raises(CohortError, match="no slide files"):
        load_cohort(tmp_path)


def test_single_slide_file_is_a_cohort_of_one(slide):
    (rec,) = load_cohort(slide)
    assert rec == SlideRecord("gen-1", slide.resolve(), None, None, None, {})


def test_slide_suffixes_are_lowercase_with_dot():
    assert all(s.startswith(".") and s == s.lower() for s in SLIDE_SUFFIXES)
    assert {".svs", ".ndpi", ".mrxs", ".tiff", ".png", ".jpg"} <= set(SLIDE_SUFFIXES)


# -- manifests written by users ------------------------------------------------------------------

def test_relative_and_absolute_paths_bom_spaces_and_extra_columns(tmp_path, slide):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_bytes(("\ufeffSlide_ID , Path ,Diagnosis,MPP,patient,site\n"
                   " a , img/a.png , tumour , 0.25 , p1 , colon \n"
                   f"cmu,{slide},, ,,\n"
                   "\n").encode("utf-8"))
    a, cmu = load_cohort(m)
    assert a == SlideRecord("a", (tmp_path / "img" / "a.png").resolve(), "tumour", 0.25, "p1", {"site": "colon"})
    assert cmu.path == slide.resolve() and cmu.diagnosis is None and cmu.mpp is None and cmu.patient is None
    assert cmu.meta == {"site": ""}


def test_semicolon_manifest_with_decimal_comma(tmp_path, slide):
    m = write(tmp_path / "m.csv", f"slide_id;path;mpp\ncmu;{slide};0,499\n")
    assert load_cohort(m)[0].mpp == pytest.approx(0.499)


@pytest.mark.parametrize("rows, said, not_said", [
    ("slide_id,path\na,{slide}\nb,{slide}\na,{slide}\n", ("m.csv", "rows 2 and 4", "'a'"), ()),
    ("slide_id,path,diagnosis\nok,{slide},x\ngone,slides/gone.svs,y\n", ("row 3", "{folder}/slides/gone.svs"),
     ("row 2",)),
    ("id,file,diagnosis\na,{slide},x\n", ("row 1", "slide_id, path", "id, file, diagnosis"), ()),
], ids=["duplicate ids name both rows", "missing file names its row and resolved path", "missing required columns"])
def test_manifest_error_names_the_rows(tmp_path, slide, rows, said, not_said):
    m = write(tmp_path / "m.csv", rows.format(slide=slide))
    with pytest.raises(CohortError) as err:
        load_cohort(m)
    msg = str(err.value)
    assert all(s.format(folder=tmp_path) in msg for s in said) and not any(s in msg for s in not_said), msg


def test_empty_manifest(tmp_path):
    with pytest.raises(CohortError, match=r"only a header \(row 1\)"):
        load_cohort(write(tmp_path / "header_only.csv", "slide_id,path,diagnosis\n"))
    with pytest.raises(CohortError, match="empty file"):
        load_cohort(write(tmp_path / "zero.csv", ""))


def test_bad_mpp_values_name_their_rows(tmp_path):
    for name in "abcde":
        (tmp_path / f"{name}.png").write_bytes(b"x")  # one file per row: two rows may not share a file
    m = write(tmp_path / "m.csv", "slide_id,path,mpp\na,a.png,0.5\nb,b.png,abc\nc,c.png,-1\nd,d.png,0\ne,e.png,\n")
    with pytest.raises(CohortError) as err:
        load_cohort(m)
    msg = str(err.value)
    assert "4 problems" not in msg and "3 problems" in msg
    assert "row 3: mpp 'abc' is not a number" in msg
    assert "row 4: mpp '-1'" in msg and "row 5: mpp '0'" in msg
    assert "row 2" not in msg and "row 6" not in msg


def test_empty_slide_id_and_path_and_ragged_row(tmp_path, slide):
    m = write(tmp_path / "m.csv", f"slide_id,path\n,{slide}\nb,\nc,{slide},extra\nd/e,{slide}\n")
    with pytest.raises(CohortError) as err:
        load_cohort(m)
    msg = str(err.value)
    assert "row 2: empty slide_id" in msg
    assert "row 3: empty path" in msg
    assert "row 4: 3 values" in msg
    assert "row 5: slide_id 'd/e'" in msg


def test_all_problems_reported_at_once(tmp_path):
    m = write(tmp_path / "m.csv", "slide_id,path,mpp\n" + "".join(f"s{i},missing{i}.svs,\n" for i in range(30)))
    with pytest.raises(CohortError) as err:
        load_cohort(m)
    msg = str(err.value)
    assert "30 problems" in msg and "row 2:" in msg and "and 10 more" in msg


def test_non_utf8_manifest(tmp_path, slide):
    m = tmp_path / "latin1.csv"
    m.write_bytes(f"slide_id,path,diagnosis\na,{slide},carcinome épidermoïde\n".encode("latin-1"))
    with pytest.raises(CohortError, match="UTF-8"):
        load_cohort(m)


def test_nonexistent_source(tmp_path):
    with pytest.raises(CohortError, match="not found"):
        load_cohort(tmp_path / "nope.csv")
