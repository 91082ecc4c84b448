"""The atlas a run writes: format validation, cluster weights and maps, inspect, reused concepts, on the
review atlas of the dashboard tests (real images with ../shared/data, else generated ones); Kather
agreement with the tissue classes on the real tiles."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from dashboard_fixtures import dash_atlas  # noqa: F401  (a fixture)
from generated import write_slide
from precompute.models import load_model
from precompute.slides import open_slide
from precompute.store import FORMAT_VERSION, Atlas, AtlasFormatError


def test_reader_rejects_what_is_not_an_atlas(tmp_path, dash_atlas):
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
    shutil.copy(dash_atlas, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(AtlasFormatError, match=f"version {FORMAT_VERSION + 1}"):
        Atlas(newer)


def test_root_attributes_carry_the_run_configuration(dash_atlas):
    with Atlas(dash_atlas) as atlas:
        a = atlas.attrs
        assert a["format"] == "lumen-atlas" and a["tool_version"]
        assert len(a["model_sha256"]) == 64 and a["layer"] == "features.norm5"
        cfg = a["config"]
        assert cfg["tile_px"] == 224 and cfg["target_mpp"] == 0.5 and cfg["k"] == 6 and cfg["seed"] == 0
        assert "run" in a["command_line"] and "--min-tissue 0" in a["command_line"] and a["created_utc"]
        assert cfg["min_tissue"] == 0 and cfg["cli_mpp"] == 0.5  # the options the review atlas was built with


def _slide_tiles(atlas: Atlas, sid: str, columns: list[str]) -> tuple[int, dict]:
    """Index of slide `sid` and its tiles' columns."""
    i = list(atlas.slides()["slide_id"]).index(sid)
    t = atlas.tiles(["slide", *columns])
    return i, {c: t[c][t["slide"] == i] for c in columns}


def _clean_tiles(x, y, glass: np.ndarray, cell: float) -> list[int]:
    """Tiles (of one slide) none of whose 7 x 7 cells is glass."""
    return [i for i in range(len(x)) if not glass[int(round(y[i] / cell)):][:7, int(round(x[i] / cell)):][:, :7].any()]


def test_cluster_weights_and_maps_are_consistent(dash_atlas):
    with Atlas(dash_atlas) as atlas:
        all_t = atlas.tiles(["weights", "nmf_cluster", "recon_err"])
        assert (all_t["weights"] >= 0).all()
        np.testing.assert_array_equal(all_t["nmf_cluster"], all_t["weights"].argmax(axis=1))
        assert ((all_t["recon_err"] > 0) & (all_t["recon_err"] < 1)).all()
        s, t = _slide_tiles(atlas, "cmu", ["weights", "x", "y"])
        maps = atlas.slide_maps(s)
        soft, hard = maps["soft"].astype(np.float32), maps["hard"]
        assert soft.shape[0] == atlas.k and soft.shape[1:] == hard.shape
        covered = hard > 0
        glass = np.asarray(maps["cell_tissue"], np.float32) < 0.10  # cells under 10 % tissue get no concept
        cell = atlas.slides()["cell_l0"][s]
    in_tiles = np.zeros_like(covered)
    for x, y in zip(t["x"], t["y"]):
        in_tiles[int(round(y / cell)):int(round(y / cell)) + 7, int(round(x / cell)):int(round(x / cell)) + 7] = 1
    assert in_tiles.sum() == len(t["x"]) * 49
    np.testing.assert_array_equal(covered, in_tiles & ~glass)
    # the hard map is the argmax of the soft maps wherever a tile covered a tissue cell
    np.testing.assert_array_equal(hard[covered], soft.argmax(axis=0)[covered] + 1)
    assert (soft[:, ~covered] == 0).all()
    # a tile's summed weights are the sum of its cells in the soft maps (no overlap by default), for
    # a tile without glass cells
    i = _clean_tiles(t["x"], t["y"], glass, cell)[0]
    r0, c0 = int(round(t["y"][i] / cell)), int(round(t["x"][i] / cell))
    np.testing.assert_allclose(soft[:, r0:r0 + 7, c0:c0 + 7].sum(axis=(1, 2)), t["weights"][i], rtol=5e-3)


