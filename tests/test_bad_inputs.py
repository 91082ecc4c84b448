"""Hostile, odd and broken inputs to the command line: each gets a clear message and a documented exit
code (README's table), never a traceback, and the good slides of the same cohort still reach the atlas.

Every input is generated: tiny pyramidal TIFFs (tests/generated.py), a tiny seeded model given as
`package.module:factory` from a temporary module on PYTHONPATH, manifests, model files. Most cases run
the CLI in this process (one torch import for the module); faults that need their own process (SIGKILL,
file-size limits, read-only and full filesystems, a second run holding the lock) run it as a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import DATA, REPO
from generated import slide_pixels, write_disc_slide

MODEL_SOURCE = textwrap.dedent('''
    import torch
    from precompute.models import ModelSpec

    class _Net(torch.nn.Module):
        """Two strided convolutions (8 channels, 4 x 4 cells for a 32 px tile) and a 2-class head."""

        def __init__(self, oom=False):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 2, stride=2), torch.nn.ReLU())
            self.head = torch.nn.Linear(8, 2)
            self.oom = oom

        def forward(self, x):
            if self.oom and x.shape[0] > 1:  # the dry runs use one tile; real batches hit the host limit
                torch.empty(1 << 50, dtype=torch.uint8)
            return self.head(self.body(x).mean(dim=(2, 3)))

    def _spec(name):
        return ModelSpec(name=name, input_px=32, class_names=("benign", "malignant"), default_layer="body.3")

    def tiny():
        return _Net(), _spec("tiny")

    def tiny_oom():
        return _Net(oom=True), _spec("tiny_oom")
''')

SCRIPT_MARK = "LUMEN-TEST-SETSTATE-RAN"


class _Evil(torch.nn.Module):
    """A TorchScript module whose __setstate__ runs (and prints a mark) when the archive is loaded."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.note = "x"

    def forward(self, x):
        return self.conv(x)

    @torch.jit.export
    def __getstate__(self):
        return (self.note, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        print("LUMEN-TEST-SETSTATE-RAN")
        self.note = state[0]
        self.training = state[1]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Folder with the model module, three good slides and helpers; the module is importable."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "lumen_bad_inputs_model.py").write_text(MODEL_SOURCE)
    sys.path.insert(0, str(root))
    _KIT.append(root)
    for i in range(3):
        write_disc_slide(root / f"good{i}.tif", seed=i)
    yield root
    sys.path.remove(str(root))
    _KIT.remove(root)


_KIT: list[Path] = []  # the kit folder while the module runs, for subprocesses' PYTHONPATH


MODEL = "lumen_bad_inputs_model:tiny"
FAST = ("--k", "2", "--k-grid", "", "--workers", "0", "--no-progress", "--calib-tiles", "8")


def manifest(folder: Path, rows: list[tuple], header: str = "slide_id,path,diagnosis") -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def good_rows(kit: Path) -> list[tuple]:
    return [(f"good{i}", kit / f"good{i}.tif", "benign" if i % 2 else "malignant") for i in range(3)]


def cli(*args: str) -> tuple[int, str]:
    """Run `python -m precompute ARGS` in this process: (exit code, everything printed).
    Any exception other than the CLI's own exit is a traceback a user would see: the test fails."""
    from precompute import cli as cli_module

    buf = io.StringIO()
    old_file = cli_module.console.file
    cli_module.console.file = buf
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                cli_module.app(list(map(str, args)), prog_name="precompute", standalone_mode=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        cli_module.console.file = old_file
    return code, " ".join(buf.getvalue().split())  # rich wraps long lines: compare on single spaces


def cli_process(*args: str, preexec=None, prefix: tuple[str, ...] = (), timeout: float = 600
                ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *map(str, _KIT)])}
    return subprocess.run([*prefix, sys.executable, "-m", "precompute", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=preexec)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "most recent call" not in text and "╭─" not in text, text


def statuses(atlas: Path) -> dict[str, str]:
    from precompute.store import Atlas

    with Atlas(atlas) as a:
        sl = a.slides()
        return dict(zip(sl["slide_id"], sl["status"]))


def assert_good_reached(atlas: Path, n: int = 3) -> None:
    st = statuses(atlas)
    assert all(st[f"good{i}"] == "ok" for i in range(n)), st


def parts_of(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


# -- model files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def script_archive(kit) -> Path:
    path = kit / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks torch.jit.script deprecated
        torch.jit.script(_Evil()).save(str(path))
    return path


def test_torchscript_archive_is_refused_by_layers_without_running_its_code(script_archive, capfd):
    code, out = cli("layers", "--model", script_archive)
    printed = capfd.readouterr()
    assert code == 2 and "TorchScript" in out and "--arch" in out and "factory" in out, out
    assert SCRIPT_MARK not in printed.out + printed.err + out  # __setstate__ never ran
    no_traceback(out)


def test_torchscript_archive_is_refused_by_run_before_any_work(kit, script_archive, tmp_path, capfd):
    out_file = tmp_path / "atlas.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", script_archive,
                    "--out", out_file, *FAST)
    printed = capfd.readouterr()
    assert code == 2 and "TorchScript" in out and "eager model" in out, out
    assert SCRIPT_MARK not in printed.out + printed.err + out
    assert not parts_of(out_file).exists() and not out_file.exists()
    no_traceback(out)


def test_no_torch_jit_load_anywhere_in_precompute():
    for path in (REPO / "precompute").glob("*.py"):
        assert "jit.load" not in path.read_text(), path


def test_pickled_whole_model_is_refused(kit, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    code, out = cli("layers", "--model", path, "--arch", "resnet18")
    assert code == 2 and "pickled" in out and "state_dict" in out, out
    no_traceback(out)


def test_state_dict_that_does_not_fit_names_no_missing_option(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)}, path)
    code, out = cli("layers", "--model", path, "--arch", "resnet18")
    assert code == 2 and "does not fit" in out and "--arch" in out, out
    assert "--num-classes" not in out  # there is no such option
    no_traceback(out)


