"""A tiny seeded CNN for tests that need a real run without the demo model's weights.

`python -m precompute run --model lumen_tiny:factory` (with tests/ on PYTHONPATH): 32-px input,
layer `features` gives (8, 8, 8) cells of 4 px, 3 outputs. Random weights, fixed seed.
"""

from __future__ import annotations

import torch
from torch import nn

from precompute.models import ModelSpec


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def factory():
    torch.manual_seed(0)
    net = Tiny().eval()
    spec = ModelSpec(name="lumen-tiny", input_px=32, class_names=("stroma", "tumour", "fat"),
                     default_layer="features")
    return net, spec