def test_weights_reconstruct_cells_with_the_reported_error(dash_atlas):
    """Recompute a few tiles' activations independently (OpenSlide read, PIL resize, the model with
    a hook) and check W H reconstructs them with the error the atlas reports."""
    net = load_model("capricorn-crc").module
    grabbed = {}
    net.features.norm5.register_forward_hook(lambda m, i, o: grabbed.__setitem__("a", torch.relu(o.clone())))
    checked = 0
    with Atlas(dash_atlas) as atlas:
        H = atlas.group("clusters")["H"]
        sl = atlas.slides()
        for sid in ("cmu", sl["slide_id"][0], sl["slide_id"][7]):
            s, t = _slide_tiles(atlas, sid, ["x", "y", "recon_err"])
            maps = atlas.slide_maps(s)
            cell, size = sl["cell_l0"][s], int(round(sl["tile_l0"][s]))
            # Glass cells are blanked in the soft maps after the tile's error was computed: check tiles without them.
            clean = _clean_tiles(t["x"], t["y"], np.asarray(maps["cell_tissue"], np.float32) < 0.10, cell)
            with open_slide(sl["path"][s]) as slide:
                for i in clean[:3]:
                    x, y = int(t["x"][i]), int(t["y"][i])
                    rgb = np.asarray(Image.fromarray(slide.read_region((x, y), 0, (size, size)))
                                     .resize((224, 224), Image.Resampling.BOX))
                    with torch.inference_mode():
                        net(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255)
                    cells = grabbed["a"][0].permute(1, 2, 0).reshape(-1, H.shape[1]).numpy()
                    r0, c0 = int(round(y / cell)), int(round(x / cell))
                    w = maps["soft"][:, r0:r0 + 7, c0:c0 + 7].astype(np.float32).reshape(H.shape[0], -1).T
                    err = np.linalg.norm(cells - w @ H) / np.linalg.norm(cells)
                    assert abs(err - t["recon_err"][i]) < 0.02, (sid, i, err, t["recon_err"][i])
                    checked += 1
    assert checked >= 3


def test_inspect_shows_every_part(dash_atlas):
    with Atlas(dash_atlas) as atlas:
        sl, n_tiles = atlas.slides(), atlas.n_tiles
        kmeans = np.bincount(atlas.tiles(["kmeans_cluster"])["kmeans_cluster"], minlength=atlas.k)
    text = run_cli("inspect", str(dash_atlas))
    assert text.returncode == 0, text.stderr
    for needle in ("benign", "malignant", "squamous", "capricorn-crc", "features.norm5", "K=6", "k-means",
                   "projection pca", "prototypes", f"11 (9 ok, 1 without tissue, 1 failed); {n_tiles} tiles",
                   "failed broken", "broken.svs"):
        assert needle in text.stdout, needle
    js = run_cli("inspect", str(dash_atlas), "--json")
    s = json.loads(js.stdout)
    assert s["slides"]["total"] == 11 and set(s["by_diagnosis"]) == {"benign", "malignant", "squamous"}
    assert s["tiles"] == n_tiles == int(sl["n_tiles"].sum())
    assert sum(r["tiles"] for r in s["clusters"]["nmf"]) == n_tiles
    assert s["clusters"]["kmeans_sizes"] == kmeans.tolist()
    assert len(s["clusters"]["distances"]) == 6
    assert all(r["prototypes"] > 0 for r in s["clusters"]["nmf"] if r["tiles"])
    assert s["config"]["cli_mpp"] == 0.5


def test_prototypes_are_top_weight_cells_with_crops(dash_atlas):
    with Atlas(dash_atlas) as atlas:
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


@pytest.mark.slow
def test_kather_clusters_against_tissue_classes(data_dir, tmp_path):
    """Agreement (adjusted Rand index) between concepts and the 8 tissue classes, printed as a figure;
    the gate: concepts and k-means clusters agree with the classes better than any of 200 shuffles of
    the same labels (chance), and the model's own argmax does too."""
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
    rng = np.random.default_rng(0)
    for labels in (t["nmf_cluster"], t["kmeans_cluster"], t["probs"].argmax(axis=1)):
        chance = max(adjusted_rand_score(truth, rng.permutation(labels)) for _ in range(200))
        assert adjusted_rand_score(truth, labels) > chance
    assert names[:9] == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]


@pytest.mark.slow
def test_concepts_of_an_earlier_atlas_are_reused(dash_atlas, tmp_path):
    """--concepts skips calibration and assigns a new cohort to exactly the earlier H."""
    slide = write_slide(tmp_path / "new.tiff", seed=21, width=448, height=448)
    out = tmp_path / "new.h5"
    proc = run_cli("run", "--cohort", str(slide), "--model", "capricorn-crc", "--out", str(out),
                   "--concepts", str(dash_atlas), "--workers", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "reusing the 6 concepts" in proc.stderr and "calibration" not in proc.stderr
    with Atlas(out) as new, Atlas(dash_atlas) as old:
        np.testing.assert_array_equal(new.group("clusters")["H"], old.group("clusters")["H"])
        assert new.n_tiles > 0
    # concepts from another layer cannot be reused: the error says why
    bad = run_cli("run", "--cohort", str(slide), "--model", "capricorn-crc", "--layer", "features.transition2",
                  "--out", str(tmp_path / "bad.h5"), "--concepts", str(dash_atlas), "--workers", "0", "--no-progress")
    assert bad.returncode == 2 and "channels" in bad.stderr
