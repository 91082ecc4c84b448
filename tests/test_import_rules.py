"""Layer rules: torch only in the model and engine modules; the atlas, the report, the exports and the
dashboard load neither torch nor scikit-learn's NMF stack; precompute imports nothing from the dashboard;
the package's modules import one way (no cycles). Static checks read the source with ast; runtime checks import in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("precompute", "dashboard")
# The model modules (loading networks) and the engine (running them over tiles on the device).
TORCH_ALLOWED = {
    "precompute.models", "precompute.model_base", "precompute.capricorn", "precompute.timm_models",
    "precompute.model_outputs", "precompute.activations", "precompute.cells", "precompute.intervention",
    "precompute.nmf", "precompute.tile_stream", "precompute.passes", "precompute.dask_run", "precompute.pipeline",
}
TORCH_PACKAGES = {"torch", "torchvision", "timm"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `name` imports, at the top or inside a function (a lazy import still couples)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = _modules()
    raw = {name: _imports(name, path, known) for name, path in known.items()}
    internal = {name: {m for m in deps if m in known and m != name} for name, deps in raw.items()}
    return raw, internal


def test_only_model_and_engine_modules_import_torch():
    raw, _ = _graph()
    importers = {name for name, deps in raw.items() if {d.split(".")[0] for d in deps} & TORCH_PACKAGES}
    assert importers <= TORCH_ALLOWED, f"torch imported outside the model and engine modules: {importers - TORCH_ALLOWED}"
    assert not any(name.startswith("dashboard") for name in importers)


def _dashboard_imports(raw: dict[str, set[str]]) -> dict[str, list[str]]:
    """precompute modules -> the dashboard modules they import (none may: the dashboard is one reader
    of the atlas among the report and the exports, and the run must not depend on it)."""
    found = {name: sorted(d for d in deps if d.split(".")[0] == "dashboard")
             for name, deps in raw.items() if name.split(".")[0] == "precompute"}
    return {name: deps for name, deps in found.items() if deps}


def test_precompute_imports_nothing_from_the_dashboard(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import dashboard.labels\nfrom dashboard import ui\n\ndef f():\n    from dashboard.data import AtlasData\n")
    assert _dashboard_imports({"precompute.probe": _imports("precompute.probe", probe, {})}) == {
        "precompute.probe": ["dashboard", "dashboard.data", "dashboard.labels"]}
    raw, _ = _graph()
    assert _dashboard_imports(raw) == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    _, graph = _graph()
    assert _cycles(graph) == []


_PROBE = """
import importlib, sys
forbidden, names = sys.argv[1].split(","), sys.argv[2:]
for name in names:
    importlib.import_module(name)
print(" ".join(m for m in forbidden if m in sys.modules) or "clean")
"""
NEITHER = "torch,sklearn.decomposition"


@pytest.mark.parametrize("forbidden, modules", [
    (NEITHER, ["precompute.store"]),
    (NEITHER, ["precompute.report"]),
    (NEITHER, ["precompute.meeting_report", "precompute.geojson_export", "precompute.atlas_summary"]),
    # the dashboard's cold start: no scikit-learn, scipy or scikit-image at all (each costs seconds to import)
    (NEITHER + ",sklearn,scipy,skimage", ["dashboard.data", "dashboard.fidelity", "dashboard.naming", "dashboard.views.overview",
               "dashboard.views.cluster", "dashboard.views.slide", "dashboard.views.enrichment",
               "dashboard.views.fidelity"]),
    ("torch", ["precompute.assemble", "precompute.concepts", "precompute.targets", "precompute.correlation"]),
], ids=["store", "report", "exports", "dashboard", "assembly-no-torch"])
def test_reading_side_loads_neither_torch_nor_nmf(forbidden, modules):
    done = subprocess.run([sys.executable, "-c", _PROBE, forbidden, *modules], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "clean", f"{modules} loaded {done.stdout.strip()}"
