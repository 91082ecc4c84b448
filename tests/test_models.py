"""Loading user models from every accepted source, layer listing/lookup, on-device normalisation."""

from __future__ import annotations

import hashlib
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torchvision

from precompute.models import (
    LoadedModel,
    ModelError,
    ModelSpec,
    find_layer,
    list_layers,
    load_model,
    normalise_on_device,
)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    """A small-headed resnet18 with random (seeded) weights, so num_classes inference is exercised."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=7).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 64, 64)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrapped_dataparallel_state_dict_loads_and_matches(tmp_path, resnet, x):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in resnet.state_dict().items()}}, path)
    loaded = load_model(str(path), arch="resnet18")
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "state_dict" and loaded.source == str(path)
    assert loaded.sha256 == _sha256(path)
    assert loaded.module.fc.out_features == 7  # inferred from the checkpoint's fc.weight
    assert not loaded.module.training
    assert loaded.spec.default_layer == "layer4"
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), resnet(x))


def test_lightning_style_model_prefix_is_stripped(tmp_path, resnet, x):
    path = tmp_path / "lightning.ckpt"
    torch.save({"model_state_dict": {"model." + k: v for k, v in resnet.state_dict().items()}}, path)
    loaded = load_model(str(path), arch="resnet18", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert loaded.spec.mean == (0.5, 0.5, 0.5) and loaded.spec.std == (0.25, 0.25, 0.25)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), resnet(x))


def test_checkpoint_with_a_wrong_shape_is_refused(tmp_path, resnet):
    sd = dict(resnet.state_dict())
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    path = tmp_path / "bad_shape.pt"
    torch.save(sd, path)
    with pytest.raises(ModelError) as err:
        load_model(str(path), arch="resnet18")
    msg = str(err.value)
    assert "bad_shape.pt" in msg and "conv1.weight" in msg and "(64, 3, 5, 5)" in msg


def test_checkpoint_for_another_architecture_lists_missing_keys(tmp_path, resnet):
    path = tmp_path / "r18.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(ModelError, match="missing") as err:
        load_model(str(path), arch="resnet34")
    assert "layer1.2" in str(err.value)  # resnet34 has 3 blocks in layer1, resnet18 only 2


def test_state_dict_without_arch_asks_for_it(tmp_path, resnet):
    path = tmp_path / "plain.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(ModelError, match="arch"):
        load_model(str(path))


def test_unknown_arch_suggests_close_names(tmp_path, resnet):
    path = tmp_path / "plain.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(ModelError, match="resnet18"):
        load_model(str(path), arch="resnet-18")


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "no_such_model.pt"
    with pytest.raises(ModelError, match="no_such_model.pt"):
        load_model(str(missing), arch="resnet18")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n" * 10])
def test_unreadable_files_are_refused(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="weights.pt"):
        load_model(str(path), arch="resnet18")


def test_pickled_whole_model_is_not_unpickled(tmp_path, resnet):
    path = tmp_path / "whole.pt"
    torch.save(resnet, path)
    with pytest.raises(ModelError, match="state_dict"):
        load_model(str(path), arch="resnet18")


def test_torchscript_is_refused_without_loading_it(tmp_path, resnet, x):
    path = tmp_path / "r18.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks torch.jit.trace deprecated
        torch.jit.trace(resnet, x).save(str(path))
    for arch in (None, "resnet18"):
        with pytest.raises(ModelError, match="TorchScript") as err:
            load_model(str(path), arch=arch)
        assert "--arch" in str(err.value) and "factory" in str(err.value)
    # the hooks refusal still holds for a ScriptModule built in memory (e.g. by a factory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.trace(resnet, x)
    for call in (lambda: list_layers(scripted, 64), lambda: find_layer(scripted, "layer4")):
        with pytest.raises(ModelError, match="TorchScript"):
            call()


def test_list_layers_resnet18_at_224():
    net = torchvision.models.resnet18(weights=None).eval()
    layers = list_layers(net, 224)
    by_name = {info.name: info for info in layers}
    assert by_name["layer4"].out_shape == (512, 7, 7)
    assert by_name["layer4"].type_name == "Sequential"
    assert by_name["conv1"].out_shape == (64, 112, 112)
    assert by_name["fc"].out_shape == (1000,)
    assert by_name["layer1.0.relu"].calls == 2  # the block's ReLU module runs twice
    order = [info.name for info in layers]
    assert order.index("conv1") < order.index("layer4") < order.index("fc")
    assert "" not in by_name
    assert len(layers) == len(list(net.named_modules())) - 1
    assert not net.training


def test_find_layer_returns_module_or_suggests_names():
    net = torchvision.models.resnet18(weights=None)
    assert find_layer(net, "layer4.1.conv2") is net.layer4[1].conv2
    with pytest.raises(ModelError, match="layer4") as err:
        find_layer(net, "layer5")
    assert "layer5" in str(err.value)


FACTORY_SOURCE = textwrap.dedent('''
    import torch
    from precompute.models import ModelSpec

    def tiny():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))

    def tiny_with_spec():
        return tiny(), ModelSpec(name="tiny", input_px=32, class_names=("benign", "malignant"), default_layer="1")

    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("weights server unreachable")
''')


@pytest.fixture
def factory_module(tmp_path, monkeypatch) -> str:
    name = f"lumen_tiny_factory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_factory_string_loads_module_and_spec(factory_module):
    plain = load_model(f"{factory_module}:tiny")
    assert plain.kind == "factory" and plain.sha256 is None
    assert plain.spec.input_px == 224 and plain.spec.class_names is None
    with_spec = load_model(f"{factory_module}:tiny_with_spec", input_px=48)
    assert with_spec.spec.name == "tiny" and with_spec.spec.class_names == ("benign", "malignant")
    assert with_spec.spec.input_px == 48  # keyword overrides win over the factory's spec
    assert with_spec.spec.default_layer == "1"
    assert [i.out_shape for i in list_layers(with_spec.module, 48)] == [(4, 48, 48), (4, 48, 48), (4, 1, 1), (4,), (2,)]


@pytest.mark.parametrize("target, expected", [
    (":tiny_typo", "tiny"),
    (":not_a_model", "nn.Module"),
    (":broken", "weights server unreachable"),
])
def test_factory_errors_say_what_went_wrong(factory_module, target, expected):
    with pytest.raises(ModelError, match=expected):
        load_model(factory_module + target)


def test_factory_from_a_missing_package():
    with pytest.raises(ModelError, match="no_such_lumen_pkg"):
        load_model("no_such_lumen_pkg.models:build")


def test_capricorn_spec_defaults_and_overrides():
    loaded = load_model("capricorn-crc")
    spec = loaded.spec
    assert loaded.kind == "builtin" and len(loaded.sha256) == 64
    assert spec.name == "capricorn-crc" and spec.input_px == 224
    assert spec.scale == pytest.approx(1 / 255)
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    assert spec.class_names[:9] == ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
    assert len(spec.class_names) == 24
    assert spec.default_layer == "features.norm5" and "features.norm5" in spec.relu_after
    assert find_layer(loaded.module, spec.default_layer) is loaded.module.features.norm5
    with pytest.raises(ModelError, match="arch"):
        load_model("capricorn-crc", arch="densenet121")


def test_bad_spec_values_are_refused():
    with pytest.raises(ModelError, match="std"):
        ModelSpec(name="m", std=(0.2, 0.0, 0.2))
    with pytest.raises(ModelError, match="mean"):
        ModelSpec(name="m", mean=(0.5, 0.5))
    with pytest.raises(ModelError, match="input size"):
        ModelSpec(name="m", input_px=0)


def test_normalise_on_device_matches_numpy():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    spec = ModelSpec(name="imagenet")
    out = normalise_on_device(torch.from_numpy(tiles), spec)
    expected = ((tiles / 255.0 - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 3, 20, 24)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)
    # Scale-only spec (capricorn): plain division by 255.
    plain = normalise_on_device(torch.from_numpy(tiles), ModelSpec(name="c", mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_allclose(plain.numpy(), tiles.transpose(0, 3, 1, 2) / 255.0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalise_on_device(torch.from_numpy(tiles).float(), spec)
