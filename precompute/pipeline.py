"""`precompute run`: cohort -> calibration pass -> concepts H -> full pass -> atlas.

Work in progress lives in `<atlas>.parts/` beside the atlas: one part file per slide and pass plus
the fitted concepts. Each is keyed by the settings that made it, so a re-run (after a crash, a
kill, or with more slides) redoes only what is missing, failed, or was made with other settings.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.markup import escape

from . import __version__
from .activations import cell_layout, choose_output_activation, compute_signature, dry_outputs, pick_device
from .assemble import build_atlas
from .cells import CellLayout
from .atomic import remove_stale_tmp
from .cohort import SlideRecord
from .concepts import (CONCEPTS_FILE, Concepts, auto_cells_per_tile, concepts_from_atlas, concepts_sha, fit_concepts,
                       load_concepts, pool_cells, save_concepts)
from .config import RunConfig
from .explained import resolve_output
from .fidelity_stage import write_fidelity
from .models import LoadedModel, find_layer
from .parts import attrs_done, is_done, part_name, read_part_attrs, save_part
from .passes import CalibrationPass, FullPass, LayerInfo, Pass, PassStats, pass_engine, run_pass
from .runlock import check_free_space
from .runlog import PassProgress, RunLog, common_reason
from .targets import default_target
from .tile_plan import plan_key
from .tile_stream import SlideJob

# Exit codes of `precompute run` (also in README.md).
EXIT_OK = 0            # every slide processed
EXIT_FAILURES = 1      # atlas written, but some slides failed (listed in the summary and run log)
EXIT_BAD_INPUT = 2     # nothing done: bad cohort, model, layer or option (message says what to fix)
EXIT_NO_ATLAS = 3      # ran, but no slide produced tiles, so no atlas could be written


class ConfigError(ValueError):
    """A setting that cannot work; raised before any slide is read."""


@dataclass
class RunSummary:
    atlas: Path | None
    ok: int = 0
    no_tissue: int = 0
    failed: int = 0
    reused: int = 0
    tiles: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.atlas is None:
            return EXIT_NO_ATLAS
        return EXIT_FAILURES if self.failed else EXIT_OK


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def check_geometry(cfg: RunConfig, layer: LayerInfo) -> None:
    """Tiles must map onto whole cells so overlapping tiles stitch onto one slide grid."""
    if cfg.k > layer.channels:
        raise ConfigError(f"--k {cfg.k} is more concepts than the layer has channels ({layer.channels}); "
                          f"use --k {layer.channels} or less, or hook a wider layer.")
    if cfg.stride_px == cfg.tile_px and not cfg.edge_cells:
        return  # side by side tiles: a tile is h x w cells even when the cell is not a whole number of px
    if cfg.tile_px % layer.h or cfg.tile_px % layer.w:
        raise ConfigError(f"--tile-px {cfg.tile_px} is not a multiple of the layer's {layer.h} x {layer.w} "
                          "cell grid; pick a tile size the network divides evenly (e.g. 224 or 256).")
    cell = cfg.tile_px // layer.h
    if cfg.stride_px % cell:
        raise ConfigError(f"--stride-px {cfg.stride_px} is not a multiple of the cell size ({cell} px at this "
                          f"layer); use a multiple such as {max(cell, (cfg.stride_px // cell) * cell)}.")
    if 2 * cfg.edge_cells * cell > cfg.tile_px - cfg.stride_px:
        raise ConfigError(f"--edge-cells {cfg.edge_cells} would leave gaps: dropping {cfg.edge_cells} cells "
                          f"({cfg.edge_cells * cell} px) at each tile edge needs tiles overlapping by at least "
                          f"{2 * cfg.edge_cells * cell} px (tile {cfg.tile_px}, stride {cfg.stride_px}).")


@dataclass
class Setup:
    """What a run resolves from the model and the settings before any slide is read."""

    cfg: RunConfig
    layer_mod: torch.nn.Module
    layout: CellLayout      # how the hooked output maps onto a (C, h, w) cell grid
    raw_shape: tuple
    layer: LayerInfo
    out_index: int | None
    out_name: str | None
    device: torch.device


def prepare(cfg: RunConfig, n_slides: int, loaded: LoadedModel, explain: str | None,
            say: Callable[[str], None]) -> Setup:
    """Check the geometry and resolve the explained output, target, cell sample and device (ConfigError)."""
    layer_mod = find_layer(loaded.module, cfg.layer)
    layout, raw_shape = cell_layout(loaded.module, layer_mod, cfg.tile_px)
    h, w = layout.h, layout.w
    if layout.kind != "nchw":
        say(f"note: layer {escape(cfg.layer)} gives {layout.describe(raw_shape)}")
    layer = LayerInfo(layout.channels, h, w, cfg.tile_px)
    check_geometry(cfg, layer)
    dry = dry_outputs(loaded.module, cfg.tile_px)
    n_out = int(dry.shape[1])
    activation, note = choose_output_activation(cfg.output_activation, loaded.spec.output_activation, dry)
    if note:
        say(f"[yellow]note[/] {note}")
    out_index, out_name = resolve_output(explain, list(loaded.spec.class_names or []), n_out)
    if cfg.gradcam and out_index is None:
        raise ConfigError("--gradcam needs the output to explain: pass --explain NAME_OR_INDEX.")
    if cfg.importance and out_index is None:
        raise ConfigError("--importance needs the output to explain: pass --explain NAME_OR_INDEX.")
    target = cfg.target or default_target(activation, n_out)
    if not cfg.calib_cells_per_tile:  # --calib-cells not given: all cells of a tile while they fit the cap
        cfg = dataclasses.replace(cfg, calib_cells_per_tile=auto_cells_per_tile(
            h * w, n_slides, cfg.calib_tiles_per_slide, cfg.calib_max_cells))
    device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, explain_output=out_index, target=target, compute=compute_signature(device),
                              output_activation=activation)
    return Setup(cfg, layer_mod, layout, raw_shape, layer, out_index, out_name, device)


@dataclass
class Job:
    """One run in progress: its settings, folders, log, progress and the summary it fills."""

    setup: Setup
    records: list[SlideRecord]
    loaded: LoadedModel
    out: Path
    say: Callable[[str], None]
    progress: PassProgress
    log: RunLog
    summary: RunSummary = field(default_factory=lambda: RunSummary(atlas=None))
    executor: object = None     # dask_run.DaskPasses when the passes run on Dask workers
    reasons_said: set = field(default_factory=set)

    @property
    def cfg(self) -> RunConfig:
        return self.setup.cfg

    @functools.cached_property
    def by_index(self) -> dict[int, SlideRecord]:
        return dict(enumerate(self.records))

    def folder(self, name: str) -> Path:
        return work_dir(self.out) / name

    def on_slide(self, slide_id: str, status: str, info: dict) -> None:
        self.progress.slide_done()
        self.log.event(f"slide_{status}", slide_id=slide_id, **info)
        for warning in info.get("warnings", []):
            self.say(f"[yellow]warning[/] {escape(slide_id)}: {escape(str(warning))}")
        reason = common_reason(slide_id, info.get("error", "")) if status == "failed" else ""
        if reason and reason not in self.reasons_said:  # the same cause again is only counted (summary)
            self.reasons_said.add(reason)
            self.say(f"[red]failed[/] {escape(slide_id)}: {escape(str(info.get('error')))}")

    def one_pass(self, kind: Pass, todo: list[SlideJob], folder: Path, key: str) -> PassStats:
        """Run one pass over `todo` here or on the Dask workers; one part file per slide in `folder`."""
        if self.executor is not None:
            return self.executor.run_pass(kind, todo, folder, key, on_tiles=self.progress.add_tiles,
                                          on_slide=self.on_slide)
        with pass_engine(kind, self.loaded.module, self.loaded.spec, self.cfg.layer, self.setup.device) as engine:
            return run_pass(kind, todo, engine, folder, key, on_tiles=self.progress.add_tiles,
                            on_slide=self.on_slide)

    def slide_jobs(self, parts: PassParts, key: str, sample_tiles: int = 0) -> list[SlideJob]:
        """The slides whose part is not done with `key`, each with where its tile plan is kept."""
        plans = self.folder("plans")
        return [SlideJob(i, r, sample_tiles, plans / part_name(i, r.slide_id), plan_key(self.cfg, r))
                for i, r in self.by_index.items() if not parts.done(i, key)]


@dataclass
class PassParts:
    """One pass's part files (one per slide, by index) and their attributes, read once and again only for
    the slides the pass wrote (None: missing or unreadable)."""

    paths: list[Path]
    attrs: list[dict | None]

    @classmethod
    def read(cls, folder: Path, records: list[SlideRecord]) -> PassParts:
        paths = [folder / part_name(i, r.slide_id) for i, r in enumerate(records)]
        return cls(paths, [read_part_attrs(p) for p in paths])

    def done(self, i: int, key: str) -> bool:
        return attrs_done(self.attrs[i], key)

    def reread(self, jobs: list[SlideJob]) -> None:
        for j in jobs:
            self.attrs[j.index] = read_part_attrs(self.paths[j.index])

    def status(self, i: int) -> str | None:
        return (self.attrs[i] or {}).get("status")

    def with_status(self, status: str) -> list[int]:
        return [i for i in range(len(self.paths)) if self.status(i) == status]


@dataclass
class Calibration:
    """The calibration pass's result: its parts, and the slides that failed (by index, with the reason)."""

    stats: PassStats
    parts: PassParts
    failed: dict[int, str]

    @property
    def ok(self) -> list[Path]:
        """The parts that hold cells."""
        return [self.parts.paths[i] for i in self.parts.with_status("ok")]


