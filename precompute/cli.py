"""Command line: `python -m precompute run | layers | inspect | report | export | demo`.

Exit codes of `run` (and `demo`), as in README's table: 0 all slides done; 1 atlas written but some
slides failed; 2 bad input (cohort, model, layer, option, or an --out that cannot be written or is
locked by another run; nothing was done); 3 no atlas written (no slide produced tiles, too few
calibration cells for --k, or out of memory; finished slides are kept); 4 (`demo` only) the demo slide
could not be fetched; 5 the disk filled or the output became unwritable during the run (finished
slides are kept, an earlier atlas is unchanged); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from . import interrupt
from .cli_options import resolve, run_signature, split
from .runlog import PassProgress, group_failures, make_console

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Lumen precompute: cluster a CNN layer's activations over a cohort of slides "
                       "into one HDF5 atlas for the review dashboard.")
console = make_console()


def _fail(message: str, code: int = 2) -> None:
    """Print `message` (plain text: user-supplied names are never read as markup) and exit with `code`."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _floats3(text: Optional[str], name: str) -> Optional[tuple]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        _fail(f"{name} needs three comma-separated numbers (R,G,B), e.g. 0.485,0.456,0.406; got {text!r}")
    return values


def _load(model: str, arch, input_px, scale, mean, std):
    from .models import ModelError, load_model

    try:
        return load_model(model, arch=arch, input_px=input_px, scale=scale,
                          mean=_floats3(mean, "--mean"), std=_floats3(std, "--std"))
    except ModelError as exc:
        _fail(str(exc))


MODEL_HELP = ("'capricorn-crc' (built-in demo), a state_dict checkpoint with --arch, "
              "or 'package.module:factory'.")


def run(**values) -> None:
    """Compute an atlas: tiles -> activations -> NMF concepts -> cluster maps -> atlas.h5.

    Re-running the same command resumes: finished slides are reused, the rest is redone.
    """
    raise typer.Exit(run_job(**values))


# The options are declared once (config.RunConfig and cli_options.JobOptions); Typer reads them from here.
run.__signature__ = run_signature()
app.command()(run)


def run_job(**values) -> int:
    """The `run` command as a function (also used by `demo`): options by their parameter names in `run
    --help` order, as the command line gives them (k_grid as text); missing ones take their defaults.
    Returns the exit code."""
    from .pipeline import ConfigError, run as run_pipeline
    from .models import ModelError

    try:
        cfg, job = split(values)
    except ValueError as exc:
        _fail(str(exc))
    if job.dask is not None:
        from .dask_run import check_dask_option
        try:
            check_dask_option(job.dask)
        except ValueError as exc:
            _fail(str(exc))
    from .targets import check_target
    try:
        cfg = dataclasses.replace(cfg, target=check_target(cfg.target))
    except ValueError as exc:
        _fail(str(exc))
    records = _cohort_records(job.cohort, cfg.cli_mpp)
    loaded = _load(cfg.model, cfg.arch, job.input_px, job.scale, job.mean, job.std)
    try:
        cfg = resolve(cfg, loaded)
    except ValueError:
        _fail(f"--layer is required for {cfg.model} (list the layers with `python -m precompute layers --model "
              f"{shlex.quote(cfg.model)}`).")
    out, concepts, explain, progress, dask = job.out, job.concepts, job.explain, job.progress, job.dask
    out = out.expanduser().resolve()
    if out.exists() and out.is_dir():
        _fail(f"--out {out} is a folder; give a file name such as {out / 'atlas.h5'}")
    command_line = " ".join(shlex.quote(a) for a in sys.argv)
    bars = PassProgress(console, enabled=progress and console.is_terminal)
    try:
        with interrupt.watched(), _output_lock(out, command_line), bars:
            summary = run_pipeline(cfg, records, loaded, out, concepts_from=concepts, explain=explain,
                                   say=console.print, progress=bars, command_line=command_line,
                                   dask=dask)
    except typer.Exit:
        raise
    except (ConfigError, ModelError) as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail_value(exc)
    except KeyboardInterrupt:
        _fail("interrupted. Finished slides are kept; run the same command again to resume.", code=130)
    except MemoryError as exc:
        _fail(f"out of memory ({exc}). {_HOST_OOM_ADVICE}", code=EXIT_NO_ATLAS)
    except OSError as exc:
        _fail_write(exc, out)
    except RuntimeError as exc:
        _fail_runtime(exc, out)
    _print_summary(summary)
    return summary.exit_code


