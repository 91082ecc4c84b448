"""The model zoo: each family a user may bring, on seeded random weights and a few tiles, through
`layers`, `run --gradcam` and the dashboard. The weights are random (nothing is downloaded), so this
checks that every family maps onto cells, stitches, explains and displays, not what it has learned.

Each case saves a seeded state_dict with a 2-class head and passes it with --arch, as a user does.
Tiles are real Kather CRC tiles when ../shared/data is present, else generated textures (seeded_models.zoo_tiles).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generated import write_mosaic, write_tile_folder
from precompute.store import Atlas
from seeded_models import ZOO, build, zoo_tiles
from test_model_forms import assert_opens, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-tiles")
    return {224: write_tile_folder(root / "224", zoo_tiles(3)),
            299: write_tile_folder(root / "299", zoo_tiles(3), side=299),
            512: write_mosaic(root / "768", zoo_tiles(8), 768)}


@pytest.mark.parametrize("name", list(ZOO))
def test_family_runs_explains_and_displays(name, cohorts, tmp_path, monkeypatch):
    case = ZOO[name]
    ckpt = tmp_path / "weights.pth"
    torch.save(build(case).state_dict(), ckpt)
    model = ("--model", str(ckpt), "--arch", case.arch)
    code, text = run_cli("layers", *model, "--input-px", str(case.px))
    assert code == 0, text
    assert any(line.split()[:1] == [case.layer] and case.raw in line for line in text.splitlines()), text

    out = tmp_path / "atlas.h5"
    code, text = run_cli("run", "--cohort", str(cohorts[case.px]), *model, "--layer", case.layer,
                         "--input-px", str(case.px), "--out", str(out), "--mpp", "0.5", "--min-tissue", "0",
                         "--workers", "0", "--no-progress", "--k", "2", "--kmeans-k", "2", "--k-grid", "",
                         "--batch-size", "4", "--gradcam", *case.extra)
    assert code == 0, text
    ckpt.unlink()  # up to 0.5 GB (VGG16): keep the disk free for the rest of the suite
    c, h, w = case.grid
    with Atlas(out) as a:
        assert list(a.attrs["layer_shape"]) == [c, h, w]
        for i in range(len(a.slides()["slide_id"])):
            maps = a.slide_maps(i)
            expect = (h, w) if case.px != 512 else (768 // (512 // h),) * 2  # 768 px mosaic, 16 px cells
            assert maps["hard"].shape == expect and maps["soft"].shape == (2, *expect)
            assert maps["gradcam"].shape == expect and np.isfinite(maps["gradcam"]).all()
            # Every tissue cell of the tiles got a concept and no glass cell did (under 10 % tissue, the
            # documented threshold), except the slide's border cells that --edge-cells drops (no
            # overlapping tile covers them).
            e = int(case.extra[case.extra.index("--edge-cells") + 1]) if "--edge-cells" in case.extra else 0
            inner = maps["hard"][e:expect[0] - e, e:expect[1] - e]
            tissue = (np.asarray(maps["cell_tissue"], np.float32) >= 0.10)[e:expect[0] - e, e:expect[1] - e]
            assert tissue.mean() > 0.5  # the test tiles are mostly tissue
            np.testing.assert_array_equal(inner > 0, tissue)
            assert e == 0 or (maps["hard"][:e] == 0).all()
    assert_opens(out, monkeypatch)


def test_headless_vit_large_foundation_checkpoint(cohorts, tmp_path):
    """A UNI-like checkpoint (timm ViT-L/16, LayerScale, no head) loads with --arch timm:NAME and runs."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5)
    ckpt = tmp_path / "uni.pth"
    torch.save(net.state_dict(), ckpt)
    del net
    model = ("--model", str(ckpt), "--arch", "timm:vit_large_patch16_224")
    code, text = run_cli("layers", *model)
    assert code == 0, text
    assert any(line.split()[:1] == ["blocks.23"] and "197x1024" in line and "<- default" in line
               for line in text.splitlines()), text
    out = tmp_path / "atlas.h5"
    code, text = run_cli("run", "--cohort", str(cohorts[224]), *model, "--out", str(out), "--mpp", "0.5",
                         "--min-tissue", "0", "--workers", "0", "--no-progress", "--k", "2", "--kmeans-k", "2",
                         "--k-grid", "", "--calib-tiles", "2")
    ckpt.unlink()
    assert code == 0, text
    assert "1 class/register token(s) dropped" in text
    with Atlas(out) as a:
        assert list(a.attrs["layer_shape"]) == [1024, 14, 14] and a.attrs["prefix_tokens_dropped"] == 1
        assert a.config["output_activation"] == "none"  # pooled features, not logits
        assert a.tiles(["outputs"])["outputs"].shape == (3, 1024)