def test_empty_model_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    code, out = cli("layers", "--model", path, "--arch", "resnet18")
    assert code == 2 and "empty (0 bytes)" in out, out
    no_traceback(out)


def test_wrong_layer_hint_is_a_command_that_works(kit, tmp_path):
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL,
                    "--out", tmp_path / "a.h5", "--layer", "body.9", *FAST)
    assert code == 2 and "body.9" in out and "python -m precompute layers --model MODEL" in out, out
    code, listing = cli("layers", "--model", MODEL)  # the hint, with MODEL filled in
    assert code == 0 and "body.3" in listing
    no_traceback(out)


@pytest.mark.parametrize("args, expected", [
    (("--model", "no_such_model.pt"), "Model file not found"),
    (("--model", "resnet18.pt", "--arch", "resnet_18"), "Unknown architecture 'resnet_18'"),
    (("--model", MODEL, "--projection", "tsne"), "--projection must be pca or umap"),
    (("--model", MODEL, "--k-grid", "1,x"), "--k-grid needs comma-separated whole numbers"),
])
def test_option_typos_are_refused_before_any_work(kit, tmp_path, args, expected):
    if "resnet18.pt" in args:
        torch.save({"w": torch.zeros(1)}, tmp_path / "resnet18.pt")
        args = tuple(str(tmp_path / a) if a == "resnet18.pt" else a for a in args)
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--out", out_file, "--k", "2",
                    "--workers", "0", "--no-progress", *args)
    assert code == 2 and expected in out, out
    assert not parts_of(out_file).exists()
    no_traceback(out)


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "nowhere.csv", "not found"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no slide files"),
    (lambda d: (d / "m.csv").write_text("slide_id,path\n") and d / "m.csv", "only a header"),
])
def test_empty_or_missing_cohorts(tmp_path, make, expected):
    code, out = cli("run", "--cohort", make(tmp_path), "--model", MODEL, "--out", tmp_path / "a.h5", *FAST)
    assert code == 2 and expected in out, out
    no_traceback(out)