def calibrate(job: Job) -> Calibration:
    """Calibration pass: a seeded sample of tiles and cells per slide, one part file each."""
    cfg, calib_dir = job.cfg, job.folder("calibration")
    ckey = cfg.calibration_key()
    parts = PassParts.read(calib_dir, job.records)
    todo = job.slide_jobs(parts, ckey, sample_tiles=cfg.calib_tiles_per_slide)
    job.say(f"calibration: {len(job.records) - len(todo)} slides reused, {len(todo)} to sample")
    job.progress.start("calibration", len(todo))
    st = job.one_pass(CalibrationPass(cfg, job.setup.layer), todo, calib_dir, ckey)
    parts.reread(todo)
    job.log.event("pass_end", name="calibration", ok=st.ok, no_tissue=st.no_tissue, failed=st.failed,
                  tiles=st.tiles)
    ids = {r.slide_id: i for i, r in job.by_index.items()}
    return Calibration(st, parts, {ids[slide_id]: error for slide_id, error in st.failures})


def fit(job: Job, calib: Calibration) -> tuple[Concepts, dict] | None:
    """NMF on the pooled calibration cells (reused when fitted before on the same parts); None: no cells."""
    cfg, ok = job.cfg, calib.parts.with_status("ok")
    fit_key = cfg.fit_key([calib.parts.attrs[i]["key"] + calib.parts.paths[i].name for i in ok])
    cpath = work_dir(job.out) / CONCEPTS_FILE
    if is_done(cpath, fit_key):
        job.say("concepts: reused the fitted H")
        return load_concepts(cpath)
    V, vmin = pool_cells(calib.ok, cfg.calib_max_cells, cfg.seed)
    if V.size == 0:
        no_cells(job, calib)
        return None
    if vmin < 0:
        job.say(f"[yellow]note[/] layer {escape(cfg.layer)} has negative values (min {vmin:.3g}); shifting by "
                "a low percentile, scaling by the IQR and clamping at 0 before NMF (see README).")
    job.say(f"fitting NMF (K={cfg.k}) on {len(V)} cells x {V.shape[1]} channels")
    concepts, fit_facts = fit_concepts(V, cfg.k, cfg.seed, cfg.nmf_max_iter,
                                       None if cfg.device == "auto" else cfg.device)
    save_concepts(cpath, concepts, fit_key, fit_facts)
    return concepts, fit_facts


