"""Tile-level k-means and 2-D projections on real embeddings of the trained Capricorn DenseNet121.

Data: the 32 Kather CRC tiles (8 tissue classes x 4) and 8 tissue tiles of the CMU slide (with
../shared/data), else 40 generated tissue-like tiles (only the tissue-class check needs the real ones).
`cells` are the ReLU'd features.norm5 cells (40 tiles x 49, 1024 channels); `pooled` are the
per-tile means of those cells, i.e. the embedding the classifier head sees.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from conftest import DATA
from generated import slide_pixels
from precompute.capricorn import build_capricorn_crc
from precompute.clustering import assign, fit_kmeans
from precompute.projection import project

TILE = 224


def _real_tiles(data_dir) -> tuple[list[np.ndarray], list[str]]:
    import openslide

    paths = sorted((data_dir / "tiles" / "kather-crc").glob("*.png"))
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    classes = [p.name.split("-")[0] for p in paths]
    slide = openslide.OpenSlide(str(data_dir / "slides" / "CMU-1-Small-Region.svs"))
    w, h = slide.dimensions
    grid = [np.asarray(slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB"))
            for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)]
    tissue = [(g.mean(axis=2) < 200).mean() for g in grid]  # background is near-white
    return tiles + [grid[i] for i in np.argsort(tissue)[::-1][:8]], classes


@pytest.fixture(scope="module")
def embeddings() -> dict:
    if DATA.is_dir():
        tiles, classes = _real_tiles(DATA)
    else:
        tiles, classes = [slide_pixels(seed, TILE, TILE, blobs=10) for seed in range(40)], None
    model = build_capricorn_crc()
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0  # Capricorn input
    with torch.inference_mode():
        f = torch.relu(model.features(x))
    cells = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy().copy()
    pooled = f.mean(dim=(2, 3)).numpy().copy()
    return {"cells": cells, "pooled": pooled, "kather_classes": classes}


def test_kmeans_is_as_good_as_scikit_learns_and_seeded(embeddings):
    """Our k-means (a seeded sample, a few restarts) reaches about the within-cluster sum of squares of
    scikit-learn's KMeans with 10 restarts on all rows, uses every cluster, and repeats with its seed."""
    from sklearn.cluster import KMeans

    X = embeddings["cells"]
    labels, dist = assign(fit_kmeans(X, 6, seed=0, sample=1000), X, batch=300)
    assert labels.shape == (len(X),) and labels.dtype == np.int16 and len(np.unique(labels)) == 6
    ref = KMeans(6, n_init=10, random_state=0).fit(X.astype(np.float64))
    wcss = sum(((X[labels == c] - X[labels == c].mean(axis=0)) ** 2).sum() for c in range(6))
    assert wcss <= 1.05 * ref.inertia_
    again, _ = assign(fit_kmeans(X, 6, seed=0, sample=1000), X, batch=300)
    np.testing.assert_array_equal(again, labels)


def test_assign_gives_the_nearest_centre_and_its_distances(embeddings):
    X = embeddings["cells"]
    model = fit_kmeans(X, 5, seed=1, sample=1500)
    labels, dist = assign(model, X, batch=257)  # batch size that does not divide n
    C = model.cluster_centers_.astype(np.float64)
    brute = np.sqrt(((X.astype(np.float64)[:, None, :] - C[None]) ** 2).sum(axis=2))  # (n, k), by hand
    np.testing.assert_allclose(dist, brute, rtol=1e-4, atol=1e-3)
    margin = np.sort(brute, axis=1)
    clear = margin[:, 1] - margin[:, 0] > 1e-3 * margin[:, 1]  # rows not on a boundary (float32 ties)
    np.testing.assert_array_equal(labels[clear], brute.argmin(axis=1)[clear])


def test_kmeans_on_pooled_embeddings_groups_tissue_classes(embeddings):
    # What a user checks first: do tiles of one tissue class land in one cluster?
    if embeddings["kather_classes"] is None:
        pytest.skip(f"the Kather tiles with their tissue classes are in ../shared/data, not found at {DATA}")
    X = embeddings["pooled"][:32]
    labels, _ = assign(fit_kmeans(X, 8, seed=0), X)
    classes = embeddings["kather_classes"]
    ari = adjusted_rand_score(classes, labels)
    # Chance level: the same clusters scored against shuffled class labels.
    rng = np.random.default_rng(0)
    chance = np.percentile([adjusted_rand_score(rng.permutation(classes), labels) for _ in range(200)], 99)
    print(f"k-means (k=8) on pooled embeddings of 32 Kather tiles: ARI vs tissue class {ari:.2f} "
          f"(99th percentile by chance {chance:.2f})")
    assert ari > chance


def test_kmeans_refuses_too_few_rows(embeddings):
    with pytest.raises(ValueError, match="at least 6 rows"):
        fit_kmeans(embeddings["pooled"][:5], 6)


def test_pca_projection_shape_params_and_determinism(embeddings):
    X = embeddings["cells"]
    coords, params = project(X, "pca", seed=3, fit_sample=800)
    assert coords.shape == (len(X), 2) and coords.dtype == np.float32
    assert params["method"] == "pca" and params["fit_rows"] == 800 and params["n_rows"] == len(X)
    evr = params["explained_variance_ratio"]
    print(f"PCA explained variance ratio {evr}")
    assert len(evr) == 2 and evr[0] >= evr[1] > 0 and sum(evr) < 1
    again, _ = project(X, "pca", seed=3, fit_sample=800)
    np.testing.assert_array_equal(again, coords)


def test_pca_equals_full_pca_up_to_sign(embeddings):
    X = embeddings["cells"]
    full = PCA(n_components=2).fit_transform(X.astype(np.float64))
    coords, params = project(X, "pca")  # default sample covers every row here
    assert params["fit_rows"] == len(X)
    for j in range(2):
        sign = np.sign(coords[:, j] @ full[:, j])
        np.testing.assert_allclose(sign * coords[:, j], full[:, j], rtol=1e-3, atol=1e-3 * np.abs(full[:, j]).max())
    # Fitting on a sample gives (nearly) the same axes.
    sampled, _ = project(X, "pca", fit_sample=len(X) // 2)
    corr = [abs(np.corrcoef(sampled[:, j], full[:, j])[0, 1]) for j in range(2)]
    print(f"PCA on a half sample vs full: |corr| per axis {corr}")
    assert min(corr) > 0.95


def test_tiny_inputs_degrade_gracefully(embeddings):
    P = embeddings["pooled"]
    for n in (0, 1):
        coords, params = project(P[:n], "pca")
        assert coords.shape == (n, 2) and not coords.any()
    coords, params = project(P[:2], "pca")
    assert coords.shape == (2, 2) and params["explained_variance_ratio"][1] == 0.0
    assert coords[0, 0] == pytest.approx(-coords[1, 0], rel=1e-4)  # two points: symmetric on axis 1
    coords, params = project(P[:5], "umap")
    assert coords.shape == (5, 2) and params["method"] == "pca" and "UMAP" in params["note"]
    with pytest.raises(ValueError, match="'pca' or 'umap'"):
        project(P, "tsne")


def test_umap_projection_shape_and_determinism(embeddings):
    P = embeddings["pooled"]
    coords, params = project(P, "umap", seed=0, fit_sample=30)  # 10 rows placed by transform
    assert coords.shape == (len(P), 2) and coords.dtype == np.float32 and np.isfinite(coords).all()
    assert params["method"] == "umap" and params["fit_rows"] == 30 and params["n_neighbors"] == 15
    again, _ = project(P, "umap", seed=0, fit_sample=30)
    np.testing.assert_array_equal(again, coords)
