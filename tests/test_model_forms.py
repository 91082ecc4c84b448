"""Models as users bring them: memory layout, the ReLU policy, output forms (tuple, dict, object,
probabilities) and part keys that tell devices apart. Runs in-process on generated tile images."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

import zoo_models
from dashboard_fixtures import run_app
from precompute.activations import outputs_match, prefer_channels_last
from precompute.cli import app
from precompute.models import ModelSpec, default_relu, load_model, normalise_on_device
from precompute.store import Atlas


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def small_run(cohort, out, model: str, *extra: str) -> tuple[int, str]:
    return run_cli("run", "--cohort", str(cohort), "--model", model, "--out", str(out), "--mpp", "0.5",
                   "--min-tissue", "0", "--workers", "0", "--no-progress", "--k", "3", "--k-grid", "",
                   "--calib-tiles", "4", *extra)


def assert_opens(atlas, monkeypatch) -> None:
    def clean(at):
        assert not at.exception, [e.value for e in at.exception]
    for page in ("overview", "slides"):
        run_app(atlas, monkeypatch, clean, page=page)


def run_end(out) -> dict:
    lines = [json.loads(s) for s in out.with_name(out.name + ".log.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == "run_end"][-1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return zoo_models.write_cohort(tmp_path_factory.mktemp("tiles"), 2)


# -- memory layout -----------------------------------------------------------------------------
def test_tiles_reach_the_model_contiguous_nchw():
    tiles = torch.from_numpy(np.stack(zoo_models.tile_images(2)))
    x = normalise_on_device(tiles, ModelSpec(name="m"))
    assert x.shape == (2, 3, 224, 224) and x.is_contiguous()


def test_channels_last_is_kept_only_when_outputs_are_the_same():
    x = torch.rand(2, 3, 64, 64)
    net = zoo_models.ViewNet().eval()
    with torch.inference_mode():
        assert not prefer_channels_last(net, x)  # the .view head cannot take NHWC strides
        assert net.features[0].weight.is_contiguous()  # the model is put back as it was
        ref = net(x)
        conv = torchvision.models.resnet18(weights=None, num_classes=3).eval()
        assert prefer_channels_last(conv, x)
        assert conv.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert outputs_match(ref, ref + 1e-6, 1e-3) and not outputs_match(ref, ref + 1.0, 1e-3)


def test_view_model_runs_end_to_end_and_opens_in_the_dashboard(cohort, tmp_path, monkeypatch):
    out = tmp_path / "atlas.h5"
    code, text = small_run(cohort, out, "zoo_models:view_cnn", "--gradcam", "--explain", "a")
    assert code == 0, text
    with Atlas(out) as a:
        assert a.n_tiles == 2 * 9  # 224 px images, 64 px tiles: 3 x 3 tiles each
    assert_opens(out, monkeypatch)


# -- ReLU policy -------------------------------------------------------------------------------
def test_relu_is_applied_only_where_the_network_applies_it(tmp_path):
    spec = load_model("capricorn-crc").spec
    assert default_relu(spec, "features.norm5") and default_relu(spec, "features")
    assert not default_relu(spec, "features.denseblock3")
    assert not default_relu(spec, "features.transition3")
    torch.manual_seed(0)
    path = tmp_path / "d121.pt"
    torch.save(torchvision.models.densenet121(weights=None, num_classes=2).state_dict(), path)
    spec = load_model(str(path), arch="densenet121").spec
    assert spec.default_layer == "features.norm5" and default_relu(spec, spec.default_layer)
    assert not default_relu(spec, "features.denseblock4")


# -- part keys ---------------------------------------------------------------------------------
def test_resuming_on_another_device_or_precision_redoes_the_slides(cohort, tmp_path, monkeypatch):
    import precompute.pipeline as pipeline

    out = tmp_path / "atlas.h5"
    assert small_run(cohort, out, "zoo_models:view_cnn")[0] == 0
    assert small_run(cohort, out, "zoo_models:view_cnn")[0] == 0
    assert run_end(out)["reused"] == 2  # same device and precision: nothing redone
    keys = {p.name: h5py.File(p, "r").attrs["attrs_json"] for p in (tmp_path / "atlas.h5.parts" / "slides").iterdir()}
    # A second machine with CUDA bf16 resumes the run: its parts must not be mixed with the CPU fp32 ones.
    monkeypatch.setattr(pipeline, "compute_signature", lambda device: "cuda-bf16")
    assert small_run(cohort, out, "zoo_models:view_cnn")[0] == 0
    assert run_end(out)["reused"] == 0
    with Atlas(out) as a:
        assert a.config["compute"] == "cuda-bf16"
    for p in (tmp_path / "atlas.h5.parts" / "slides").iterdir():
        assert json.loads(h5py.File(p, "r").attrs["attrs_json"])["key"] != json.loads(keys[p.name])["key"]
    monkeypatch.undo()
    assert small_run(cohort, out, "zoo_models:view_cnn")[0] == 0
    assert run_end(out)["reused"] == 0  # back on the CPU: redone again, not taken from the bf16 parts
