"""Generated inputs for the fidelity tests: a tiny seeded model whose head after the hooked layer is
linear (global average pool + linear), and a small cohort of generated images, so the tests run
without ../shared and the expected figures follow in closed form from the stored maps.

Model: `fidelity_inputs:tiny_linear_head` (importable with tests/ on PYTHONPATH). Hooked layer
`features` gives (8, 8, 8) non-negative activations (ReLU module) for a 64 px tile; head: mean over
the 8 x 8 cells, then Linear(8 -> 3), classes ("ADI", "STR", "TUM"): a softmax head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from generated import write_manifest
from precompute.models import ModelSpec

TILE_PX = 64
CLASSES = ("ADI", "STR", "TUM")
SPEC = ModelSpec(name="tiny-linear-head", input_px=TILE_PX, scale=1 / 255, mean=(0.5, 0.5, 0.5),
                 std=(0.25, 0.25, 0.25), class_names=CLASSES, default_layer="features")


class TinyLinearHead(nn.Module):
    """features: conv(3->8, stride 4) -> ReLU -> conv(8->8, stride 2) -> ReLU: (8, 8, 8) for 64 px.
    head: global average pool -> Linear(8, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_linear_head():
    """Seeded features (a positive bias on the last conv keeps most cells non-zero) and a hand-set
    head: TUM rises with channel 4 (strong where stain is dense) and falls with channels 2 and 7, so the
    GradCAM of TUM is non-zero on some cells and zero on others, and TUM wins on some tiles only."""
    torch.manual_seed(7)
    model = TinyLinearHead().eval()
    with torch.no_grad():
        model.features[2].bias.add_(0.3)
        model.fc.weight.zero_()
        model.fc.weight[0, 2] = 2.0
        model.fc.weight[1, 0] = 1.0
        model.fc.weight[2, [2, 4, 7]] = torch.tensor([-2.0, 6.0, -1.0])
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    return model, SPEC


def make_cohort(folder: Path, n_slides: int = 8, side: int = 128, seed: int = 3) -> Path:
    """n_slides generated RGB images (side x side px: 4 tiles of 64 px) with stained blobs on white
    (glass) of different sizes and colours, 2 per patient, diagnoses alternating. Returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    rows = []
    for i in range(n_slides):
        img = np.full((side, side, 3), 245.0)
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(0, side, 2)
            r = rng.uniform(10, 40)
            colour = np.array([rng.uniform(120, 230), rng.uniform(30, 120), rng.uniform(120, 220)])
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            img[blob] = colour + rng.normal(0, 12, (int(blob.sum()), 3))
        path = folder / f"s{i}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        rows.append({"slide_id": f"s{i}", "path": path.name, "diagnosis": "tumour" if i % 2 else "normal",
                     "patient": f"p{i // 2}"})
    return write_manifest(folder / "manifest.csv", rows)


def tile_pixels(folder: Path, slide_id: str, x: int, y: int) -> np.ndarray:
    """(64, 64, 3) uint8 pixels of the tile at level-0 (x, y) of a generated image (native resolution)."""
    img = np.asarray(Image.open(folder / f"{slide_id}.png").convert("RGB"))
    return img[y:y + TILE_PX, x:x + TILE_PX]


def features_of(model: TinyLinearHead, pixels: np.ndarray) -> np.ndarray:
    """Hooked-layer activations (B, h, w, C) float64 of (B, 64, 64, 3) uint8 tiles, normalised as SPEC."""
    x = torch.as_tensor(np.array(pixels), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    x = (x - 0.5) / 0.25
    with torch.no_grad():
        a = model.features(x)
    return a.permute(0, 2, 3, 1).double().numpy()