def _cohort_records(cohort: Path, mpp: float | None) -> list:
    """The cohort's slide records, or exit 2 listing what to fix; a folder's skipped files are printed."""
    from .cohort import PLAUSIBLE_MPP, CohortError, folder_skips, load_cohort

    if mpp is not None and not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        _fail(f"--mpp {mpp:g} um/px is outside the plausible range {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} "
              "(0.25 for 40x, 0.5 for 20x); check the unit (um per pixel).")
    try:
        records = load_cohort(cohort)
    except (CohortError, FileNotFoundError) as exc:
        _fail(str(exc))
    if cohort.is_dir():
        for name, why in folder_skips(cohort):
            console.print(f"[yellow]skipped[/] {escape(name)}: {escape(why)}")
    return records


_HOST_OOM_ADVICE = ("Finished slides are kept. Lower --batch-size or --workers (host memory) or --max-calib-cells, "
                    "then run the same command again to resume.")


@contextlib.contextmanager
def _output_lock(out: Path, command_line: str):
    """Check --out can be written and lock it for this run (exit 2 before any work when not);
    remove temporary atlas files left by killed runs."""
    from .atomic import remove_stale_tmp
    from .runlock import OutputError, RunLock, check_writable

    try:
        check_writable(out)
        lock = RunLock(out, command_line).__enter__()
    except OutputError as exc:
        _fail(str(exc))
    try:
        remove_stale_tmp(out.parent, prefix=out.name)
        yield
    finally:
        lock.__exit__(None, None, None)


def _fail_value(exc: ValueError) -> None:
    from .concepts import TooFewCells

    _fail(str(exc), code=EXIT_NO_ATLAS if isinstance(exc, TooFewCells) else 2)


