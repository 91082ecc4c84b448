"""Run configuration: every setting that shapes an atlas, and the keys that decide what a resumed run may reuse."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RunConfig:
    """Settings of one `precompute run`. Pixel units: model input px unless named *_l0 (level 0)."""

    model: str
    layer: str
    arch: str | None = None
    model_sha256: str | None = None
    relu: bool = False              # apply ReLU to the captured activations (default: models.default_relu)
    # tiling
    tile_px: int = 224              # tile side fed to the model
    stride_px: int = 224            # grid step; < tile_px gives overlapping tiles
    target_mpp: float = 0.5         # um/px the tiles are resampled to
    cli_mpp: float | None = None    # pixel size for slides whose file and manifest have none
    native_resolution: bool = False  # tile at the file's own pixels when no pixel size is known
    min_tissue: float = 0.25        # minimum tissue fraction of a kept tile (0 keeps every tile)
    edge_cells: int = 0             # cells dropped at each tile edge before stitching overlapping tiles
    thumb_px: int = 80              # side of the per-tile JPEG thumbnail
    # clustering
    k: int = 6
    kmeans_k: int | None = None     # defaults to k
    seed: int = 0
    calib_tiles_per_slide: int = 64
    calib_cells_per_tile: int | None = None  # None: concepts.auto_cells_per_tile (all cells while they fit)
    calib_max_cells: int = 200_000
    nmf_max_iter: int = 500
    projection: str = "pca"         # or "umap"
    prototypes_per_cluster: int = 16
    output_activation: str = "auto"  # auto | softmax | sigmoid | none
    # fidelity
    explain_output: int | None = None   # model output (column) the regression and GradCAM explain
    target: str | None = None           # logit | log-odds | contrast of that output (None: default, targets.py)
    gradcam: bool = False               # compute GradCAM of explain_output in the full pass (a backward pass)
    importance: bool = False            # concept importance by removal at the hooked layer (2K extra forwards)
    positive_threshold: float = 0.5     # probability above which the model "calls a tile positive"
    k_grid: tuple[int, ...] = (4, 6, 8, 10)  # K values compared on the calibration sample
    # device type and precision the model runs in (activations.compute_signature, set by the run):
    # part of every part file's key, so a run resumed on another device or precision redoes those slides
    compute: str = "cpu-fp32"
    # execution: never part of a part file's key, they do not change results
    batch_size: int = 32
    workers: int = 1
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    def _key(self, names: tuple[str, ...], extra: dict | None = None) -> str:
        payload = {n: getattr(self, n) for n in names}
        payload.update(extra or {})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def tiling_names(self) -> tuple[str, ...]:
        return ("model", "layer", "arch", "model_sha256", "relu", "tile_px", "stride_px", "target_mpp",
                "cli_mpp", "native_resolution", "min_tissue", "compute")

    def calibration_key(self) -> str:
        """What a per-slide calibration sample depends on."""
        return self._key(self.tiling_names() + ("seed", "calib_tiles_per_slide", "calib_cells_per_tile"))

    def slide_key(self, concepts_sha: str) -> str:
        """What a per-slide full-pass result depends on: tiling, thumbnails, and the concepts H."""
        names = ("edge_cells", "thumb_px", "output_activation", "prototypes_per_cluster", "gradcam")
        extra = {"concepts": concepts_sha, "cam_output": self.explain_output if self.gradcam else None,
                 "maps": "glass-masked"}  # parts of older versions have concepts on glass: redo them
        if self.gradcam and self.target not in (None, "logit"):
            extra["cam_target"] = self.target  # the GradCAM maps depend on it (logit keeps older keys valid)
        if self.importance:
            extra["importance"] = [self.explain_output, self.target]
        return self._key(self.tiling_names() + names, extra)
