"""The `run` command's options, derived from the declarations in config.py (RunConfig's settings) and
JobOptions below (what a run needs besides the settings: where the cohort is, where the atlas goes...).

`run_signature()` is the Typer signature of `run`; `split(values)` turns the command line's values into a
RunConfig (still with its "decided by the run" Nones, see `resolve`) and the JobOptions.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import typer

from .config import PANELS, Flag, RunConfig, options, setting


@dataclass(frozen=True)
class JobOptions:
    """`run` options that are not settings of the atlas (they are not stored in its config)."""

    cohort: Path = setting(flag="--cohort", panel="Inputs", help="Manifest CSV (slide_id,path,diagnosis[,mpp,"
                           "patient,...]) or a folder of slides.", first=True)
    out: Path = setting(flag="--out", panel="Inputs", help="Atlas file to write (e.g. atlas.h5).", first=True)
    concepts: Path | None = setting(None, flag="--concepts", panel="Inputs",
                                    help="Reuse the concepts H of an earlier atlas.")
    input_px: int | None = setting(None, flag="--input-px", panel="Inputs", help="Override the model's input size.")
    scale: float | None = setting(None, flag="--scale", panel="Inputs",
                                  help="Override input scaling (e.g. 0.00392157).")
    mean: str | None = setting(None, flag="--mean", panel="Inputs",
                               help="Override per-channel mean, e.g. 0.485,0.456,0.406.")
    std: str | None = setting(None, flag="--std", panel="Inputs",
                              help="Override per-channel std, e.g. 0.229,0.224,0.225.")
    explain: str | None = setting(None, flag="--explain", panel="Outputs and fidelity", first=True,
                                  help="Model output (name or index) the fidelity statistics explain. Default: TUM "
                                  "for the demo model, the only or positive output of one- and two-output models.")
    progress: bool = setting(True, flag="--progress/--no-progress", panel="Execution", help="Show live progress bars.")
    dask: str | None = setting(None, flag="--dask", panel="Execution",
                               help="Run the passes as one task per slide on Dask: local:N (N worker processes "
                               "here) or a scheduler address (tcp://host:8786, or a scheduler file *.json). See "
                               "README.")


def all_options() -> list[tuple[dataclasses.Field, Flag]]:
    """Every `run` option (settings and job options) in the order `run --help` lists them."""
    job = [(f, f.metadata["flag"]) for f in dataclasses.fields(JobOptions)]
    every = [o for o in job if o[1].first] + options() + [o for o in job if not o[1].first]
    return sorted(every, key=lambda o: (PANELS.index(o[1].panel), not o[1].first))


def cli_default(f: dataclasses.Field, flag: Flag):
    """The option's default as the command line shows and takes it (... when required)."""
    if f.default is dataclasses.MISSING:
        return ...
    return flag.show(f.default) if flag.show else f.default


def run_signature() -> inspect.Signature:
    """Keyword parameters with typer.Option defaults: Typer builds the `run` options from them."""
    hints = {**typing.get_type_hints(RunConfig), **typing.get_type_hints(JobOptions)}
    params = []
    for f, flag in all_options():
        opt = typer.Option(cli_default(f, flag), flag.decls, help=flag.help, rich_help_panel=flag.panel,
                           **flag.limits)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                        annotation=flag.cli_type or hints[f.name]))
    return inspect.Signature(params)


def split(values: dict) -> tuple[RunConfig, JobOptions]:
    """Command-line values by name (missing ones take the declared defaults) -> (RunConfig, JobOptions).
    Raises ValueError naming the option when a value cannot be parsed."""
    job_names = {f.name for f in dataclasses.fields(JobOptions)}
    unknown = set(values) - job_names - {f.name for f, _ in options()}
    if unknown:
        raise TypeError(f"not options of run: {sorted(unknown)}")
    settings = {}
    for f, flag in options():
        value = values.get(f.name, cli_default(f, flag))
        settings[f.name] = flag.parse(value) if flag.parse and value is not None else value
    job = JobOptions(**{n: v for n, v in values.items() if n in job_names})
    return RunConfig(**settings), job


def resolve(cfg: RunConfig, loaded) -> RunConfig:
    """Fill in what the model decides: layer, tile and stride, ReLU, the model's fingerprint; and the
    number of reading processes. ValueError when the model has no default layer and none was given."""
    from .models import default_relu

    spec = loaded.spec
    layer = cfg.layer or spec.default_layer
    if not layer:
        raise ValueError("no default layer")
    tile = cfg.tile_px or spec.input_px
    workers = max(0, min(8, (os.cpu_count() or 2) - 1)) if cfg.workers < 0 else cfg.workers
    return dataclasses.replace(cfg, layer=layer, model_sha256=loaded.sha256, tile_px=tile,
                               stride_px=cfg.stride_px or tile, workers=workers,
                               relu=default_relu(spec, layer) if cfg.relu is None else cfg.relu)