def no_cells(job: Job, calib: Calibration) -> None:
    """No calibration cells at all: say why (every slide failed, or no tissue tiles) and end the run."""
    job.summary.failed = len(calib.parts.with_status("failed"))
    job.summary.failures = calib.stats.failures
    if job.summary.failed == len(job.records):
        job.say("[red]every slide failed[/] (reasons below): nothing to cluster.")
    else:
        job.say("[red]no tissue tiles in any slide[/]: nothing to cluster. Check the tissue settings "
                "(--min-tissue), the pixel size, and the slides themselves.")
    job.log.event("run_end", exit_code=EXIT_NO_ATLAS, reason="no tissue tiles")


def full_pass(job: Job, concepts: Concepts, calib_failed: dict[int, str]) -> PassParts:
    """Every tissue tile once: embeddings, outputs, thumbnails and cell weights; returns the slide parts."""
    skey = job.cfg.slide_key(concepts_sha(concepts))
    slides_dir = job.folder("slides")
    parts = PassParts.read(slides_dir, job.records)
    todo = job.slide_jobs(parts, skey)
    job.summary.reused = len(job.records) - len(todo)
    # A slide that could not be read for calibration just now would fail the same way again:
    # record its reason without a second attempt (a later re-run retries it).
    for sj in [j for j in todo if j.index in calib_failed]:
        todo.remove(sj)
        save_part(parts.paths[sj.index], {}, {"key": skey, "status": "failed", "slide_id": sj.record.slide_id,
                                              "path": str(sj.record.path), "error": calib_failed[sj.index]})
        parts.reread([sj])
    for i, r in job.by_index.items():
        if parts.done(i, skey):
            job.log.event("slide_skipped", slide_id=r.slide_id, reason="done with the same settings")
    job.say(f"full pass: {job.summary.reused} slides already done, {len(todo)} to process")
    job.progress.start("full pass", len(todo))
    st = job.one_pass(FullPass(job.cfg, job.setup.layer, concepts), todo, slides_dir, skey)
    parts.reread(todo)
    job.log.event("pass_end", name="full", ok=st.ok, no_tissue=st.no_tissue, failed=st.failed, tiles=st.tiles)
    return parts


