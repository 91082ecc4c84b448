"""Models as users bring them: memory layout, the ReLU policy, output forms (tuple, dict, object,
probabilities) and part keys that tell devices apart. Runs in-process on generated tile images."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

import seeded_models
from dashboard_fixtures import run_app
from generated import write_tile_folder
from precompute.activations import outputs_match, prefer_channels_last
from precompute import cli
from precompute.cli import app
from precompute.models import ModelSpec, default_relu, load_model, normalise_on_device
from precompute.store import Atlas


def run_cli(*args: str) -> tuple[int, str]:
    """`python -m precompute ARGS` in this process: (exit code, stdout + the console's messages)."""
    messages, bound = io.StringIO(), cli.console.file
    cli.console.file = messages  # the console writes to the stderr it found at import
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        cli.console.file = bound
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output + messages.getvalue()


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
    return write_tile_folder(tmp_path_factory.mktemp("tiles"), seeded_models.zoo_tiles(2))


# -- memory layout -----------------------------------------------------------------------------
def test_tiles_reach_the_model_contiguous_nchw():
    tiles = torch.from_numpy(np.stack(seeded_models.zoo_tiles(2)))
    x = normalise_on_device(tiles, ModelSpec(name="m"))
    assert x.shape == (2, 3, 224, 224) and x.is_contiguous()


def test_channels_last_is_kept_only_when_outputs_are_the_same():
    x = torch.rand(2, 3, 64, 64)
    net = seeded_models.ViewNet().eval()
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
    code, text = small_run(cohort, out, "seeded_models:view_cnn", "--gradcam", "--explain", "a")
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
    assert small_run(cohort, out, "seeded_models:view_cnn")[0] == 0
    assert small_run(cohort, out, "seeded_models:view_cnn")[0] == 0
    assert run_end(out)["reused"] == 2  # same device and precision: nothing redone
    keys = {p.name: h5py.File(p, "r").attrs["attrs_json"] for p in (tmp_path / "atlas.h5.parts" / "slides").iterdir()}
    # A second machine with CUDA bf16 resumes the run: its parts must not be mixed with the CPU fp32 ones.
    monkeypatch.setattr(pipeline, "compute_signature", lambda device: "cuda-bf16")
    assert small_run(cohort, out, "seeded_models:view_cnn")[0] == 0
    assert run_end(out)["reused"] == 0
    with Atlas(out) as a:
        assert a.config["compute"] == "cuda-bf16"
    for p in (tmp_path / "atlas.h5.parts" / "slides").iterdir():
        assert json.loads(h5py.File(p, "r").attrs["attrs_json"])["key"] != json.loads(keys[p.name])["key"]
    monkeypatch.undo()
    assert small_run(cohort, out, "seeded_models:view_cnn")[0] == 0
    assert run_end(out)["reused"] == 0  # back on the CPU: redone again, not taken from the bf16 parts


# -- output forms ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_outputs(cohort, tmp_path_factory) -> np.ndarray:
    """Outputs stored for the plain ViewNet (the wrappers hold the same seeded network)."""
    out = tmp_path_factory.mktemp("plain") / "atlas.h5"
    assert small_run(cohort, out, "seeded_models:view_cnn", "--explain", "0")[0] == 0
    with Atlas(out) as a:
        return a.tiles(["outputs"])["outputs"]


@pytest.mark.parametrize("form", ["tuple", "dict", "object"])
def test_tuple_dict_and_object_outputs_give_the_logits(form, cohort, tmp_path, plain_outputs):
    out = tmp_path / "atlas.h5"
    code, text = small_run(cohort, out, f"seeded_models:{form}_cnn", "--explain", "0")
    assert code == 0, text
    with Atlas(out) as a:
        tiles = a.tiles(["outputs", "probs"])
    np.testing.assert_allclose(tiles["outputs"], plain_outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiles["probs"], torch.softmax(torch.from_numpy(tiles["outputs"]), 1).numpy(),
                               atol=1e-5)


def test_a_model_returning_probabilities_is_noticed(cohort, tmp_path):
    out = tmp_path / "atlas.h5"
    code, text = small_run(cohort, out, "seeded_models:probs_cnn", "--explain", "0")
    assert code == 0, text
    assert "already look like probabilities" in text and "--output-activation none" in text
    with Atlas(out) as a:
        assert a.config["output_activation"] == "none"
        tiles = a.tiles(a.tile_names())
    assert "probs" not in tiles or np.allclose(tiles["probs"], tiles["outputs"])
    np.testing.assert_allclose(tiles["outputs"].sum(axis=1), 1.0, atol=1e-5)  # not softmaxed twice
    code, text = small_run(cohort, tmp_path / "again.h5", "seeded_models:probs_cnn", "--explain", "0",
                           "--output-activation", "softmax")
    assert code == 0 and "applies softmax to them again" in text


# -- cells of transformer layers ---------------------------------------------------------------
def test_tokens_and_channels_last_outputs_map_onto_the_patch_grid():
    from precompute.cells import detect_layout, to_grid

    class WithRegisters(torch.nn.Module):
        num_prefix_tokens = 5  # timm: class + 4 register tokens

    tokens = torch.arange(2 * 201 * 3, dtype=torch.float32).reshape(2, 201, 3)  # (B, N, C)
    layout = detect_layout(tuple(tokens.shape), WithRegisters())
    assert (layout.kind, layout.prefix, layout.h, layout.w, layout.channels) == ("tokens", 5, 14, 14, 3)
    grid = to_grid(tokens, layout)
    # patch token 5 + r * 14 + c becomes cell (r, c)
    assert torch.equal(grid[1, :, 2, 7], tokens[1, 5 + 2 * 14 + 7])
    vit = torchvision.models.vit_b_16(weights=None)
    assert detect_layout((1, 197, 768), vit).prefix == 1  # torchvision ViT: the class token
    nhwc = torch.rand(2, 7, 7, 768)  # Swin's stages: (B, h, w, C)
    layout = detect_layout(tuple(nhwc.shape), torch.nn.Identity())
    assert layout.kind == "nhwc" and torch.equal(to_grid(nhwc, layout)[:, :, 3, 4], nhwc[:, 3, 4, :])
    with pytest.raises(ValueError, match="square"):
        detect_layout((1, 199, 64), WithRegisters())
    with pytest.raises(ValueError, match="spatial"):
        detect_layout((1, 1000), vit)


def test_gradcam_on_tokens_is_the_gradient_on_the_patch_grid():
    """Engine GradCAM at a timm ViT block equals ReLU(sum_c mean_cells(dy/dA_c) A_c) computed by hand."""
    import timm

    from precompute.activations import Engine

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2).eval()
    spec = ModelSpec(name="vit")
    tiles = torch.from_numpy(np.stack(seeded_models.zoo_tiles(2)))
    H = np.abs(np.random.default_rng(0).normal(size=(3, 192))).astype(np.float32)
    from precompute.concepts import Concepts

    engine = Engine(net, spec, net.blocks[5], torch.device("cpu"), relu=False, concepts=Concepts(H),
                    gradcam_output=1)
    cam = engine.run(tiles)["gradcam"]
    engine.close()
    grabbed = {}

    def leaf(module, inputs, output):  # the block's output as a leaf whose gradient we want
        grabbed["a"] = output.detach().requires_grad_(True)
        return grabbed["a"]

    net.blocks[5].register_forward_hook(leaf)
    x = normalise_on_device(tiles, spec)
    y = net(x)
    (grad,) = torch.autograd.grad(y[:, 1].sum(), grabbed["a"])
    a, g = grabbed["a"][:, 1:].detach(), grad[:, 1:]                 # drop the class token: (B, 196, C)
    expect = torch.relu((g.mean(dim=1, keepdim=True) * a).sum(dim=2)).reshape(2, 14, 14)
    assert cam.shape == (2, 14, 14)
    np.testing.assert_allclose(cam, expect.numpy(), rtol=1e-4, atol=1e-5)
