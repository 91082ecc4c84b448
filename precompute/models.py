"""Load the model under review, say how to feed it, and find its layers.

`load_model(model, ...)` accepts four kinds of `model`:

- `capricorn-crc`: the built-in demo (torchvision DenseNet121 with the Capricorn 0.1 weights,
  see precompute/capricorn.py).
- A TorchScript file (`torch.jit.save`) is recognised by its zip layout (a `code/` folder beside
  `constants.pkl` or `.data/version`) WITHOUT loading it, and refused: loading runs the archive's
  code (`__setstate__` methods), and torch refuses forward hooks on ScriptModules anyway, so no layer
  could be captured. Give Lumen the eager model instead: a state_dict + `arch`, or a factory.
- A state_dict checkpoint + `arch`, a torchvision.models classification architecture (resnet50,
  densenet121, vgg16, ...). Read with `weights_only=True` (never unpickles code), unwrapped from
  {'state_dict'|'model_state_dict'|'model': ...}, with 'module.' / 'model.' prefixes stripped when
  that makes the keys fit; loaded strictly. torchvision is always built with weights=None: nothing
  is downloaded.
- `package.module:factory`: `factory()` is called with no arguments and returns an nn.Module or a
  (nn.Module, ModelSpec) pair. The package must be importable (installed, or on PYTHONPATH).

Every mistake a user can make raises ModelError with what was wrong, in which file, and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .hashing import sha256_file
from .model_base import TIMM_PREFIX, ModelError, ModelSpec, build_and_load, strip_wrappers

BUILTIN_MODELS = ("capricorn-crc",)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# DenseNet.forward: out = F.relu(self.features(x)); features ends with norm5, so both names see it.
_DENSENET_RELU = ("features.norm5", "features")
_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_EAGER_ADVICE = ("Give Lumen the eager model instead: save `model.state_dict()` and pass it with --arch "
                 "(a torchvision architecture), or pass 'package.module:factory' where factory() returns the "
                 "nn.Module.")
_SCRIPT_HOOKS_MSG = (
    "This model is a TorchScript module, and torch refuses forward hooks on ScriptModules "
    "(register_forward_hook is not supported on ScriptModules), so Lumen cannot capture its internal "
    "layers. " + _EAGER_ADVICE)


def default_relu(spec: ModelSpec, layer: str) -> bool:
    """Whether the captured activations of `layer` get a ReLU by default: only where the network applies
    one as a function right after that layer (spec.relu_after); elsewhere the layer is taken as it is."""
    return layer in spec.relu_after


@dataclass
class LoadedModel:
    """A model ready for inference. kind: 'builtin' | 'torchscript' | 'state_dict' | 'factory'."""

    module: torch.nn.Module   # eval mode, on CPU
    spec: ModelSpec
    source: str               # what the user passed
    sha256: str | None        # of the weights/model file, when there is one
    kind: str = "module"


@dataclass(frozen=True)
class LayerInfo:
    """One module seen by a forward pass. out_shape excludes the batch dim; None when not a tensor.

    calls: times the module ran in one forward pass (0: never ran; >1: a reused module, e.g. the
    shared ReLU of a torchvision ResNet block, whose hook fires once per call).
    """

    name: str
    type_name: str
    out_shape: tuple[int, ...] | None
    calls: int = 1


def load_model(model: str, *, arch: str | None = None, input_px: int | None = None,
               scale: float | None = None, mean: tuple | None = None, std: tuple | None = None,
               num_classes: int | None = None) -> LoadedModel:
    """Load `model` (see the module docstring for the accepted forms) on CPU in eval mode.

    input_px / scale / mean / std override the model's defaults. arch (and num_classes, else inferred
    from the checkpoint's last Linear layer) apply to state_dict checkpoints only.
    """
    model = str(model)
    path = Path(model).expanduser()
    try:
        exists = path.exists()
    except OSError:  # e.g. a name too long to be a path: treat it as "not a file"
        exists = False
    if model in BUILTIN_MODELS:
        _refuse_arch(model, arch, num_classes, "is a built-in model")
        loaded = _load_builtin(model)
    elif exists:
        loaded = _load_file(model, path, arch, num_classes)
    elif _FACTORY_RE.match(model):
        _refuse_arch(model, arch, num_classes, "is a factory; its function builds the whole model")
        loaded = _load_factory(model)
    else:
        close = difflib.get_close_matches(model, BUILTIN_MODELS, n=1, cutoff=0.6)
        hint = f" Did you mean the built-in {close[0]!r}?" if close else ""
        raise ModelError(
            f"Model file not found: {path.resolve()}.{hint} Pass an existing state_dict file with --arch, "
            f"a built-in model ({', '.join(BUILTIN_MODELS)}), or 'package.module:factory'.")
    overrides = {k: v for k, v in dict(input_px=input_px, scale=scale, mean=mean, std=std).items() if v is not None}
    if overrides:
        loaded.spec = dataclasses.replace(loaded.spec, **overrides)
    loaded.module = loaded.module.cpu().eval()
    return loaded


def _refuse_arch(model: str, arch: str | None, num_classes: int | None, why: str) -> None:
    if arch is not None or num_classes is not None:
        raise ModelError(f"{model!r} {why}: arch / num_classes only apply to state_dict checkpoint files. Drop them.")


def _load_builtin(name: str) -> LoadedModel:
    from precompute import capricorn  # lazy: converting the Keras weights costs ~0.5 s

    net = capricorn.build_capricorn_crc()
    spec = ModelSpec(name=name, input_px=224, scale=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     class_names=capricorn.CAPRICORN_CLASSES, default_layer="features.norm5",
                     relu_after=_DENSENET_RELU)
    return LoadedModel(net, spec, name, sha256_file(capricorn.capricorn_keras_path()), "builtin")


def _load_file(model: str, path: Path, arch: str | None, num_classes: int | None) -> LoadedModel:
    if path.is_dir():
        raise ModelError(f"{path} is a folder; pass the model file inside it (a state_dict checkpoint).")
    try:
        with open(path, "rb") as fh:
            empty = fh.read(1) == b""
    except OSError as exc:
        raise ModelError(f"Cannot read model file {path}: {exc.strerror or exc}. Check the path and its permissions.") from exc
    if empty:
        raise ModelError(f"Model file {path} is empty (0 bytes): the copy or the save was interrupted. Copy or save it again.")
    if arch is not None:
        _check_arch(arch)  # before reading a possibly large file
    if is_torchscript_archive(path):
        raise ModelError(f"{path} is a TorchScript archive. Lumen does not load TorchScript: loading runs code "
                         "stored in the file, and torch refuses forward hooks on ScriptModules, so no layer could "
                         "be captured. " + _EAGER_ADVICE)
    state = _read_checkpoint(path)
    if arch is None:
        example = ", ".join(repr(k) for k in list(state)[:3])
        raise ModelError(
            f"{path} holds a state_dict ({len(state)} tensors, e.g. {example}) but no architecture. "
            "Pass arch=... (--arch), the architecture it was trained with: a torchvision name (e.g. resnet50) "
            "or timm:NAME (e.g. timm:vit_large_patch16_224).")
    if arch.startswith(TIMM_PREFIX):
        from .timm_models import build_timm  # lazy: timm is only needed for timm checkpoints

        net, spec = build_timm(path, state, arch, num_classes)
    else:
        net, default_layer, relu = _build_from_state_dict(path, state, arch, num_classes)
        spec = ModelSpec(name=f"{arch}:{path.name}", default_layer=default_layer, relu_after=relu)
    return LoadedModel(net, spec, model, sha256_file(path), "state_dict")


def is_torchscript_archive(path: Path) -> bool:
    """True when `path` is a zip whose layout is TorchScript's (read from the zip directory only, nothing
    is unpickled or run): a `code/` folder beside `constants.pkl`, or beside `.data/version`.
    A torch.save checkpoint is a zip too, but has no `code/` folder."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    inner = {n.split("/", 1)[1] for n in names if "/" in n}
    has_code = any(n.startswith("code/") for n in inner)
    return has_code and ("constants.pkl" in inner or ".data/version" in inner)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a torch.save file, unwrapped from common training-checkpoint dicts."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ModelError(
                f"{path} holds pickled Python objects (probably a whole model saved with torch.save(model)), "
                "which Lumen does not unpickle because that can run arbitrary code. Save model.state_dict() "
                "and pass --arch, or pass 'package.module:factory'.") from exc
        raise ModelError(
            f"Cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {first}). "
            "The file may be truncated or in another format; save it again with torch.save(model.state_dict(), ...).") from exc
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelError(
            f"{path} holds no state_dict (found: {keys or 'an empty dict'}). Save the weights with "
            "torch.save(model.state_dict(), path).")
    return dict(obj)


