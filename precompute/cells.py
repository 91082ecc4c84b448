"""Map one layer's output onto a grid of cells, whatever the model family.

A "cell" is one spatial position of the hooked layer, covering tile_px / h model px of the tile:
- CNNs (NCHW, (B, C, h, w)): one position of the feature map.
- Swin-style transformers (NHWC, (B, h, w, C)): one window-grid position, permuted to (B, C, h, w).
- ViT-style transformers (tokens, (B, N, C)): one patch token. The class and register tokens at the
  start of the sequence are dropped (their number is `num_prefix_tokens` for timm models, 1 for
  torchvision's VisionTransformer, else N - g*g for the largest square g*g <= N), and the N - prefix
  patch tokens are laid out row by row on a g x g grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CellLayout:
    """How a layer's output (one tile) becomes (C, h, w) cells. kind: 'nchw' | 'nhwc' | 'tokens';
    prefix: tokens dropped before the patch tokens (tokens only)."""

    kind: str
    channels: int
    h: int
    w: int
    prefix: int = 0

    def describe(self, shape: tuple[int, ...]) -> str:
        out = f"{self.channels} channels on {self.h} x {self.w} cells"
        if self.kind == "tokens":
            return (f"tokens {tuple(shape[1:])}: {self.prefix} class/register token(s) dropped, "
                    f"{self.h * self.w} patch tokens -> {out}")
        return f"{self.kind.upper()} {tuple(shape[1:])} -> {out}"


def prefix_tokens(model: torch.nn.Module, n_tokens: int) -> int:
    """Class/register tokens in front of the patch tokens of a ViT with n_tokens tokens."""
    declared = getattr(model, "num_prefix_tokens", None)  # timm (class + register tokens)
    if isinstance(declared, int) and 0 <= declared < n_tokens:
        return declared
    if isinstance(getattr(model, "class_token", None), torch.Tensor):  # torchvision VisionTransformer
        return 1
    return n_tokens - math.isqrt(n_tokens) ** 2


def detect_layout(shape: tuple[int, ...], model: torch.nn.Module) -> CellLayout:
    """Layout of a layer output of `shape` (batch first) on a square tile. ValueError for other outputs."""
    if len(shape) == 4:
        _, a, b, c = shape
        if a == b and b != c:  # (B, h, w, C): Swin's stages keep channels last
            return CellLayout("nhwc", c, a, b)
        return CellLayout("nchw", a, b, c)
    if len(shape) == 3:
        _, n, c = shape
        prefix = prefix_tokens(model, n)
        side = math.isqrt(n - prefix)
        if side * side != n - prefix or side == 0:
            raise ValueError(f"the hooked layer gives {n} tokens of {c} channels; after dropping {prefix} "
                             "class/register tokens they do not form a square patch grid. Hook a layer "
                             "inside the transformer blocks (see `python -m precompute layers --model MODEL`).")
        return CellLayout("tokens", c, side, side, prefix)
    raise ValueError(f"the hooked layer gives a {len(shape) - 1}-d output {tuple(shape[1:])} per tile; choose "
                     "a layer with a spatial output: (N, C, h, w) feature maps, (N, h, w, C) as in Swin, or "
                     "(N, tokens, C) as in ViT (see `python -m precompute layers --model MODEL`).")


def to_grid(a: torch.Tensor, layout: CellLayout) -> torch.Tensor:
    """A layer output (batch first, in `layout`) as (B, C, h, w); a view where possible, no copy."""
    if layout.kind == "nhwc":
        return a.permute(0, 3, 1, 2)
    if layout.kind == "tokens":
        b = a.shape[0]
        return a[:, layout.prefix:, :].transpose(1, 2).reshape(b, layout.channels, layout.h, layout.w)
    return a
