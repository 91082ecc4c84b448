"""State-dict checkpoints of timm architectures (`--arch timm:NAME`), e.g. pathology foundation ViTs.

The network is built with `timm.create_model(NAME, pretrained=False, ...)` (nothing is downloaded) and
the user's weights are loaded strictly. What the checkpoint itself shows is used to build the matching
network: the classifier head's rows give num_classes; a checkpoint without head weights (a headless
foundation model such as UNI, saved with num_classes=0) gives a feature extractor whose outputs are the
pooled features; LayerScale weights (`ls1.gamma`) and register tokens (`reg_token`) switch those on.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path

import torch

from .model_base import TIMM_PREFIX, ModelError, ModelSpec, build_and_load, strip_wrappers


def check_timm_arch(arch: str) -> None:
    """ModelError with close names when `timm:NAME` is not a timm model."""
    import timm

    name = arch[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ModelError(f"Unknown architecture {arch!r}: {name!r} is not a timm model (timm "
                         f"{timm.__version__}).{hint}")


def _create(name: str, meta: bool = False, **kwargs) -> torch.nn.Module:
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm notices about unused kwargs of some families
        if meta:
            with torch.device("meta"):  # shapes and names only: no memory, no init cost
                return timm.create_model(name, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)


def _build_kwargs(state: dict[str, torch.Tensor], name: str, num_classes: int | None) -> tuple[dict, bool]:
    """timm.create_model kwargs the checkpoint asks for, and whether it is headless."""
    bare = {strip_wrappers(k): v for k, v in state.items()}
    probe = _create(name, meta=True)
    head = getattr(probe, "pretrained_cfg", {}).get("classifier", "head")
    head = head if isinstance(head, str) else "head"
    kwargs: dict = {}
    headless = False
    if num_classes is None:
        weight = bare.get(f"{head}.weight")
        if weight is not None and weight.ndim == 2:
            num_classes = int(weight.shape[0])
        elif not any(k.startswith(f"{head}.") for k in bare):
            num_classes, headless = 0, True
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
        headless = num_classes == 0
    if any(k.endswith(".ls1.gamma") for k in bare) and not any(k.endswith(".ls1.gamma") for k in probe.state_dict()):
        kwargs["init_values"] = 1e-5  # LayerScale present in the checkpoint; its values come from the file
    if "reg_token" in bare and "reg_token" not in probe.state_dict():
        kwargs["reg_tokens"] = int(bare["reg_token"].shape[1])
    return kwargs, headless


def build_timm(path: Path, state: dict[str, torch.Tensor], arch: str,
               num_classes: int | None) -> tuple[torch.nn.Module, ModelSpec]:
    """The timm network of `arch` ('timm:NAME') with the checkpoint's weights, and how to feed it.

    Inputs use the ImageNet mean/std (as UNI and Phikon do; override with --mean/--std). Default layer: the
    last transformer block for ViT-like models (tokens, see cells.py), else None (pass --layer).
    """
    name = arch[len(TIMM_PREFIX):]
    kwargs, headless = _build_kwargs(state, name, num_classes)
    what = f"timm {name} ({', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'defaults'})"
    try:
        net = build_and_load(lambda: _create(name, **kwargs), path, state, what)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"timm could not build {name!r} with {kwargs} for {path} ({type(exc).__name__}: {exc}).") from exc
    blocks = getattr(net, "blocks", None)
    default_layer = f"blocks.{len(blocks) - 1}" if isinstance(blocks, torch.nn.Sequential) and len(blocks) else None
    input_px = int(getattr(net, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
    spec = ModelSpec(name=f"{arch}:{path.name}", input_px=input_px, default_layer=default_layer,
                     output_activation="none" if headless else None)
    return net, spec