def test_layer_without_a_cell_grid_is_refused_before_any_work(kit, tmp_path):
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", out_file,
                    "--layer", "head", *FAST)  # the Linear head: (N, 2), no spatial cells
    assert code == 2 and "(N, C, h, w)" in out and "python -m precompute layers --model MODEL" in out, out
    assert not parts_of(out_file).exists()
    no_traceback(out)


# -- text that looks like markup ---------------------------------------------------------------------

@pytest.mark.parametrize("slide_id", ["x[/y]", "[bold]S1[/bold]"])
def test_markup_in_a_duplicate_id_is_printed_as_written(kit, tmp_path, slide_id):
    rows = [(slide_id, kit / "good0.tif", "a"), ("other", kit / "good1.tif", "b"), (slide_id, kit / "good2.tif", "a")]
    code, out = cli("run", "--cohort", manifest(tmp_path, rows), "--model", MODEL, "--out", tmp_path / "a.h5", *FAST)
    assert code == 2 and f"duplicate slide_id {slide_id!r}" in out and "rows 2 and 4" in out, out
    no_traceback(out)


def test_markup_in_a_broken_slide_path_does_not_stop_the_run(kit, tmp_path):
    folder = tmp_path / "a["
    folder.mkdir()
    bad = folder / "b].tif"
    bad.write_bytes(b"II*\0" + b"\0" * 100)  # a truncated TIFF
    rows = good_rows(kit) + [("[red]odd[dim]", bad, "malignant")]
    out_file = tmp_path / "atlas.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, rows), "--model", MODEL, "--out", out_file, *FAST)
    assert code == 1, out
    assert "a[/b].tif" in out and "[red]odd[dim]" in out, out
    assert_good_reached(out_file)
    assert statuses(out_file)["[red]odd[dim]"] == "failed"
    no_traceback(out)


# -- cohort rows ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, said, not_said", [
    (lambda p: p.symlink_to(p), "loops back on itself", None),
    (os.mkfifo, "not a regular file", "0 bytes"),  # a FIFO is not called empty
], ids=["symlink loop", "fifo"])
def test_special_file_in_a_manifest_is_a_row_error(kit, tmp_path, make, said, not_said):
    special = tmp_path / "special.tif"
    make(special)
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit) + [("special", special, "x")]),
                    "--model", MODEL, "--out", tmp_path / "a.h5", *FAST)
    assert code == 2 and "row 5" in out and said in out and (not_said is None or not_said not in out), out
    no_traceback(out)


def test_fifo_as_the_cohort_itself(tmp_path):
    fifo = tmp_path / "cohort.csv"
    os.mkfifo(fifo)
    code, out = cli("run", "--cohort", fifo, "--model", MODEL, "--out", tmp_path / "a.h5", *FAST)
    assert code == 2 and "not a regular file" in out, out
    no_traceback(out)


def test_two_ids_for_one_file_name_both_rows(kit, tmp_path):
    link = tmp_path / "alias.tif"
    link.symlink_to(kit / "good1.tif")
    rows = good_rows(kit) + [("copy", kit / "good0.tif", "x"), ("alias", link, "x")]
    code, out = cli("run", "--cohort", manifest(tmp_path, rows), "--model", MODEL, "--out", tmp_path / "a.h5", *FAST)
    assert code == 2 and "rows 2 and 5" in out and "rows 3 and 6" in out and "same file" in out, out
    no_traceback(out)


@pytest.mark.parametrize("mpp", ["1e9", "1e-9"])
def test_implausible_manifest_mpp_is_refused_up_front(kit, tmp_path, mpp):
    rows = [(sid, path, diag, mpp if sid == "good1" else "") for sid, path, diag in good_rows(kit)]
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, rows, "slide_id,path,diagnosis,mpp"), "--model", MODEL,
                    "--out", out_file, *FAST)
    assert code == 2 and "row 3" in out and "plausible range" in out, out
    assert "add an `mpp` column" not in out and not parts_of(out_file).exists()
    no_traceback(out)


