"""pyproject.toml: the same pins as requirements.txt, commands that point at real functions, and a
dashboard that finds its packages without editing sys.path."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_pyproject_pins_match_requirements():
    pins = {line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    project = _project()
    declared = set(project["dependencies"]) | {p for extra in project.get("optional-dependencies", {}).values()
                                               for p in extra}
    assert declared == pins


def test_commands_point_at_callables():
    scripts = _project()["scripts"]
    assert {"lumen-precompute", "lumen-dashboard"} <= set(scripts)
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_dashboard_command_runs_the_app_script():
    from dashboard.launch import APP, streamlit_argv

    argv = streamlit_argv(["--atlas", "a.h5"])
    assert argv[:3] == ["streamlit", "run", str(APP)] and argv[3:] == ["--", "--atlas", "a.h5"]
    assert APP == REPO / "dashboard" / "app.py" and APP.is_file()


def test_app_does_not_edit_sys_path():
    tree = ast.parse((REPO / "dashboard" / "app.py").read_text())
    edits = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert edits == []
