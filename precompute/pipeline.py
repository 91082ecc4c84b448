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
from .activations import (Concepts, cell_layout, choose_output_activation, compute_signature, dry_outputs,
                          pick_device, resolve_output)
from .assemble import build_atlas
from .atomic import remove_stale_tmp
from .cohort import SlideRecord
from .concepts import (CONCEPTS_FILE, auto_cells_per_tile, concepts_from_atlas, concepts_sha, fit_concepts,
                       load_concepts, pool_cells, save_concepts)
from .config import RunConfig
from .fidelity_stage import write_fidelity
from .models import LoadedModel, find_layer
from .parts import is_done, part_name, read_part_attrs, save_part
from .passes import LayerInfo, PassStats, make_engine, run_pass
from .runlock import check_free_space
from .runlog import PassProgress, RunLog, common_reason
from .targets import default_target
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


def run(cfg: RunConfig, records: list[SlideRecord], loaded: LoadedModel, out: Path, *,
        concepts_from: Path | None = None, explain: str | None = None, say: Callable[[str], None] = print,
        progress: PassProgress | None = None, command_line: str = "", dask: str | None = None) -> RunSummary:
    """Run the whole job. Raises ConfigError before any slide is read when settings cannot work.

    dask: None runs the passes in this process; 'local:N' or a scheduler address runs them as one task
    per slide on Dask workers (see dask_run.py). Either way the parts, the NMF fit and the atlas are
    made here, and the atlas is the same."""
    t0 = time.perf_counter()
    layer_mod = find_layer(loaded.module, cfg.layer)
    layout, raw_shape = cell_layout(loaded.module, layer_mod, cfg.tile_px)
    c, h, w = layout.channels, layout.h, layout.w
    if layout.kind != "nchw":
        say(f"note: layer {escape(cfg.layer)} gives {layout.describe(raw_shape)}")
    layer = LayerInfo(c, h, w, cfg.tile_px)
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
            h * w, len(records), cfg.calib_tiles_per_slide, cfg.calib_max_cells))
    device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, explain_output=out_index, target=target, compute=compute_signature(device),
                              output_activation=activation)
    torch.manual_seed(cfg.seed)

    wd = work_dir(out)
    calib_dir, slides_dir = wd / "calibration", wd / "slides"
    for d in (wd, calib_dir, slides_dir):
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(d)
    log = RunLog(out.with_name(out.name + ".log.jsonl"))
    log.event("run_start", version=__version__, config=cfg.to_dict(), slides=len(records), device=str(device),
              layer_shape=[c, h, w], command_line=command_line, dask=dask)
    by_index = {i: r for i, r in enumerate(records)}
    summary = RunSummary(atlas=None)
    progress = progress or PassProgress(console=None, enabled=False)  # type: ignore[arg-type]

    reasons_said: set[str] = set()

    def on_slide(slide_id: str, status: str, info: dict) -> None:
        progress.slide_done()
        log.event(f"slide_{status}", slide_id=slide_id, **info)
        for warning in info.get("warnings", []):
            say(f"[yellow]warning[/] {escape(slide_id)}: {escape(str(warning))}")
        reason = common_reason(slide_id, info.get("error", "")) if status == "failed" else ""
        if reason and reason not in reasons_said:  # the same cause again is only counted (summary)
            reasons_said.add(reason)
            say(f"[red]failed[/] {escape(slide_id)}: {escape(str(info.get('error')))}")

    def one_pass(kind: str, todo: list[SlideJob], folder: Path, key: str, concepts: Concepts | None) -> PassStats:
        if executor is not None:
            return executor.run_pass(kind, todo, cfg, layer, folder, key, concepts,
                                     on_tiles=progress.add_tiles, on_slide=on_slide)
        engine = make_engine(kind, loaded.module, loaded.spec, layer_mod, device, cfg, concepts)
        try:
            return run_pass(kind, todo, by_index, engine, cfg, layer, folder, key,
                            on_tiles=progress.add_tiles, on_slide=on_slide)
        finally:
            engine.close()

    executor = None
    try:
        if dask is not None:
            from .dask_run import DaskPasses  # dask is only imported when asked for
            executor = DaskPasses(dask, loaded, cfg.arch, say=say)
            cfg = dataclasses.replace(cfg, compute=executor.compute_signature(cfg.device))
        # 1. concepts: reuse, or calibrate and fit
        calib_failed: dict[int, str] = {}
        if concepts_from is not None:
            concepts = concepts_from_atlas(concepts_from, c)
            fit_facts = {"concepts_from": str(concepts_from)}
            say(f"reusing the {concepts.H.shape[0]} concepts of {escape(str(concepts_from))}")
        else:
            ckey = cfg.calibration_key()
            calib_paths = [calib_dir / part_name(i, r.slide_id) for i, r in by_index.items()]
            todo = [SlideJob(i, r, sample_tiles=cfg.calib_tiles_per_slide) for i, r in by_index.items()
                    if not is_done(calib_paths[i], ckey)]
            say(f"calibration: {len(records) - len(todo)} slides reused, {len(todo)} to sample")
            progress.start("calibration", len(todo))
            st = one_pass("calibration", todo, calib_dir, ckey, None)
            log.event("pass_end", name="calibration", ok=st.ok, no_tissue=st.no_tissue, failed=st.failed,
                      tiles=st.tiles)
            ids = {r.slide_id: i for i, r in by_index.items()}
            calib_failed = {ids[slide_id]: error for slide_id, error in st.failures}
            ok_calib = [p for p in calib_paths if (read_part_attrs(p) or {}).get("status") == "ok"]
            fit_key = cfg._key(("k", "seed", "nmf_max_iter", "calib_max_cells"),
                               {"parts": [read_part_attrs(p)["key"] + p.name for p in ok_calib]})
            cpath = wd / CONCEPTS_FILE
            if is_done(cpath, fit_key):
                concepts, fit_facts = load_concepts(cpath)
                say("concepts: reused the fitted H")
            else:
                V, vmin = pool_cells(ok_calib, cfg.calib_max_cells, cfg.seed)
                if V.size == 0:
                    summary.failed = sum(1 for p in calib_paths if (read_part_attrs(p) or {}).get("status") == "failed")
                    summary.failures = st.failures
                    if summary.failed == len(records):
                        say("[red]every slide failed[/] (reasons below): nothing to cluster.")
                    else:
                        say("[red]no tissue tiles in any slide[/]: nothing to cluster. Check the tissue settings "
                            "(--min-tissue), the pixel size, and the slides themselves.")
                    log.event("run_end", exit_code=EXIT_NO_ATLAS, reason="no tissue tiles")
                    return summary
                if vmin < 0:
                    say(f"[yellow]note[/] layer {escape(cfg.layer)} has negative values (min {vmin:.3g}); shifting by "
                        "a low percentile, scaling by the IQR and clamping at 0 before NMF (see README).")
                say(f"fitting NMF (K={cfg.k}) on {len(V)} cells x {V.shape[1]} channels")
                concepts, fit_facts = fit_concepts(V, cfg.k, cfg.seed, cfg.nmf_max_iter,
                                                   None if cfg.device == "auto" else cfg.device)
                save_concepts(cpath, concepts, fit_key, fit_facts)
                fit_facts = {k: v for k, v in fit_facts.items()}
            log.event("concepts", **{k: v for k, v in fit_facts.items() if k not in ("key", "status")})

        # 2. full pass
        skey = cfg.slide_key(concepts_sha(concepts))
        slide_paths = [slides_dir / part_name(i, r.slide_id) for i, r in by_index.items()]
        todo = [SlideJob(i, r) for i, r in by_index.items() if not is_done(slide_paths[i], skey)]
        summary.reused = len(records) - len(todo)
        # A slide that could not be read for calibration just now would fail the same way again:
        # record its reason without a second attempt (a later re-run retries it).
        for job in [j for j in todo if j.index in calib_failed]:
            todo.remove(job)
            save_part(slide_paths[job.index], {}, {"key": skey, "status": "failed", "slide_id": job.record.slide_id,
                                                   "path": str(job.record.path), "error": calib_failed[job.index]})
        for i, r in by_index.items():
            if is_done(slide_paths[i], skey):
                log.event("slide_skipped", slide_id=r.slide_id, reason="done with the same settings")
        say(f"full pass: {summary.reused} slides already done, {len(todo)} to process")
        progress.start("full pass", len(todo))
        st = one_pass("full", todo, slides_dir, skey, concepts)
        log.event("pass_end", name="full", ok=st.ok, no_tissue=st.no_tissue, failed=st.failed, tiles=st.tiles)
        if executor is not None:  # the workers are done; the assembly runs here
            executor.close()

        # 3. atlas
        statuses = [(read_part_attrs(p) or {}) for p in slide_paths]
        summary.ok = sum(a.get("status") == "ok" for a in statuses)
        summary.no_tissue = sum(a.get("status") == "no_tissue" for a in statuses)
        summary.failed = sum(a.get("status") == "failed" for a in statuses)
        summary.failures = [(r.slide_id, a.get("error", "")) for r, a in zip(records, statuses)
                            if a.get("status") == "failed"]
        if summary.ok == 0:
            why = ("every slide failed (reasons below)" if summary.failed == len(records) else
                   f"{summary.no_tissue} slides without tissue tiles at --min-tissue {cfg.min_tissue:g} (the tissue "
                   "found is in the warnings above; lower --min-tissue, 0 keeps every tile)")
            say(f"[red]no slide produced tiles[/]: no atlas written; {why}.")
            log.event("run_end", exit_code=EXIT_NO_ATLAS, reason="no slide produced tiles")
            return summary
        root = {
            "tool": "lumen", "tool_version": __version__,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command_line": command_line or " ".join(sys.argv), "config": cfg.to_dict(),
            "model_source": loaded.source, "model_sha256": loaded.sha256 or "", "layer": cfg.layer,
            "layer_shape": [c, h, w], "cell_px": layer.cell_px, "layer_layout": layout.kind,
            "prefix_tokens_dropped": layout.prefix, "k": concepts.H.shape[0],
            "output_names": list(loaded.spec.class_names or []), "device": str(device),
            "fit": {k: v for k, v in fit_facts.items() if k not in ("key", "status")},
        }
        # The atlas holds about what the slide parts hold; a write that cannot fit is not started.
        check_free_space(out, int(1.1 * sum(p.stat().st_size for p in slide_paths if p.exists())) + (1 << 20))
        say("writing the atlas")
        fidelity = None
        if out_index is not None:
            calib_parts = [] if concepts_from is not None else ok_calib
            fidelity = functools.partial(write_fidelity, cfg=cfg, concepts=concepts, calib_parts=calib_parts,
                                         output_index=out_index, output_name=out_name, say=say)
        else:
            say("note: no output to explain was chosen (--explain), so fidelity statistics are skipped")
        facts = build_atlas(out, records, slide_paths, concepts, cfg, root, (h, w), say, fidelity)
        summary.atlas = out
        summary.tiles = facts["tiles"]
        summary.facts = facts
        summary.seconds = time.perf_counter() - t0
        log.event("run_end", exit_code=summary.exit_code, ok=summary.ok, no_tissue=summary.no_tissue,
                  failed=summary.failed, reused=summary.reused, tiles=summary.tiles,
                  seconds=round(summary.seconds, 2), atlas=str(out), relative_error=facts.get("relative_error"))
        return summary
    finally:
        if executor is not None:
            executor.close()
        summary.seconds = time.perf_counter() - t0
        log.close()