def test_implausible_mpp_option_is_refused_up_front(kit, tmp_path):
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out",
                    tmp_path / "a.h5", "--mpp", "1e9", *FAST)
    assert code == 2 and "--mpp" in out and "plausible range" in out, out
    no_traceback(out)


def test_missing_file_and_non_utf8_manifest(kit, tmp_path):
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit) + [("gone", tmp_path / "gone.tif", "x")]),
                    "--model", MODEL, "--out", tmp_path / "a.h5", *FAST)
    assert code == 2 and "row 5: file not found" in out, out
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(f"slide_id,path,diagnosis\na,{kit / 'good0.tif'},carcinome épidermoïde\n".encode("latin-1"))
    code, out = cli("run", "--cohort", latin, "--model", MODEL, "--out", tmp_path / "a.h5", *FAST)
    assert code == 2 and "UTF-8" in out, out
    no_traceback(out)


# -- slides that are not what they seem ------------------------------------------------------------------

def make_qptiff(path: Path) -> Path:
    """A 5-channel 16-bit fluorescence image, one grey page per channel (DAPI first), as multiplex scanners write."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 4000, (5, 256, 256), dtype=np.uint16)
    tifffile.imwrite(path, data, photometric="minisblack", tile=(64, 64), metadata={"axes": "CYX"})
    return path


def test_fluorescence_qptiff_as_the_cohort_is_refused_with_the_reason(tmp_path):
    qp = make_qptiff(tmp_path / "multiplex.qptiff")
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", qp, "--model", MODEL, "--out", out_file, *FAST)
    assert code == 3 and "5-channel fluorescence" in out and "brightfield" in out, out
    assert "CSV UTF-8" not in out and not out_file.exists()
    no_traceback(out)


def test_folder_cohort_refuses_fluorescence_and_lists_skipped_files(kit, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.tif").symlink_to(kit / f"good{i}.tif")
    make_qptiff(folder / "multiplex.qptiff")
    (folder / "notes.txt").write_text("scanned 2024")
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", folder, "--model", MODEL, "--out", out_file, "--mpp", "0.5", *FAST)
    assert code == 1, out
    assert "skipped notes.txt: suffix '.txt' is not a slide suffix" in out, out
    assert "multiplex" in out and "fluorescence" in out
    assert_good_reached(out_file)
    assert statuses(out_file)["multiplex"] == "failed"
    no_traceback(out)


def make_pyramidless_tiff(path: Path, size: int = 200_000, tile: int = 1024) -> Path:
    """A 300 KB single-level tiled RGB TIFF claiming size x size px at 0.5 um/px: the tile table is
    written, the tiles are not (every offset and byte count is 0), so nothing large touches the disk."""
    n = (-(-size // tile)) ** 2
    data = bytearray()

    def put(blob: bytes) -> int:  # extra data goes after the 8-byte header; returns its offset
        offset = 8 + len(data)
        data.extend(blob + b"\0" * (len(blob) % 2))
        return offset

    bps, res = put(struct.pack("<3H", 8, 8, 8)), put(struct.pack("<2I", 20_000, 1))
    offsets, counts = put(bytes(4 * n)), put(bytes(4 * n))
    short, long_, rational = 3, 4, 5
    tags = [(256, long_, 1, size), (257, long_, 1, size), (258, short, 3, bps), (259, short, 1, 1),
            (262, short, 1, 2), (277, short, 1, 3), (282, rational, 1, res), (283, rational, 1, res),
            (284, short, 1, 1), (296, short, 1, 3), (322, long_, 1, tile), (323, long_, 1, tile),
            (324, long_, n, offsets), (325, long_, n, counts)]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        ifd += struct.pack("<HHIHH" if kind == short and count == 1 else "<HHII", tag, kind, count, value,
                           *((0,) if kind == short and count == 1 else ()))
    path.write_bytes(b"II*\0" + struct.pack("<I", 8 + len(data)) + bytes(data) + ifd + bytes(4))
    return path


def test_pyramidless_huge_slide_fails_fast_with_how_to_make_a_pyramid(kit, tmp_path):
    huge = make_pyramidless_tiff(tmp_path / "huge.tif")
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit) + [("huge", huge, "x")]), "--model", MODEL,
                    "--out", out_file, *FAST)
    assert code == 1 and "no lower-resolution levels" in out and "vips tiffsave" in out and "--pyramid" in out, out
    assert_good_reached(out_file)
    assert statuses(out_file)["huge"] == "failed"
    no_traceback(out)


def test_unreadable_slide_among_good_ones(kit, tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit) + [("notes", bad, "x")]), "--model", MODEL,
                    "--out", out_file, *FAST)
    assert code == 1 and "not a readable slide" in out, out
    assert_good_reached(out_file)
    no_traceback(out)


def test_slides_without_pixel_size_are_reported_once_by_cause(kit, tmp_path):
    rows = [(f"nompp{i}", write_disc_slide(tmp_path / f"nompp{i}.tif", mpp=None, seed=i), "x") for i in range(4)]
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, rows), "--model", MODEL, "--out", out_file, *FAST)
    assert code == 3 and not out_file.exists(), out
    assert out.count("--native-resolution") == 2, out  # once as it happens, once in the summary (grouped)
    assert "4 slides failed (nompp0, nompp1, nompp2, nompp3), all for one reason" in out, out
    assert "every slide failed" in out and "tissue settings" not in out
    no_traceback(out)


def test_slide_without_tiles_says_what_tissue_was_found_and_what_to_change(kit, tmp_path):
    speck = write_disc_slide(tmp_path / "speck.tif", blob=0.05, seed=5)
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit) + [("speck", speck, "x")]), "--model", MODEL,
                    "--out", out_file, *FAST)
    assert code == 0, out
    assert "speck: 0 tiles: tissue was found on" in out and "lower --min-tissue" in out, out
    assert_good_reached(out_file)
    assert statuses(out_file)["speck"] == "no_tissue"
    no_traceback(out)


@pytest.fixture
def sparse_images(tmp_path) -> list[Path]:
    """Two images whose detected tissue stays below the default --min-tissue in every 224-px tile, then one
    with enough tissue: BreakHis images (700 x 460 px PNG) when ../shared/data is present, else generated
    images of that size (three small stained ellipses on glass; the third the default generated tissue)."""
    if DATA.is_dir():
        folder = DATA / "cohort" / "breakhis"
        return [folder / f"{sid}.png" for sid in
                ("SOB_B_TA-14-3411F-100-003", "SOB_M_MC-14-10147-100-001", "SOB_M_MC-14-10147-100-002")]
    paths = []
    for seed, sparse in ((0, {"blobs": 3, "radii": (20, 35)}), (1, {"blobs": 3, "radii": (20, 35)}), (2, {})):
        paths.append(tmp_path / f"gen-{seed}.png")
        Image.fromarray(slide_pixels(seed, 700, 460, **sparse)).save(paths[-1])
    return paths


def test_images_without_tiles_say_the_tissue_found(kit, sparse_images, tmp_path):
    """Images whose detected tissue stays below the default --min-tissue in every tile end as no tissue
    and say how much tissue was found; the one with enough tissue is done."""
    rows = [(path.stem, path, "x") for path in sparse_images]
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, rows), "--model", MODEL, "--out", out_file, "--mpp", "0.5",
                    "--tile-px", "224", *FAST)  # 224 px tiles, as the demo model uses
    assert code == 0, out
    for sid in rows[:2]:
        assert f"{sid[0]}: 0 tiles: tissue was found on" in out and "below --min-tissue 0.25" in out, out
    st = statuses(out_file)
    assert st[rows[0][0]] == st[rows[1][0]] == "no_tissue" and st[rows[2][0]] == "ok"
    no_traceback(out)


# -- options and output ------------------------------------------------------------------------------

def test_k_above_layer_channels_is_refused_before_any_work(kit, tmp_path):
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", out_file,
                    *FAST, "--k", "9")
    assert code == 2 and "--k 9" in out and "8" in out and not parts_of(out_file).exists(), out
    no_traceback(out)


def test_k_above_calibration_cells_exits_3_and_keeps_the_calibration(kit, tmp_path):
    out_file = tmp_path / "a.h5"
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)[:1]), "--model", MODEL, "--out", out_file,
                    *FAST, "--k", "4", "--calib-tiles", "1", "--calib-cells", "1", "--max-calib-cells", "10")
    assert code == 3 and "K = 4" in out and "calibration is kept" in out, out
    assert len(list((parts_of(out_file) / "calibration").glob("*.h5"))) == 1
    no_traceback(out)


def test_host_out_of_memory_gives_the_readme_message(kit, tmp_path):
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", "lumen_bad_inputs_model:tiny_oom",
                    "--out", tmp_path / "a.h5", *FAST)
    assert code == 3 and "host ran out of memory" in out and "--batch-size" in out and "--workers" in out, out
    no_traceback(out)


def test_out_is_a_folder(kit, tmp_path):
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", tmp_path, *FAST)
    assert code == 2 and "is a folder" in out, out
    no_traceback(out)


def test_out_below_a_file_is_refused_before_any_work(kit, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL,
                    "--out", blocker / "atlas.h5", *FAST)
    assert code == 2 and f"cannot write the atlas in {blocker}" in out, out
    no_traceback(out)


def test_stale_temporary_files_of_dead_runs_are_removed(kit, tmp_path):
    out_file = tmp_path / "atlas.h5"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out_file.with_name(f"atlas.h5.tmp-{dead.pid}")
    stale.write_bytes(b"half an atlas")
    live = out_file.with_name(f"atlas.h5.tmp-{os.getppid()}")  # a running process's file stays
    live.write_bytes(b"someone else's")
    stale_part = parts_of(out_file) / "slides" / f"000000-x.h5.tmp-{dead.pid}"
    stale_part.parent.mkdir(parents=True)
    stale_part.write_bytes(b"half a part")
    code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", out_file, *FAST)
    assert code == 0, out
    assert not stale.exists() and not stale_part.exists() and live.exists()
    assert_good_reached(out_file)
    assert not out_file.with_name("atlas.h5.lock").exists()


# -- faults that need a process of their own ---------------------------------------------------------------

def test_second_run_on_the_same_atlas_is_refused_naming_the_holder(kit, tmp_path):
    out_file = tmp_path / "atlas.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from precompute.runlock import RunLock\n"
         f"with RunLock(Path({str(out_file)!r}), 'the first run'):\n print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out = cli("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", out_file,
                        *FAST)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"process {holder.pid} on host" in out and "another run is writing this atlas" in out, out
    assert not parts_of(out_file).exists()
    no_traceback(out)


def _limit_file_size(n_bytes: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


@pytest.mark.slow
def test_disk_full_while_writing_parts(kit, tmp_path):
    out_file = tmp_path / "atlas.h5"
    proc = cli_process("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", out_file,
                       *FAST, preexec=_limit_file_size(64 * 1024))
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 5, text
    assert "could not write" in text and str(parts_of(out_file)) in text and "ulimit -f" in text, text
    assert not out_file.exists() and not list(tmp_path.rglob("*.tmp-*"))
    no_traceback(text)


@pytest.mark.slow
def test_disk_full_while_writing_the_atlas_keeps_the_earlier_atlas(kit, tmp_path):
    out_file = tmp_path / "atlas.h5"
    first = cli_process("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", out_file,
                        *FAST)
    assert first.returncode == 0, first.stderr
    before = out_file.read_bytes()
    biggest_part = max(p.stat().st_size for p in parts_of(out_file).rglob("*.h5"))
    limit = (biggest_part + len(before)) // 2  # parts fit, the atlas does not
    assert biggest_part < limit < len(before)
    for p in (parts_of(out_file) / "slides").glob("*.h5"):
        p.unlink()  # redo the full pass and the atlas under the limit
    proc = cli_process("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL, "--out", out_file,
                       *FAST, preexec=_limit_file_size(limit))
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 5, (proc.returncode, text)  # not 139: no segfault
    assert f"could not write {out_file}" in text and "is unchanged" in text, text
    assert out_file.read_bytes() == before
    assert not list(tmp_path.rglob("*.tmp-*"))
    assert "HDF5-DIAG" not in text
    no_traceback(text)


def _unshare_mount(script: str) -> list[str]:
    return ["unshare", "-m", "sh", "-c", script + ' && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    probe = tmp_path_factory.mktemp("mount-probe")
    ok = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                        capture_output=True).returncode == 0 if _has("unshare") else False
    if not ok:
        pytest.skip("cannot mount here (needs unshare and CAP_SYS_ADMIN); the RLIMIT_FSIZE cases cover full disks")


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def _run_into_mount(kit: Path, tmp_path: Path, mount: str) -> tuple[Path, int, str]:
    """Run the good cohort with --out in a new folder on which `mount` (a shell command, {folder} in it)
    mounts something, in a private mount namespace: (folder, exit code, output with spaces folded)."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    proc = cli_process("run", "--cohort", manifest(tmp_path, good_rows(kit)), "--model", MODEL,
                       "--out", folder / "atlas.h5", *FAST, prefix=_unshare_mount(mount.format(folder=folder)))
    text = " ".join((proc.stdout + proc.stderr).split())
    no_traceback(text)
    return folder, proc.returncode, text