def count_statuses(job: Job, slides: PassParts) -> None:
    """Fill the summary's slide counts and failures from the full-pass parts."""
    s = job.summary
    s.ok, s.no_tissue = len(slides.with_status("ok")), len(slides.with_status("no_tissue"))
    failed = slides.with_status("failed")
    s.failed = len(failed)
    s.failures = [(job.records[i].slide_id, slides.attrs[i].get("error", "")) for i in failed]


def atlas_root(job: Job, concepts: Concepts, fit_facts: dict, command_line: str) -> dict:
    """Root attributes of the atlas: provenance, settings, layer geometry and the NMF fit."""
    s, loaded = job.setup, job.loaded
    return {
        "tool": "lumen", "tool_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line or " ".join(sys.argv), "config": job.cfg.to_dict(),
        "model_source": loaded.source, "model_sha256": loaded.sha256 or "", "layer": job.cfg.layer,
        "layer_shape": [s.layer.channels, s.layer.h, s.layer.w], "cell_px": s.layer.cell_px,
        "layer_layout": s.layout.kind, "prefix_tokens_dropped": s.layout.prefix, "k": concepts.H.shape[0],
        "output_names": list(loaded.spec.class_names or []), "device": str(s.device),
        "fit": {k: v for k, v in fit_facts.items() if k not in ("key", "status")},
    }


def fidelity_stage(job: Job, concepts: Concepts, calib_parts: list[Path]) -> Callable | None:
    """The fidelity writer the assembly calls with the open atlas (fidelity_stage.write_fidelity), or None
    when no output is explained."""
    s = job.setup
    if s.out_index is None:
        job.say("note: no output to explain was chosen (--explain), so fidelity statistics are skipped")
        return None
    return functools.partial(write_fidelity, cfg=job.cfg, concepts=concepts, calib_parts=calib_parts,
                             output_index=s.out_index, output_name=s.out_name, say=job.say)


def assemble(job: Job, concepts: Concepts, fit_facts: dict, slides: PassParts, calib_parts: list[Path],
             command_line: str) -> None:
    """Write the atlas from the slide parts (and fidelity when an output is explained); fills the summary."""
    cfg, s, summary = job.cfg, job.setup, job.summary
    count_statuses(job, slides)
    if summary.ok == 0:
        why = ("every slide failed (reasons below)" if summary.failed == len(job.records) else
               f"{summary.no_tissue} slides without tissue tiles at --min-tissue {cfg.min_tissue:g} (the tissue "
               "found is in the warnings above; lower --min-tissue, 0 keeps every tile)")
        job.say(f"[red]no slide produced tiles[/]: no atlas written; {why}.")
        job.log.event("run_end", exit_code=EXIT_NO_ATLAS, reason="no slide produced tiles")
        return
    root = atlas_root(job, concepts, fit_facts, command_line)
    # The atlas holds about what the slide parts hold; a write that cannot fit is not started.
    check_free_space(job.out, int(1.1 * sum(p.stat().st_size for p in slides.paths if p.exists())) + (1 << 20))
    job.say("writing the atlas")
    fidelity = fidelity_stage(job, concepts, calib_parts)
    facts = build_atlas(job.out, job.records, slides.paths, concepts, cfg, root, (s.layer.h, s.layer.w),
                        job.say, fidelity)
    summary.atlas, summary.tiles, summary.facts = job.out, facts["tiles"], facts


