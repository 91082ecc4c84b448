"""Concept importance by intervention: remove one concept from the hooked layer and rerun the network.

Correlation (regression, GradCAM agreement) cannot say whether the model *uses* a concept. Here each
concept k is removed from every cell of the hooked layer's activations, A' = A - w_k h_k (w_k the cell's
NNLS weight, h_k the concept's row of H, mapped back to the layer's units where the layer was shifted
and scaled), clamped at 0 where the layer is non-negative (post-ReLU), and the rest of the network runs
on A' (a forward hook that returns the modified output). Per tile and concept: the drop of the explained
target, y(A) - y(A without k); positive = the concept supports the target. The deletion curve removes a
tile's concepts cumulatively, most important first: y after removing 0, 1, ..., K concepts.

Costs 2K extra forward passes after the hooked layer's input per batch (opt-in: --importance).
"""

from __future__ import annotations

import contextlib

import torch

from .model_outputs import outputs_2d, target_torch


class Intervention:
    """Per batch: `run(model, x, cell_weights, y_full)` -> importance (B, K) and deletion (B, K + 1)."""

    def __init__(self, layer: torch.nn.Module, H: torch.Tensor, *, relu: bool, shift: torch.Tensor | None,
                 scale: torch.Tensor | None, output_index: int, target: str, output_activation: str):
        self.layer = layer
        self.H = H                       # (K, C) concepts in the NMF space
        self.relu = relu                 # the network rectifies this layer's output itself (functional ReLU)
        self.shift, self.scale = shift, scale
        self.output_index, self.target, self.activation = output_index, target, output_activation
        self.delta: torch.Tensor | None = None  # (B, C, h, w) to subtract, set before each forward

    def _hook(self, module, inputs, output):
        a = output[0] if isinstance(output, (tuple, list)) else output
        if self.delta is None:
            return None
        base = torch.relu(a.float()) if self.relu else a.float()
        # Non-negative layers (post-ReLU, or rectified by the network) stay non-negative after removal.
        nonneg = self.relu or self.shift is None
        new = base - self.delta
        new = torch.clamp(new, min=0) if nonneg else new
        new = new.to(a.dtype)
        return new if not isinstance(output, (tuple, list)) else type(output)([new, *output[1:]])

    def contributions(self, cell_weights: torch.Tensor) -> torch.Tensor:
        """cell_weights (B, h, w, K) -> (K, B, C, h, w): each concept's part of the activations, in layer units."""
        c = torch.einsum("bhwk,kc->kbchw", cell_weights.float(), self.H)
        if self.scale is not None:
            c = c * self.scale.view(1, 1, -1, 1, 1)
        return c

    def _target(self, model: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor, autocast) -> torch.Tensor:
        self.delta = delta
        try:
            with autocast():
                y = outputs_2d(model(x))
        finally:
            self.delta = None
        return target_torch(y.float(), self.output_index, self.target, self.activation)

    def run(self, model: torch.nn.Module, x: torch.Tensor, cell_weights: torch.Tensor, y_full: torch.Tensor,
            autocast=contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """Importance (B, K): y_full - y without concept k. Deletion (B, K + 1): y after removing the tile's
        j most important concepts, j = 0..K (column 0 is y_full)."""
        handle = self.layer.register_forward_hook(self._hook)
        try:
            contrib = self.contributions(cell_weights)                    # (K, B, C, h, w)
            k = contrib.shape[0]
            imp = torch.stack([y_full - self._target(model, x, contrib[j], autocast) for j in range(k)], dim=1)
            order = torch.argsort(imp, dim=1, descending=True)            # (B, K) per tile, most important first
            ranked = contrib.permute(1, 0, 2, 3, 4)[torch.arange(len(x))[:, None], order]  # (B, K, C, h, w)
            cumulative = ranked.cumsum(dim=1)
            steps = [y_full] + [self._target(model, x, cumulative[:, j], autocast) for j in range(k)]
        finally:
            handle.remove()
        return {"importance": imp, "deletion": torch.stack(steps, dim=1)}
