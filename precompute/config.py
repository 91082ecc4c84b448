"""Run configuration: every setting that shapes an atlas, declared once, and the keys that decide what a
resumed run may reuse.

Each field of RunConfig is declared with `setting(...)`: its default, its `run` flag and help text, the
help panel it is listed under, and the part keys it belongs to. The `run` command's options
(cli_options.py), their defaults and help, and the part keys are all derived from these declarations.
A field without a flag is derived by the run itself (`derived=` says from what).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

# Part keys a setting can belong to (a changed setting redoes the parts whose key holds it).
CALIBRATION = "calibration"  # per-slide calibration sample
SLIDE = "slide"              # per-slide full-pass result
FIT = "fit"                  # the fitted concepts H
PLAN = "plan"                # per-slide tile plan: tissue mask and tile grid (tile_plan.py)
TILING = (CALIBRATION, SLIDE)  # what tiles are read and what the model makes of them: both passes
GRID = (*TILING, PLAN)       # where the tiles are: the plan and both passes

# Help panels of `run --help`, in the order they are listed.
PANELS = ("Inputs", "Tiling", "Concepts", "Outputs and fidelity", "Execution")


@dataclass(frozen=True)
class Flag:
    """How a setting appears on the `run` command line."""

    decls: str                      # e.g. "--calib-tiles", or "--relu/--no-relu" for a switch
    help: str
    panel: str
    limits: dict = dataclasses.field(default_factory=dict)  # click min/max
    cli_type: Any = None            # type on the command line when it differs from the field's (k_grid: str)
    parse: Callable[[Any], Any] | None = None   # command-line value -> field value (raises ValueError)
    show: Callable[[Any], Any] | None = None    # field default -> command-line default
    first: bool = False             # listed first in its panel

    @property
    def name(self) -> str:
        """The first flag, e.g. --relu of --relu/--no-relu."""
        return self.decls.split("/")[0]


def setting(default: Any = dataclasses.MISSING, *, flag: str | None = None, help: str = "", panel: str = "",
            keys: tuple[str, ...] = (), derived: str = "", min: float | None = None, max: float | None = None,
            **flag_kw) -> Any:
    """A RunConfig field: `flag` (with help and panel) puts it on the `run` command line; `keys` names the
    part keys it is part of; `derived` says where a field without a flag comes from."""
    assert bool(flag) != bool(derived), "a setting is either an option or derived by the run"
    assert not flag or panel in PANELS, panel
    meta = {"keys": tuple(keys), "derived": derived,
            "flag": None}
    if flag:
        limits = {n: v for n, v in (("min", min), ("max", max)) if v is not None}
        meta["flag"] = Flag(flag, help, panel, limits, **flag_kw)
    return dataclasses.field(default=default, metadata=meta)


def parse_k_grid(text: str) -> tuple[int, ...]:
    """'4,6,8,10' -> (4, 6, 8, 10); '' -> (). ValueError unless every value is a whole number >= 2."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = (0,)
    if any(v < 2 for v in values):
        raise ValueError(f"--k-grid needs comma-separated whole numbers >= 2, e.g. 4,6,8,10; got {text!r}")
    return values