@pytest.mark.slow
def test_read_only_filesystem_is_refused_before_any_work(kit, tmp_path, can_mount):
    ro, code, text = _run_into_mount(kit, tmp_path,
                                     "mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}")
    assert code == 2 and f"cannot write the atlas in {ro}" in text and "read-only" in text, text
    assert not list(ro.iterdir())


@pytest.mark.slow
def test_small_full_filesystem(kit, tmp_path, can_mount):
    _, code, text = _run_into_mount(kit, tmp_path, "mount -t tmpfs -o size=200k tmpfs {folder}")
    assert code == 5 and "the disk is full" in text, (code, text)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie holds no memory; it only waits to be reaped


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the worker processes")
def test_workers_end_when_the_main_process_is_killed(kit, tmp_path):
    rows = [(f"s{i}", write_disc_slide(tmp_path / f"s{i}.tif", size=1024, seed=i), "x") for i in range(12)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(kit)])}
    main = subprocess.Popen([sys.executable, "-m", "precompute", "run", "--cohort", manifest(tmp_path, rows),
                             "--model", MODEL, "--out", tmp_path / "a.h5", "--k", "2", "--k-grid", "",
                             "--workers", "2", "--no-progress", "--batch-size", "4"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: len(_children(main.pid)) >= 2, 300), "the workers never started"
        workers = _children(main.pid)
    finally:
        main.send_signal(signal.SIGKILL)
        main.wait()
    # The bound is below torch's own 5 s check of the parent, so it measures the kernel's death signal.
    try:
        assert _wait_for(lambda: not any(_running(w) for w in workers), 3), \
            f"workers {[w for w in workers if _running(w)]} outlived their parent"
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_exits_130_and_releases_the_lock(kit, tmp_path):
    rows = [(f"s{i}", write_disc_slide(tmp_path / f"s{i}.tif", size=512, seed=i), "x") for i in range(4)]
    out_file = tmp_path / "a.h5"
    args = ("run", "--cohort", manifest(tmp_path, rows), "--model", MODEL, "--out", out_file, *FAST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(kit)])}
    # As from a terminal: Ctrl-C handled by default. A child inherits an ignored SIGINT (some earlier
    # test or the test runner's own parent may ignore it), and Python then installs no handler.
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lock = out_file.with_name("a.h5.lock")
    try:
        assert _wait_for(lock.exists, 300), "the run never took its lock"
        proc.send_signal(signal.SIGINT)
        text = " ".join(proc.communicate(timeout=300)[0].split())
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in text and "run the same command again" in text, text
    assert not lock.exists() and not out_file.exists() and not list(tmp_path.rglob("*.tmp-*"))
    no_traceback(text)