def _fail_write(exc: Exception, out: Path) -> None:
    """A disk or permission error while writing parts, the log or the atlas: exit 5 with the path and
    what to do; anything else is not the user's to fix and is raised."""
    from .runlock import write_advice, write_errno

    code = write_errno(exc)
    if code is None:
        raise exc
    where = getattr(exc, "filename", None) or out
    atlas = f"the earlier atlas {out} is unchanged" if out.exists() else "no atlas was written"
    message = (f"could not write {where}: {write_advice(OSError(code, ''))}. Finished slides are kept in "
               f"{out.name}.parts and {atlas}; run the same command again to resume.")
    if _hdf5_files_open():
        # An HDF5 file whose writes failed cannot be closed; the library would retry at interpreter exit
        # and crash (segfault). Its temporary file is already removed: leave without that exit step.
        console.print(f"[bold red]error:[/] {escape(message)}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_WRITE_FAILED)
    _fail(message, code=EXIT_WRITE_FAILED)


def _hdf5_files_open() -> bool:
    from h5py import h5f

    return bool(h5f.get_obj_ids(types=h5f.OBJ_FILE))


def _fail_runtime(exc: RuntimeError, out: Path) -> None:
    from .runlock import write_errno

    text = str(exc)
    if write_errno(exc) is not None:  # h5py reports some write failures as RuntimeError
        _fail_write(exc, out)
    if "can't allocate memory" in text or "DefaultCPUAllocator" in text:
        _fail(f"the host ran out of memory: {text.splitlines()[0]}. {_HOST_OOM_ADVICE}", code=EXIT_NO_ATLAS)
    if "out of memory" in text.lower():
        _fail(f"the device ran out of memory: {text.splitlines()[0]} Finished slides are kept. Lower "
              "--batch-size, then run the same command again to resume.", code=EXIT_NO_ATLAS)
    raise exc


def _print_summary(s) -> None:
    console.print(f"[bold]done[/] in {s.seconds:.1f} s: {s.ok} slides ok, {s.no_tissue} without tissue, "
                  f"{s.failed} failed, {s.reused} reused from an earlier run; {s.tiles} tiles.")
    for ids, reason in group_failures(s.failures):
        if len(ids) == 1:
            console.print(f"  [red]failed[/] {escape(ids[0])}: {escape(reason)}")
        else:
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            console.print(f"  [red]{len(ids)} slides failed[/] ({escape(shown)}), all for one reason: {escape(reason)}")
    if s.atlas:
        err = s.facts.get("relative_error")
        if err is not None:
            console.print(f"concepts reconstruct the cells with relative error {err:.3f}")
        shown = s.atlas
        try:
            shown = s.atlas.relative_to(Path.cwd())
        except ValueError:
            pass
        console.print(f"atlas: {escape(str(s.atlas))}")
        console.print(f"open it: streamlit run dashboard/app.py -- --atlas {escape(shlex.quote(str(shown)))}")


@app.command()
def layers(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a state_dict "
                                      "checkpoint: a torchvision name (resnet50) or timm:NAME."),
    input_px: Optional[int] = typer.Option(None, "--input-px", help="Input size of the dummy tile."),
) -> None:
    """List the model's modules with their output shapes for one tile (names for --layer)."""
    from .models import ModelError, list_layers

    loaded = _load(model, arch, input_px, None, None, None)
    try:
        infos = list_layers(loaded.module, loaded.spec.input_px)
    except ModelError as exc:
        _fail(str(exc))
    out = typer.echo
    out(f"{'layer':48s} {'type':24s} output shape (C, h, w) for a {loaded.spec.input_px} px tile")
    for info in infos:
        shape = "-" if info.out_shape is None else "x".join(map(str, info.out_shape))
        mark = "  <- default" if info.name == loaded.spec.default_layer else ""
        out(f"{info.name:48s} {info.type_name:24s} {shape}{mark}")


NOTES_HELP = ("Concept names and notes (JSON written by the dashboard). Default: ATLAS.notes.json beside the "
              "atlas when it exists and belongs to this atlas.")


def _notes(atlas: Path, notes: Optional[Path], k: int):
    """(Notes or None, where they came from) for read-only commands; a bad --notes file exits with 2."""
    from .notes import NotesError, resolve

    try:
        return resolve(atlas, notes, k)
    except NotesError as exc:  # may quote text from the file: printed without markup
        _fail_plain(str(exc))


def _fail_plain(message: str, code: int = 2) -> None:
    """Like _fail, for messages that quote user text (notes, names): never read as rich markup."""
    console.print("[bold red]error:[/] ", end="")
    console.print(message, markup=False, highlight=False)
    raise typer.Exit(code)


