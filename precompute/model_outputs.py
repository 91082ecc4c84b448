"""A model's outputs in torch: the logits tensor of whatever the model returns, as (B, O) float32, and
the explained target of them (differentiable: GradCAM and the intervention importance use it).
The numpy counterparts for stored outputs are in targets.py.
"""

from __future__ import annotations

import torch

from .targets import TARGETS, is_sigmoid


def logits_tensor(y):
    """The logits in a model's output: the tensor itself; a dict's 'logits' key, else its first tensor
    value; an object's `.logits` attribute (e.g. Hugging Face outputs); a tuple's or list's first tensor."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        if isinstance(y.get("logits"), torch.Tensor):
            return y["logits"]
        y = list(y.values())
    elif isinstance(getattr(y, "logits", None), torch.Tensor):
        return y.logits
    if isinstance(y, (tuple, list)):
        found = next((v for v in y if isinstance(v, torch.Tensor)), None)
        if found is not None:
            return found
    raise ValueError(f"the model returned {type(y).__name__} without a tensor of outputs; return the logits "
                     "as a tensor, a tuple whose first tensor they are, a dict with a 'logits' key, or an "
                     "object with a .logits attribute.")


def outputs_2d(y) -> torch.Tensor:
    """Model output (see logits_tensor) as (B, O) float32; spatial outputs averaged."""
    y = logits_tensor(y).float()
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim > 2:
        y = y.flatten(2).mean(dim=2)
    return y


def target_torch(logits, index: int, kind: str, output_activation: str = "auto"):
    """As target_values on a (B, O) torch tensor, differentiable (GradCAM, intervention). Returns (B,)."""
    zc = logits[:, index]
    n = logits.shape[1]
    if kind == "logit" or n == 1 or (kind == "log-odds" and is_sigmoid(output_activation, n)):
        return zc
    keep = [j for j in range(n) if j != index]
    others = logits[:, keep]
    if kind == "contrast":
        return zc - others.mean(dim=1)
    if kind == "log-odds":
        return zc - torch.logsumexp(others, dim=1)
    raise ValueError(f"unknown target {kind!r}; one of {', '.join(TARGETS)}.")