def _choice(name: str, allowed: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
        return value
    return check


@dataclass(frozen=True)
class RunConfig:
    """Settings of one `precompute run`. Pixel units: model input px unless named *_l0 (level 0).

    None (and workers -1) mean "decided by the run" (cli_options.resolve, pipeline.prepare); the
    config stored in the atlas and the run log holds the resolved values."""

    model: str = setting(flag="--model", panel="Inputs", help="'capricorn-crc' (built-in demo), a state_dict "
                         "checkpoint with --arch, or 'package.module:factory'.", keys=TILING)
    layer: str | None = setting(None, flag="--layer", panel="Inputs", keys=TILING, help="Module name to hook "
                                "(see `layers`). Default: the model's default layer.")
    arch: str | None = setting(None, flag="--arch", panel="Inputs", keys=TILING, help="Architecture of a "
                               "state_dict checkpoint: a torchvision name (resnet50) or timm:NAME.")
    model_sha256: str | None = setting(None, derived="sha256 of the model file", keys=TILING)
    relu: bool | None = setting(None, flag="--relu/--no-relu", panel="Concepts", keys=TILING,
                                help="Apply ReLU to the captured activations (default: the model's setting).")
    # tiling
    tile_px: int | None = setting(None, flag="--tile-px", panel="Tiling", keys=GRID, min=16,
                                  help="Tile side in px fed to the model (default: the model's input size).")
    stride_px: int | None = setting(None, flag="--stride-px", panel="Tiling", keys=GRID, min=1,
                                    help="Grid step in px (default: tile size, no overlap).")
    target_mpp: float = setting(0.5, flag="--target-mpp", panel="Tiling", keys=GRID, min=0.01,
                                help="Pixel size tiles are resampled to, um/px.")
    cli_mpp: float | None = setting(None, flag="--mpp", panel="Tiling", keys=GRID, min=0.01,
                                    help="Pixel size (um/px) for slides whose file and manifest give none.")
    native_resolution: bool = setting(False, flag="--native-resolution", panel="Tiling", keys=GRID,
                                      help="Tile slides without a known pixel size at their own pixels "
                                      "instead of failing them.")
    min_tissue: float = setting(0.25, flag="--min-tissue", panel="Tiling", keys=GRID, min=0.0, max=1.0,
                                help="Minimum tissue fraction of a kept tile; 0 keeps every tile (pre-cut "
                                "tile datasets).")
    edge_cells: int = setting(0, flag="--edge-cells", panel="Tiling", keys=(SLIDE,), min=0,
                              help="Cells dropped at each tile edge before averaging overlapping tiles (needs "
                              "--stride-px < --tile-px).")
    thumb_px: int = setting(80, flag="--thumb-px", panel="Tiling", keys=(SLIDE,), min=8,
                            help="Side in px of the JPEG thumbnail stored per tile.")
    # clustering
    k: int = setting(6, flag="--k", panel="Concepts", keys=(FIT,), min=2, help="Number of NMF concepts "
                     "(clusters).")
    kmeans_k: int | None = setting(None, flag="--kmeans-k", panel="Concepts", min=2,
                                   help="Tile-level k-means clusters (default: --k).")
    seed: int = setting(0, flag="--seed", panel="Concepts", keys=(CALIBRATION, FIT),
                        help="Seed for every random choice.")
    calib_tiles_per_slide: int = setting(48, flag="--calib-tiles", panel="Concepts", keys=(CALIBRATION,), min=1,
                                         help="Tiles sampled per slide to fit the concepts.")
    calib_cells_per_tile: int | None = setting(
        None, flag="--calib-cells", panel="Concepts", keys=(CALIBRATION,), min=1,
        help="Cells sampled per calibration tile. Default: all of a tile's cells while the calibration sample "
             "fits --max-calib-cells, else as many as fit (at least 8).")
    calib_max_cells: int = setting(200_000, flag="--max-calib-cells", panel="Concepts", keys=(FIT,), min=10,
                                   help="Cap on pooled cells for NMF.")
    nmf_max_iter: int = setting(500, flag="--nmf-max-iter", panel="Concepts", keys=(FIT,), min=1,
                                help="Iterations of the NMF fit at most.")
    projection: str = setting("pca", flag="--projection", panel="Concepts", parse=_choice("--projection",
                              ("pca", "umap")), help="2-D projection: pca or umap.")
    prototypes_per_cluster: int = setting(16, flag="--prototypes", panel="Concepts", keys=(SLIDE,), min=1,
                                          help="Prototype tiles kept per concept.")
    output_activation: str = setting(
        "auto", flag="--output-activation", panel="Outputs and fidelity", keys=(SLIDE,),
        parse=_choice("--output-activation", ("auto", "softmax", "sigmoid", "none")),
        help="Probabilities from outputs: auto (softmax, or sigmoid for one output), softmax, sigmoid, none.")
    # fidelity
    explain_output: int | None = setting(None, derived="--explain (a name or index) resolved to the output's "
                                         "column")
    target: str | None = setting(
        None, flag="--target", panel="Outputs and fidelity",
        help="What of the explained output the regression, GradCAM and importance explain: logit, log-odds "
             "(one-vs-rest) or contrast (logit minus the mean of the others). Default: log-odds for softmax "
             "heads, logit for sigmoid or single-output heads.")
    gradcam: bool = setting(False, flag="--gradcam/--no-gradcam", panel="Outputs and fidelity", keys=(SLIDE,),
                            help="Compute GradCAM of the explained output in the full pass (costs a backward "
                            "pass) and correlate it with each concept.")
    importance: bool = setting(False, flag="--importance/--no-importance", panel="Outputs and fidelity",
                               help="Concept importance by intervention: remove each concept from the hooked "
                               "layer and rerun the rest of the network (2K extra forward passes per batch).")
    positive_threshold: float = setting(0.5, flag="--positive-threshold", panel="Outputs and fidelity", min=0.0,
                                        max=1.0, help="Probability above which a tile counts as called positive.")
    k_grid: tuple[int, ...] = setting((4, 6, 8, 10), flag="--k-grid", panel="Outputs and fidelity",
                                      cli_type=str, parse=parse_k_grid, show=lambda v: ",".join(map(str, v)),
                                      help="K values compared on the calibration sample (comma-separated; "
                                      "empty to skip).")
    # device type and precision the model runs in: part of every part file's key, so a run resumed on
    # another device or precision redoes those slides
    compute: str = setting("cpu-fp32", derived="device type and precision (activations.compute_signature)",
                           keys=TILING)
    # execution: never part of a part file's key, they do not change results
    batch_size: int = setting(32, flag="--batch-size", panel="Execution", min=1, help="Tiles per model batch.")
    workers: int = setting(-1, flag="--workers", panel="Execution", help="Tile-reading processes (-1: CPU cores "
                           "- 1, 0: read in the main process).")
    device: str = setting("auto", flag="--device", panel="Execution",
                          help="auto (CUDA when present), cuda, cuda:1, cpu.")

    def to_dict(self) -> dict:
        return asdict(self)

    def _key(self, names: tuple[str, ...], extra: dict | None = None) -> str:
        payload = {n: getattr(self, n) for n in names}
        payload.update(extra or {})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @staticmethod
    def key_names(part: str) -> tuple[str, ...]:
        """The settings a part key (CALIBRATION, SLIDE or FIT) depends on, as declared."""
        return tuple(f.name for f in dataclasses.fields(RunConfig) if part in f.metadata["keys"])

    def calibration_key(self) -> str:
        """What a per-slide calibration sample depends on."""
        return self._key(self.key_names(CALIBRATION))

    def fit_key(self, parts: list[str]) -> str:
        """What the fitted concepts depend on: the fit settings and the calibration parts used."""
        return self._key(self.key_names(FIT), {"parts": parts})

    def slide_key(self, concepts_sha: str) -> str:
        """What a per-slide full-pass result depends on: tiling, thumbnails, and the concepts H."""
        extra = {"concepts": concepts_sha, "cam_output": self.explain_output if self.gradcam else None,
                 "maps": "glass-masked"}  # parts of older versions have concepts on glass: redo them
        if self.gradcam and self.target not in (None, "logit"):
            extra["cam_target"] = self.target  # the GradCAM maps depend on it (logit keeps older keys valid)
        if self.importance:
            extra["importance"] = [self.explain_output, self.target]
        return self._key(self.key_names(SLIDE), extra)


def options() -> list[tuple[dataclasses.Field, Flag]]:
    """RunConfig's fields that are `run` options, with their flags, in declaration order."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(RunConfig) if f.metadata["flag"]]
