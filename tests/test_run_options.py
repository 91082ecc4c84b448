"""`run`'s options come from one declaration (precompute/config.py, precompute/cli_options.py): the
command line, its defaults, the config's defaults and README's list of options must agree."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer.main

from conftest import REPO
from precompute.cli import app
from precompute.cli_options import JobOptions, all_options, split
from precompute.config import CALIBRATION, FIT, SLIDE, RunConfig, options

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def run_command():
    return typer.main.get_command(app).commands["run"]


def _readme_entry(f: dataclasses.Field, flag) -> str:
    """How README lists an option: its flag(s) and, when it has one, its default."""
    if f.default is dataclasses.MISSING:
        return f"`{flag.decls}` (required)"
    if f.default is None or f.default is False and "/" not in flag.decls:
        return f"`{flag.decls}`"
    if isinstance(f.default, bool):
        return f"`{flag.decls}` ({'on' if f.default else 'off'})"
    shown = flag.show(f.default) if flag.show else f.default
    return f"`{flag.name} {shown}`"


def expected_readme_lines() -> list[str]:
    panels: dict[str, list[str]] = {}
    for f, flag in all_options():
        panels.setdefault(flag.panel, []).append(_readme_entry(f, flag))
    return [f"- **{panel}**: " + ", ".join(entries) + "." for panel, entries in panels.items()]


def test_command_line_defaults_are_the_config_defaults(run_command):
    """Parsing a command line with only the required options gives RunConfig's declared defaults."""
    ctx = run_command.make_context("run", ["--cohort", "c.csv", "--model", "m", "--out", "a.h5"])
    cfg, job = split(ctx.params)
    assert cfg == RunConfig(model="m")
    assert job == JobOptions(cohort=ctx.params["cohort"], out=ctx.params["out"])
    for f, flag in options():  # and each option is declared where RunConfig's field is
        param = next(p for p in run_command.params if p.name == f.name)
        assert flag.name in param.opts and param.help == flag.help


def test_every_setting_is_an_option_or_derived_by_the_run(run_command):
    flags = {o for p in run_command.params for o in p.opts}
    for f in dataclasses.fields(RunConfig):
        flag = f.metadata["flag"]
        assert (flag and flag.name in flags) or f.metadata["derived"], f"{f.name}: neither an option nor derived"


def test_part_keys_hold_the_settings_that_change_parts():
    """A setting that changes what a pass computes is in that pass's key (else a resumed run would reuse
    parts made with another value); execution settings are in none."""
    tiling = {"model", "layer", "arch", "model_sha256", "relu", "tile_px", "stride_px", "target_mpp", "cli_mpp",
              "native_resolution", "min_tissue", "compute"}
    assert set(RunConfig.key_names(CALIBRATION)) == tiling | {"seed", "calib_tiles_per_slide", "calib_cells_per_tile"}
    assert set(RunConfig.key_names(SLIDE)) == tiling | {"edge_cells", "thumb_px", "output_activation",
                                                        "prototypes_per_cluster", "gradcam"}
    assert set(RunConfig.key_names(FIT)) == {"k", "seed", "nmf_max_iter", "calib_max_cells"}
    base = RunConfig(model="m", layer="l", tile_px=64, stride_px=64)
    assert dataclasses.replace(base, thumb_px=64).slide_key("H") != base.slide_key("H")
    assert dataclasses.replace(base, tile_px=32).calibration_key() != base.calibration_key()
    assert dataclasses.replace(base, seed=1).calibration_key() != base.calibration_key()
    fast = dataclasses.replace(base, batch_size=8, workers=3, device="cpu")
    assert (fast.slide_key("H"), fast.calibration_key(), fast.fit_key([])) == \
        (base.slide_key("H"), base.calibration_key(), base.fit_key([]))


def test_readme_lists_every_option_with_its_default():
    text = (REPO / "README.md").read_text()
    missing = [line for line in expected_readme_lines() if line not in text]
    assert not missing, "README's options of `run` should read:\n" + "\n".join(expected_readme_lines())


# A default quoted in prose: "`--min-tissue` (default 0.25)", "(`--calib-tiles`, 48)", "`--k` 6", "`--max-calib-cells` (200,000)".
QUOTED = re.compile(r"`(--[a-z][a-z-]*)`,?\s\(?(?:default\s)?(\d[\d,]*(?:\.\d+)?)\b")


def test_defaults_quoted_in_the_docs_are_the_declared_ones():
    defaults = {flag.name: f.default for f, flag in options()}
    quoted = [(doc.name, m.group(1), m.group(2)) for doc in DOCS for m in QUOTED.finditer(doc.read_text())]
    assert len(quoted) >= 4  # the pattern still finds the defaults the README quotes
    wrong = [q for q in quoted if q[1] in defaults and float(q[2].replace(",", "")) != defaults[q[1]]]
    assert not wrong, wrong
