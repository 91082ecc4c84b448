"""Small seeded models and tile images for the model tests (test_model_forms.py, test_zoo.py).

The factories are importable as `zoo_models:NAME` (the tests folder is on sys.path under pytest), the way
a user passes `package.module:factory`. Tile images come from ../shared/data/tiles/kather-crc when that
folder is present, else they are seeded synthetic H&E-like textures, so the tests run on a plain clone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from precompute.models import ModelSpec

KATHER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiles" / "kather-crc"


class ViewNet(torch.nn.Module):
    """A small tissue CNN whose head flattens with `.view`, which needs a contiguous (NCHW) tensor."""

    def __init__(self, n_out: int = 3):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(16 * 4 * 4, n_out)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.fc(x.view(x.size(0), -1))


def view_cnn():
    torch.manual_seed(0)
    return ViewNet().eval(), ModelSpec(name="view-cnn", input_px=64, default_layer="features.5",
                                       class_names=("a", "b", "c"))


class _Wrapped(torch.nn.Module):
    """ViewNet whose forward returns `form` around the logits (or softmax probabilities)."""

    def __init__(self, form: str):
        super().__init__()
        self.net = ViewNet()
        self.form = form

    def forward(self, x):
        logits = self.net(x)
        if self.form == "tuple":
            return logits, self.net.features(x)
        if self.form == "dict":
            return {"features": self.net.features(x), "logits": logits}
        if self.form == "object":
            return _Output(logits)
        return torch.softmax(logits, dim=1)  # "probs": softmax inside the model


class _Output:
    def __init__(self, logits):
        self.logits = logits
        self.hidden = None


def _wrapped(form: str):
    torch.manual_seed(0)
    return _Wrapped(form).eval(), ModelSpec(name=f"{form}-cnn", input_px=64, default_layer="net.features.5")


def tuple_cnn():
    return _wrapped("tuple")


def dict_cnn():
    return _wrapped("dict")


def object_cnn():
    return _wrapped("object")


def probs_cnn():
    return _wrapped("probs")


def texture(side: int, seed: int) -> np.ndarray:
    """A seeded (side, side, 3) uint8 pink/purple blob texture (stands in for H&E without real data)."""
    rng = np.random.default_rng(seed)
    low = rng.random((side // 16 + 2, side // 16 + 2))
    big = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)) / 255.0
    pink, purple = np.array([230, 160, 200]), np.array([110, 60, 150])
    img = pink * (1 - big[..., None]) + purple * big[..., None] + rng.normal(0, 12, (side, side, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def tile_images(n: int) -> list[np.ndarray]:
    """n RGB tiles (224 px): real Kather CRC tiles (one per class) when present, else textures."""
    if KATHER.is_dir():
        files = sorted(KATHER.glob("*.png"))[::4][:n]
        return [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return [texture(224, seed) for seed in range(n)]


def write_cohort(folder: Path, n: int, side: int | None = None) -> Path:
    """A folder of n PNG "slides" (each one tile image, resized to side px when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(tile_images(n)):
        im = Image.fromarray(img)
        if side is not None:
            im = im.resize((side, side), Image.BICUBIC)
        im.save(folder / f"tile{i}.png")
    return folder


def write_mosaic(folder: Path, side: int) -> Path:
    """A folder with one side x side PNG "slide": a mosaic of tile images."""
    folder.mkdir(parents=True, exist_ok=True)
    tiles = tile_images(8)
    per_row = -(-side // 224)
    rows = [np.concatenate([tiles[(r * per_row + c) % len(tiles)] for c in range(per_row)], axis=1)
            for r in range(per_row)]
    Image.fromarray(np.concatenate(rows, axis=0)[:side, :side]).save(folder / "mosaic.png")
    return folder