@app.command()
def inspect(
    atlas: Path = typer.Argument(..., help="Atlas file."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary for machines."),
    notes: Optional[Path] = typer.Option(None, "--notes", help=NOTES_HELP),
) -> None:
    """Summarise an atlas: slides by diagnosis, tiles, clusters with sizes, configuration."""
    from .atlas_summary import add_notes, summarise, format_summary
    from .store import AtlasFormatError

    try:
        summary = summarise(atlas)
    except AtlasFormatError as exc:
        _fail(str(exc))
    add_notes(summary, *_notes(atlas, notes, summary["clusters"]["k"]))
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        typer.echo(format_summary(summary))


@app.command()
def report(
    atlas: Path = typer.Argument(..., help="Atlas file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write the meeting report to this HTML file instead "
                                        "(self-contained: cohort, method, every concept with its name, notes, "
                                        "prototypes, composition, fidelity, example slides; prints to PDF)."),
    notes: Optional[Path] = typer.Option(None, "--notes", help=NOTES_HELP),
) -> None:
    """Fidelity: how much of the model's output the concepts explain, GradCAM agreement, the K grid.

    With --html FILE: the meeting report as one self-contained HTML file."""
    from .report import format_report, report_dict
    from .store import AtlasFormatError

    if html is not None:
        _html_report(atlas, html, notes)
        return
    try:
        d = report_dict(atlas)
    except AtlasFormatError as exc:
        _fail(str(exc))
    except ValueError as exc:  # e.g. no stored results and no default output to explain
        _fail(f"{atlas}: {exc}")
    typer.echo(json.dumps(d, indent=2, default=_json_default) if as_json else format_report(d))


def _atlas_notes(atlas: Path, notes: Optional[Path]):
    """Open the atlas (exit 2 when damaged) and return its concept notes, saying where they came from."""
    from .store import Atlas, AtlasFormatError

    try:
        with Atlas(atlas) as a:
            k = a.k
    except AtlasFormatError as exc:
        _fail(str(exc))
    found, source = _notes(atlas, notes, k)
    if source:
        console.print(source, markup=False, highlight=False)
    return found


def _html_report(atlas: Path, out: Path, notes: Optional[Path]) -> None:
    from .meeting_report import write_report
    from .store import AtlasFormatError

    if out.is_dir():
        _fail(f"--html {out} is a folder; give a file name such as {out / 'report.html'}")
    found = _atlas_notes(atlas, notes)
    try:
        write_report(atlas, out, found)
    except AtlasFormatError as exc:  # damage found while reading (e.g. a slide's maps)
        _fail(str(exc))
    console.print(f"report: {out}", markup=False, highlight=False)


@app.command()
def export(
    atlas: Path = typer.Argument(..., help="Atlas file."),
    geojson: Path = typer.Option(..., "--geojson", help="Folder for one GeoJSON file per slide (QuPath: drag the "
                                 "file onto the open slide)."),
    notes: Optional[Path] = typer.Option(None, "--notes", help=NOTES_HELP),
) -> None:
    """Concept regions per slide as GeoJSON in level-0 pixels, one QuPath annotation per region, classified by
    concept name and colour, with the mean concept weight."""
    from .geojson_export import export_geojson
    from .store import AtlasFormatError

    if geojson.exists() and not geojson.is_dir():
        _fail(f"--geojson {geojson} is a file; give a folder (it is created when missing).")
    found = _atlas_notes(atlas, notes)
    try:
        files = export_geojson(atlas, geojson, found)
    except AtlasFormatError as exc:  # damage found while reading (e.g. a slide's maps)
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write into {geojson}: {exc.strerror or exc}. Choose a writable folder.")
    console.print(f"{len(files)} GeoJSON files in {geojson} (one per slide with a cluster map)",
                  markup=False, highlight=False)


def _json_default(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the demo atlas (DIR/atlas.h5)."),
    workers: int = typer.Option(-1, "--workers", help="Tile-reading processes (-1: CPU cores - 1)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cuda, cpu."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show live progress bars."),
) -> None:
    """Fetch the public demo slide (cached) and build DIR/atlas.h5 with the built-in capricorn-crc model."""
    from .demo_data import DemoDataError, demo_slide

    try:
        slide = demo_slide(say=console.print)
    except DemoDataError as exc:
        _fail(str(exc), code=EXIT_NO_DEMO_DATA)
    console.print(f"demo slide: {escape(str(slide))}")
    code = run_job(cohort=slide, model="capricorn-crc", out=out / "atlas.h5", workers=workers, device=device,
                   progress=progress)
    raise typer.Exit(code)


EXIT_NO_DEMO_DATA = 4  # `demo` could not fetch its slide
EXIT_NO_ATLAS = 3      # (as pipeline.EXIT_NO_ATLAS) no atlas written
EXIT_WRITE_FAILED = 5  # the disk filled or the output became unwritable during the run


def main() -> None:
    app()
