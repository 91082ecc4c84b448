"""Small seeded models and tile images for the model tests (test_model_forms.py, test_zoo.py).

The factories are importable as `zoo_models:NAME` (the tests folder is on sys.path under pytest), the way
a user passes `package.module:factory`. Tile images come from ../shared/data/tiles/kather-crc when that
folder is present, else they are seeded synthetic H&E-like textures, so the tests run on a plain clone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
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


# -- the zoo: one case per model family (tests/test_zoo.py, bench/zoo_gpu.py) ---------------------
@dataclass(frozen=True)
class Case:
    arch: str                 # torchvision name, or timm:NAME
    layer: str
    grid: tuple[int, int, int]  # (C, h, w) cells of the layer for one tile
    raw: str                  # the layer's output shape as `layers` prints it
    px: int = 224
    extra: tuple[str, ...] = ()
    build: dict | None = None  # extra constructor arguments of the seeded network


ZOO = {
    # The paper's setting: VGG16 at its last conv ReLU, 512 px tiles, stride 256, 2 edge cells dropped.
    "vgg16": Case("vgg16", "features.29", (512, 32, 32), "512x32x32", 512,
                  ("--stride-px", "256", "--edge-cells", "2")),
    "resnet50-layer3": Case("resnet50", "layer3", (1024, 14, 14), "1024x14x14"),
    "resnet50-layer4": Case("resnet50", "layer4", (2048, 7, 7), "2048x7x7"),
    "densenet121": Case("densenet121", "features.norm5", (1024, 7, 7), "1024x7x7"),
    "efficientnet_b0": Case("efficientnet_b0", "features", (1280, 7, 7), "1280x7x7"),
    "mobilenet_v3_large": Case("mobilenet_v3_large", "features", (960, 7, 7), "960x7x7"),
    "convnext_tiny": Case("convnext_tiny", "features", (768, 7, 7), "768x7x7"),
    "regnet_y_400mf": Case("regnet_y_400mf", "trunk_output", (440, 7, 7), "440x7x7"),
    "inception_v3": Case("inception_v3", "Mixed_7c", (2048, 8, 8), "2048x8x8", 299, build={"init_weights": False}),
    "swin_t": Case("swin_t", "features", (768, 7, 7), "7x7x768"),  # (h, w, C) windows
    "vit_b_16": Case("vit_b_16", "encoder.layers.encoder_layer_11", (768, 14, 14), "197x768"),
    # A timm ViT with 4 register tokens besides the class token (5 tokens dropped).
    "timm-vit_small_reg4": Case("timm:vit_small_patch16_224", "blocks.11", (384, 14, 14), "201x384",
                                build={"reg_tokens": 4}),
}


def build(case: Case) -> torch.nn.Module:
    """The seeded network. BatchNorm statistics are set from one batch of tiles, as training would,
    so that activations keep a trained network's scale (untrained Inception-v3 overflows float16)."""
    torch.manual_seed(0)
    if case.arch.startswith("timm:"):
        import timm

        net = timm.create_model(case.arch[5:], pretrained=False, num_classes=2, **(case.build or {}))
    else:
        net = torchvision.models.get_model(case.arch, weights=None, num_classes=2, **(case.build or {}))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.momentum = None  # cumulative average: one batch sets the statistics
        tiles = torch.from_numpy(np.stack([np.asarray(Image.fromarray(t).resize((case.px, case.px)))
                                           for t in tile_images(4)]))
        x = (tiles.permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
        with torch.no_grad():
            net.train()(x)
    return net.eval()
