"""The seeded models of the tests, importable as `seeded_models:NAME` (tests/ is on sys.path under
pytest; a run in a subprocess or a Dask worker gets it on PYTHONPATH), the way a user passes
`package.module:factory`. Their inputs (slides, images, tiles) come from tests/generated.py.

- `tiny_net`: 64-px tiles -> `features.relu2` (16 channels x 16 x 16 cells) -> 2 outputs; the Dask and
  stage tests' model, with fault injection in its head (below).
- `tiny_cnn`: 32-px tiles -> `features` (8 x 8 x 8 cells of 4 px) -> 3 outputs; the model of the small
  generated atlases (tests/tiny_atlas.py).
- `tiny_linear_head`: 64-px tiles -> `features` (8 x 8 x 8) -> global average pool + Linear(8 -> 3);
  the fidelity tests' model, whose figures follow in closed form (`features_of`).
- the zoo: `view_cnn` (a `.view` head), `tuple_cnn`, `dict_cnn`, `object_cnn`, `probs_cnn` (output
  forms), and `ZOO`/`build`: one seeded network per model family (tests/test_zoo.py, bench/zoo_gpu.py).

Fault injection for the Dask tests, active only inside a Dask worker and only when asked for by
environment variables (inherited by the workers):
- LUMEN_TEST_KILL_ONCE=<file>: the first worker to claim <file> (renaming it) dies in its next full-pass
  batch, as a worker killed by the OOM killer would.
- LUMEN_TEST_HOLD=<file>, LUMEN_TEST_HOLD_AFTER=N: after N full-pass batches in one worker, the next
  batch waits while <file> exists (so a test can kill the client while slides are in flight).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from generated import tile_images
from precompute.models import ModelSpec

# Real Kather CRC tiles (one per class) set the zoo's BatchNorm statistics when ../shared is present.
KATHER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiles" / "kather-crc"


# -- tiny_net: the Dask and stage tests' model, with fault injection ------------------------------
class _Head(nn.Module):
    """Pooling + linear classifier; the place faults are injected (reached only in the full pass)."""

    calls = 0

    def __init__(self, channels: int, n_out: int):
        super().__init__()
        self.fc = nn.Linear(channels, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _maybe_fault()
        return self.fc(x.mean(dim=(2, 3)))


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _maybe_fault() -> None:
    kill, hold = os.environ.get("LUMEN_TEST_KILL_ONCE"), os.environ.get("LUMEN_TEST_HOLD")
    if not (kill or hold) or not _in_dask_worker():
        return
    _Head.calls += 1
    if kill:
        try:
            os.rename(kill, kill + ".claimed")
        except OSError:
            pass  # another worker claimed it, or it is not there
        else:
            os._exit(137)
    if hold and _Head.calls > int(os.environ.get("LUMEN_TEST_HOLD_AFTER", "1")):
        deadline = time.monotonic() + 300
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)


def tiny_net():
    """A seeded 3-layer CNN: 64-px tiles -> `features.relu2` (16 channels x 16 x 16 cells) -> 2 outputs."""
    g = torch.Generator().manual_seed(0)
    features = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1)), ("relu2", nn.ReLU()),
    ]))
    net = nn.Sequential(OrderedDict([("features", features), ("head", _Head(16, 2))]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    spec = ModelSpec(name="tiny", input_px=64, class_names=("normal", "tumour"),
                     default_layer="features.relu2")
    return net.eval(), spec


# -- tiny_cnn: the model of the small generated atlases -------------------------------------------
class Tiny(nn.Module):
    """Two strided convolutions and a linear head on the mean over cells."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny_cnn():
    """A seeded 2-conv CNN: 32-px tiles -> `features` (8 channels x 8 x 8 cells) -> 3 outputs."""
    torch.manual_seed(0)
    net = Tiny().eval()
    spec = ModelSpec(name="lumen-tiny", input_px=32, class_names=("stroma", "tumour", "fat"),
                     default_layer="features")
    return net, spec


# -- tiny_linear_head: the fidelity tests' model ----------------------------------------------------
CLASSES = ("ADI", "STR", "TUM")
LINEAR_HEAD_SPEC = ModelSpec(name="tiny-linear-head", input_px=64, scale=1 / 255, mean=(0.5, 0.5, 0.5),
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
    return model, LINEAR_HEAD_SPEC


def features_of(model: TinyLinearHead, pixels: np.ndarray) -> np.ndarray:
    """Hooked-layer activations (B, h, w, C) float64 of (B, 64, 64, 3) uint8 tiles, normalised as
    LINEAR_HEAD_SPEC."""
    x = torch.as_tensor(np.array(pixels), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    x = (x - 0.5) / 0.25
    with torch.no_grad():
        a = model.features(x)
    return a.permute(0, 2, 3, 1).double().numpy()


# -- the zoo: output forms and model families -------------------------------------------------------
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


def zoo_tiles(n: int) -> list[np.ndarray]:
    """n RGB tiles (224 px): real Kather CRC tiles when ../shared is present, else generated textures."""
    return tile_images(n, KATHER)


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
                                           for t in zoo_tiles(4)]))
        x = (tiles.permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
        with torch.no_grad():
            net.train()(x)
    return net.eval()