def _torchvision_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _check_arch(arch: str) -> None:
    if arch.startswith(TIMM_PREFIX):
        from .timm_models import check_timm_arch

        return check_timm_arch(arch)
    names = _torchvision_archs()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(f"Unknown architecture {arch!r}: not a torchvision.models classification model.{hint} "
                         "Or pass 'package.module:factory' for a network of your own.")


def _build(arch: str, **kwargs) -> torch.nn.Module:
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # e.g. inception_v3's init-weights notice
        return torchvision.models.get_model(arch, weights=None, **kwargs)


def _last_linear_key(arch: str) -> str | None:
    """State-dict key of the weight of the architecture's last nn.Linear (the classifier head)."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no random init cost
            net = _build(arch)
    except Exception:
        net = _build(arch)
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    return f"{names[-1]}.weight" if names else None


def _build_from_state_dict(path: Path, state: dict[str, torch.Tensor], arch: str,
                           num_classes: int | None) -> tuple[torch.nn.Module, str | None, tuple[str, ...]]:
    head = _last_linear_key(arch)
    if num_classes is None and head is not None:
        # The head key may still carry wrapper prefixes ('module.fc.weight').
        hits = [v for k, v in state.items() if strip_wrappers(k) == head and v.ndim == 2]
        if len(hits) == 1:
            num_classes = int(hits[0].shape[0])
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    net = build_and_load(lambda: _build(arch, **kwargs), path, state,
                         f"torchvision {arch} (num_classes={num_classes or 'default'})")
    return net, *_arch_defaults(arch, net)


def _arch_defaults(arch: str, net: torch.nn.Module) -> tuple[str | None, tuple[str, ...]]:
    """(default layer, relu_after) for common torchvision families; (None, ()) otherwise."""
    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        return "layer4", ()  # blocks end in a ReLU module: layer4's output is already non-negative
    if arch.startswith("densenet"):
        return "features.norm5", _DENSENET_RELU
    if arch.startswith("vgg"):
        relus = [n for n, m in net.named_modules() if n.startswith("features.") and isinstance(m, torch.nn.ReLU)]
        return (relus[-1] if relus else None), ()  # last conv ReLU, e.g. features.29 for vgg16
    return None, ()


def _load_factory(target: str) -> LoadedModel:
    module_name, func_name = target.split(":")
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"Cannot import module {module_name!r} for model {target!r} ({exc}). Install the package or add "
            "its folder to PYTHONPATH; a model file path that does not exist also ends up here.") from exc
    except Exception as exc:
        raise ModelError(f"Importing {module_name!r} for model {target!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(mod, func_name, None)
    if not callable(factory):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        close = difflib.get_close_matches(func_name, names, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ModelError(f"Module {module_name!r} ({getattr(mod, '__file__', '?')}) has no function {func_name!r}.{hint}")
    try:
        result = factory()
    except Exception as exc:
        raise ModelError(f"Model factory {target!r} raised {type(exc).__name__}: {exc}") from exc
    spec = ModelSpec(name=target)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], ModelSpec):
        result, spec = result
    if not isinstance(result, torch.nn.Module):
        raise ModelError(f"Model factory {target!r} returned {type(result).__name__}; it must return an "
                         "nn.Module or an (nn.Module, ModelSpec) pair.")
    return LoadedModel(result, spec, target, None, "factory")


def _refuse_script(module: torch.nn.Module) -> None:
    if isinstance(module, torch.jit.ScriptModule):
        raise ModelError(_SCRIPT_HOOKS_MSG)


def list_layers(module: torch.nn.Module, input_px: int) -> list[LayerInfo]:
    """Every submodule with its output shape on a zero (1, 3, input_px, input_px) input.

    Modules that ran come first, in execution order; modules that never ran follow (calls=0,
    out_shape None). The root module is skipped. Raises ModelError for TorchScript modules.
    """
    _refuse_script(module)
    seen: dict[str, list] = {}  # name -> [type, shape, calls]; insertion order = first call

    def hook_for(name: str):
        def hook(mod, args, out):
            entry = seen.setdefault(name, [type(mod).__name__, None, 0])
            entry[2] += 1
            if entry[2] == 1 and isinstance(out, torch.Tensor):
                entry[1] = tuple(out.shape[1:])
        return hook

    named = [(n, m) for n, m in module.named_modules() if n]
    handles = [m.register_forward_hook(hook_for(n)) for n, m in named]
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    try:
        # eval: a dummy batch must neither update BatchNorm statistics nor fail on batch size 1.
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, 3, input_px, input_px, device=device))
    except Exception as exc:
        raise ModelError(f"The model failed on a 1x3x{input_px}x{input_px} input ({type(exc).__name__}: {exc}). "
                         "Check the input size (--input-px) the model expects.") from exc
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    ran = [LayerInfo(n, t, s, c) for n, (t, s, c) in seen.items()]
    idle = [LayerInfo(n, type(m).__name__, None, 0) for n, m in named if n not in seen]
    return ran + idle


def find_layer(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called `name` (dotted, as in named_modules()); ModelError with close names if absent."""
    _refuse_script(module)
    modules = dict(module.named_modules())
    if name and name in modules:
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise ModelError(f"No layer named {name!r} in the model ({type(module).__name__}, {len(names)} layers).{hint} "
                     "List them all with `python -m precompute layers --model MODEL`.")


def normalise_on_device(batch_uint8_nhwc: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(N, H, W, 3) uint8 tiles -> (N, 3, H, W) float32 (x * scale - mean) / std, on the input's device.

    Done where the tiles already are (send uint8 to the GPU: 4x less traffic than float32). The result
    is contiguous NCHW, the layout every model accepts (a forward that calls `.view` needs it); the
    engine switches to channels_last only after checking that the model gives the same outputs.
    """
    x = batch_uint8_nhwc
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"normalise_on_device expects (N, H, W, 3) uint8 RGB tiles, got {got}")
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device)
    # One multiply-subtract: x * (scale / std) - mean / std == (x * scale - mean) / std.
    out = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return out.mul_((spec.scale / std).view(1, 3, 1, 1)).sub_((mean / std).view(1, 3, 1, 1))