def start_log(job_out: Path, setup: Setup, n_slides: int, command_line: str, dask: str | None) -> RunLog:
    """Make the parts folders (removing temps of dead runs) and open the run log with run_start."""
    for name in ("", "calibration", "slides", "plans"):
        d = work_dir(job_out) / name
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(d)
    log = RunLog(job_out.with_name(job_out.name + ".log.jsonl"))
    log.event("run_start", version=__version__, config=setup.cfg.to_dict(), slides=n_slides,
              device=str(setup.device), layer_shape=[setup.layer.channels, setup.layer.h, setup.layer.w],
              command_line=command_line, dask=dask)
    return log


@dataclass
class Fitted:
    """The concepts the full pass assigns cells to, and what the calibration left for it."""

    concepts: Concepts
    facts: dict                  # how H was fitted (or which atlas it came from)
    calib_failed: dict[int, str] = field(default_factory=dict)  # slides that failed calibration, by index
    calib_parts: list[Path] = field(default_factory=list)       # calibration parts with cells (fidelity)


def concepts_stage(job: Job, concepts_from: Path | None) -> Fitted | None:
    """Concepts of an earlier atlas, or calibration pass + NMF fit; None when there are no cells."""
    if concepts_from is not None:
        concepts = concepts_from_atlas(concepts_from, job.setup.layer.channels)
        job.say(f"reusing the {concepts.H.shape[0]} concepts of {escape(str(concepts_from))}")
        return Fitted(concepts, {"concepts_from": str(concepts_from)})
    calib = calibrate(job)
    fitted = fit(job, calib)
    if fitted is None:
        return None
    concepts, facts = fitted
    job.log.event("concepts", **{k: v for k, v in facts.items() if k not in ("key", "status")})
    return Fitted(concepts, facts, calib.failed, calib.ok)


def run(cfg: RunConfig, records: list[SlideRecord], loaded: LoadedModel, out: Path, *,
        concepts_from: Path | None = None, explain: str | None = None, say: Callable[[str], None] = print,
        progress: PassProgress | None = None, command_line: str = "", dask: str | None = None) -> RunSummary:
    """Run the whole job: prepare, calibrate, fit concepts, full pass, assemble (with fidelity).

    Raises ConfigError before any slide is read when settings cannot work. dask: None runs the passes
    in this process; 'local:N' or a scheduler address runs them as one task per slide on Dask workers
    (see dask_run.py). Either way the parts, the NMF fit and the atlas are made here, and the atlas is
    the same."""
    t0 = time.perf_counter()
    setup = prepare(cfg, len(records), loaded, explain, say)
    torch.manual_seed(setup.cfg.seed)
    log = start_log(out, setup, len(records), command_line, dask)
    job = Job(setup, records, loaded, out, say, progress or PassProgress(console=None, enabled=False), log)
    try:
        if dask is not None:
            from .dask_run import DaskPasses  # dask is only imported when asked for
            job.executor = DaskPasses(dask, loaded, setup.cfg.arch, say=say)
            setup.cfg = dataclasses.replace(setup.cfg, compute=job.executor.compute_signature(setup.cfg.device))
        fitted = concepts_stage(job, concepts_from)
        if fitted is None:
            return job.summary
        slides = full_pass(job, fitted.concepts, fitted.calib_failed)
        if job.executor is not None:  # the workers are done; the assembly runs here
            job.executor.close()
        assemble(job, fitted.concepts, fitted.facts, slides, fitted.calib_parts, command_line)
        if job.summary.atlas is not None:
            s = job.summary
            s.seconds = time.perf_counter() - t0
            log.event("run_end", exit_code=s.exit_code, ok=s.ok, no_tissue=s.no_tissue, failed=s.failed,
                      reused=s.reused, tiles=s.tiles, seconds=round(s.seconds, 2), atlas=str(out),
                      relative_error=s.facts.get("relative_error"))
        return job.summary
    finally:
        if job.executor is not None:
            job.executor.close()
        job.summary.seconds = time.perf_counter() - t0
        log.close()
