"""What every model family shares: the error type, how a model is fed (ModelSpec), loading a
checkpoint's weights strictly into a network.

models.py loads a model by name or file and dispatches to the families (capricorn.py, timm_models.py);
the families import from here, never from models.py, so the model modules import one way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

TIMM_PREFIX = "timm:"  # --arch timm:NAME builds the checkpoint's network with timm.create_model(NAME)
_STRIP_PREFIXES = ("module.", "model.")


class ModelError(Exception):
    """A model could not be loaded or used; the message names the input and says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """How to feed a model: tile side in px, uint8 scaling, per-channel mean/std, class names.

    Input = (uint8 * scale - mean) / std, per RGB channel. class_names: for classifiers, the names of
    the output columns (probabilities = softmax, or sigmoid for a single output). default_layer: the
    layer whose activations are clustered when the user names none. relu_after: the layers whose output
    the network itself passes through a functional ReLU (not a module, so no hook sees it); Lumen applies
    ReLU to the captured activations of those layers only (torchvision DenseNet calls F.relu on the
    output of `features`, i.e. of features.norm5, in forward()). Any other layer is taken as it is.
    output_activation: how outputs become probabilities when the user does not say (None: softmax, or
    sigmoid for one output; 'none' for outputs that are probabilities or features already).
    """

    name: str
    input_px: int = 224
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    class_names: tuple[str, ...] | None = None
    default_layer: str | None = None
    relu_after: tuple[str, ...] = ()
    output_activation: str | None = None

    def __post_init__(self) -> None:
        # Normalise types here so a spec built from CLI lists or JSON compares and hashes like any other.
        if isinstance(self.input_px, bool) or int(self.input_px) != self.input_px or self.input_px < 1:
            raise ModelError(f"Model {self.name!r}: input size must be a positive whole number of px, got {self.input_px!r}")
        object.__setattr__(self, "input_px", int(self.input_px))
        if not (math.isfinite(float(self.scale)) and float(self.scale) > 0):
            raise ModelError(f"Model {self.name!r}: scale must be a positive number (e.g. 1/255), got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        for field in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, field))
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ModelError(f"Model {self.name!r}: {field} needs 3 finite numbers (R, G, B), got {getattr(self, field)!r}")
            object.__setattr__(self, field, values)
        if min(self.std) <= 0:
            raise ModelError(f"Model {self.name!r}: std values must be > 0, got {self.std!r}")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "relu_after", tuple(str(n) for n in self.relu_after))


def strip_wrappers(key: str) -> str:
    while key.startswith(_STRIP_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _match_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip 'module.' (DataParallel) / 'model.' (Lightning etc.) prefixes when that fits more keys."""
    best, best_hits = state, len(expected & state.keys())
    frontier = [state]
    while frontier:
        cand = frontier.pop()
        for prefix in _STRIP_PREFIXES:
            if any(k.startswith(prefix) for k in cand):
                stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in cand.items()}
                hits = len(expected & stripped.keys())
                if hits > best_hits:
                    best, best_hits = stripped, hits
                    frontier.append(stripped)
    return best


def build_and_load(make, path: Path, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """make() the network and load `state` strictly. The network is first built on the meta device and
    the checkpoint's tensors assigned to it, which skips the random initialisation (seconds for a
    ViT-L); a network that keeps tensors outside its state_dict is built normally instead."""
    try:
        with torch.device("meta"):
            net = make()
    except Exception:  # some constructors compute on their tensors; build those for real
        net = None
    if net is not None:
        load_strict(path, net, state, what, assign=True)
        if not any(t.is_meta for t in (*net.parameters(), *net.buffers())):
            return net
    net = make()
    load_strict(path, net, state, what)
    return net


def load_strict(path: Path, net: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                assign: bool = False) -> None:
    """Load `state` into `net` strictly (after stripping wrapper prefixes); ModelError listing the
    wrong-shape, missing and unexpected keys when it does not fit. `what` names the architecture."""
    expected = net.state_dict()
    state = _match_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
                parts.append(f"{len(items)} {label}: {'; '.join(items[:4])}{more}")
        raise ModelError(
            f"{path} does not fit {what}: " + " | ".join(parts)
            + ". Check that --arch is the architecture the checkpoint was trained with (the number of classes is taken "
            "from the checkpoint's last layer).")
    if assign:  # the network takes the file's tensors: give them the network's own dtypes
        state = {k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=assign)
