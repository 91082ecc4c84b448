"""The atlas a run writes: format validation, cluster weights and maps, inspect, Kather agreement."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from precompute.models import load_model
from precompute.slides import open_slide
from precompute.store import FORMAT_VERSION, Atlas, AtlasFormatError


def test_reader_rejects_what_is_not_an_atlas(tmp_path, cmu_atlas):
    with pytest.raises(AtlasFormatError, match="no such file"):
        Atlas(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(AtlasFormatError, match="not an HDF5 file"):
        Atlas(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(AtlasFormatError, match="not a Lumen atlas"):
        Atlas(other)
    newer = tmp_path / "newer.h5"
    shutil.copy(cmu_atlas, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(AtlasFormatError, match=f"version {FORMAT_VERSION + 1}"):
        Atlas(newer)


def test_root_attributes_carry_the_run_configuration(cmu_atlas):
    with Atlas(cmu_atlas) as atlas:
        a = atlas.attrs
        assert a["format"] == "lumen-atlas" and a["tool_version"]
        assert len(a["model_sha256"]) == 64 and a["layer"] == "features.norm5"
        cfg = a["config"]
        assert cfg["tile_px"] == 224 and cfg["target_mpp"] == 0.5 and cfg["k"] == 6 and cfg["seed"] == 0
        assert "run" in a["command_line"] and a["created_utc"]


def test_cluster_weights_and_maps_are_consistent(cmu_atlas):
    with Atlas(cmu_atlas) as atlas:
        t = atlas.tiles(["weights", "nmf_cluster", "recon_err", "x", "y"])
        assert (t["weights"] >= 0).all()
        np.testing.assert_array_equal(t["nmf_cluster"], t["weights"].argmax(axis=1))
        assert ((t["recon_err"] > 0) & (t["recon_err"] < 1)).all()
        maps = atlas.slide_maps(0)
        soft, hard = maps["soft"].astype(np.float32), maps["hard"]
        assert soft.shape[0] == atlas.k and soft.shape[1:] == hard.shape
        covered = hard > 0
        glass = np.asarray(maps["cell_tissue"], np.float32) < 0.10  # cells under 10 % tissue get no concept
        cell = atlas.slides()["cell_l0"][0]
        in_tiles = np.zeros_like(covered)
        for x, y in zip(t["x"], t["y"]):
            in_tiles[int(round(y / cell)):int(round(y / cell)) + 7, int(round(x / cell)):int(round(x / cell)) + 7] = 1
        assert in_tiles.sum() == atlas.n_tiles * 49
        np.testing.assert_array_equal(covered, in_tiles & ~glass)
        # the hard map is the argmax of the soft maps wherever a tile covered a tissue cell
        np.testing.assert_array_equal(hard[covered], soft.argmax(axis=0)[covered] + 1)
        assert (soft[:, ~covered] == 0).all()
        # a tile's summed weights are the sum of its cells in the soft maps (no overlap by default), for
        # a tile without glass cells
        i = next(i for i in range(len(t["x"])) if not glass[int(round(t["y"][i] / cell)):][:7,
                 int(round(t["x"][i] / cell)):][:, :7].any())
        r0, c0 = int(round(t["y"][i] / cell)), int(round(t["x"][i] / cell))
        np.testing.assert_allclose(soft[:, r0:r0 + 7, c0:c0 + 7].sum(axis=(1, 2)), t["weights"][i], rtol=5e-3)


def test_weights_reconstruct_cells_with_the_reported_error(cmu_atlas, data_dir):
    """Recompute a few tiles' activations independently (OpenSlide read, PIL resize, the model with
    a hook) and check W H reconstructs them with the error the atlas reports."""
    with Atlas(cmu_atlas) as atlas:
        t = atlas.tiles(["x", "y", "recon_err"])
        H = atlas.group("clusters")["H"]
        sl = atlas.slides()
        maps = atlas.slide_maps(0)
        cell, tile_l0 = sl["cell_l0"][0], sl["tile_l0"][0]
    net = load_model("capricorn-crc").module
    grabbed = {}
    net.features.norm5.register_forward_hook(lambda m, i, o: grabbed.__setitem__("a", torch.relu(o.clone())))
    slide = open_slide(data_dir / "slides" / "CMU-1-Small-Region.svs")
    # Glass cells are blanked in the soft maps after the tile's error was computed: check tiles without them.
    glass = np.asarray(maps["cell_tissue"], np.float32) < 0.10
    clean = [i for i in range(len(t["x"])) if not glass[int(round(t["y"][i] / cell)):][:7,
             int(round(t["x"][i] / cell)):][:, :7].any()]
    assert len(clean) >= 3
    for i in (clean[0], clean[len(clean) // 2], clean[-1]):
        x, y = int(t["x"][i]), int(t["y"][i])
        size = int(round(tile_l0))
        rgb = slide.read_region((x, y), 0, (size, size))
        rgb = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.Resampling.BOX))
        with torch.inference_mode():
            net(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255)
        cells = grabbed["a"][0].permute(1, 2, 0).reshape(-1, H.shape[1]).numpy()
        r0, c0 = int(round(y / cell)), int(round(x / cell))
        w = maps["soft"][:, r0:r0 + 7, c0:c0 + 7].astype(np.float32).reshape(H.shape[0], -1).T
        err = np.linalg.norm(cells - w @ H) / np.linalg.norm(cells)
        assert abs(err - t["recon_err"][i]) < 0.02, (i, err, t["recon_err"][i])


def test_inspect_shows_every_part(breakhis_atlas):
    text = run_cli("inspect", str(breakhis_atlas))
    assert text.returncode == 0, text.stderr
    for needle in ("benign", "malignant", "capricorn-crc", "features.norm5", "K=6", "k-means", "projection pca",
                   "prototypes", "192 tiles" if False else "tiles"):
        assert needle in text.stdout, needle
    js = run_cli("inspect", str(breakhis_atlas), "--json")
    s = json.loads(js.stdout)
    assert s["slides"]["total"] == 32 and set(s["by_diagnosis"]) == {"benign", "malignant"}
    assert sum(r["tiles"] for r in s["clusters"]["nmf"]) == s["tiles"]
    assert sum(s["clusters"]["kmeans_sizes"]) == s["tiles"]
    assert len(s["clusters"]["distances"]) == 6
    assert all(r["prototypes"] > 0 for r in s["clusters"]["nmf"] if r["tiles"])
    assert s["config"]["cli_mpp"] == 0.5


def test_prototypes_are_top_weight_cells_with_crops(breakhis_atlas):
    with Atlas(breakhis_atlas) as atlas:
        p = atlas.group("clusters/prototypes")
        crops = atlas.ragged("clusters/prototypes", "jpeg")
        assert len(crops) == len(p["cluster"]) > 0
        assert all(c[:2] == b"\xff\xd8" for c in crops)
        for c in np.unique(p["cluster"]):
            w = p["weight"][p["cluster"] == c]
            assert (np.diff(w) <= 0).all()  # best first
        d = atlas.group("clusters")["distances"]
        assert np.allclose(d, d.T) and np.allclose(np.diag(d), 0)


def test_inspect_rejects_a_non_atlas(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"nope")
    proc = run_cli("inspect", str(bad))
    assert proc.returncode == 2 and "not an HDF5 file" in proc.stderr


def test_kather_clusters_against_tissue_classes(data_dir, tmp_path):
    """Agreement (adjusted Rand index) between concepts and the 8 tissue classes: a figure, not a gate."""
    from sklearn.metrics import adjusted_rand_score

    out = tmp_path / "kather.h5"
    proc = run_cli("run", "--cohort", str(data_dir / "tiles" / "kather-crc" / "manifest.csv"), "--model",
                   "capricorn-crc", "--out", str(out), "--min-tissue", "0", "--k", "8", "--workers", "0",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    with Atlas(out) as atlas:
        sl = atlas.slides()
        t = atlas.tiles(["slide", "nmf_cluster", "kmeans_cluster", "probs"])
        names = atlas.output_names
    assert len(t["slide"]) == 32
    truth = sl["diagnosis"][t["slide"]]
    ari_nmf = adjusted_rand_score(truth, t["nmf_cluster"])
    ari_km = adjusted_rand_score(truth, t["kmeans_cluster"])
    ari_model = adjusted_rand_score(truth, t["probs"].argmax(axis=1))
    print(f"\nKather 32 tiles, K=8: ARI NMF {ari_nmf:.3f}, k-means {ari_km:.3f}, model argmax {ari_model:.3f}")
    assert -1 <= ari_nmf <= 1 and len(set(t["nmf_cluster"])) > 1
    assert names[:9] == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


def test_concepts_of_an_earlier_atlas_are_reused(cmu_atlas, data_dir, tmp_path):
    """--concepts skips calibration and assigns a new cohort to exactly the earlier H."""
    out = tmp_path / "kidney.h5"
    proc = run_cli("run", "--cohort", str(data_dir / "slides" / "kidney-48-5.tif"), "--model", "capricorn-crc",
                   "--out", str(out), "--native-resolution", "--min-tissue", "0.05", "--concepts", str(cmu_atlas),
                   "--workers", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "reusing the 6 concepts" in proc.stderr and "calibration" not in proc.stderr
    with Atlas(out) as new, Atlas(cmu_atlas) as old:
        np.testing.assert_array_equal(new.group("clusters")["H"], old.group("clusters")["H"])
        assert new.n_tiles > 0
    # concepts from another layer cannot be reused: the error says why
    bad = run_cli("run", "--cohort", str(data_dir / "slides" / "kidney-48-5.tif"), "--model", "capricorn-crc",
                  "--layer", "features.transition2", "--out", str(tmp_path / "bad.h5"), "--native-resolution",
                  "--concepts", str(cmu_atlas), "--workers", "0", "--no-progress")
    assert bad.returncode == 2 and "channels" in bad.stderr
