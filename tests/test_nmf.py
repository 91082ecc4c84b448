"""TorchNMF against scikit-learn's NMF on activations of the trained Capricorn DenseNet121.

Rows are spatial cells (1024 channels, 7 x 7 per 224 px tile) of 40 tiles: with ../shared/data the 32
Kather CRC tiles and the 8 most tissue-rich 224 px tiles of the CMU slide, else 40 generated tissue-like
tiles: 1,960 x 1,024, features.norm5 output (signed) and its ReLU (what the classifier head sees,
non-negative).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA
from generated import slide_pixels
from precompute.capricorn import build_capricorn_crc
from precompute.nmf import TorchNMF, make_nonnegative, nnls_converged, nnls_rows, relative_error

K, SEED, TILE = 6, 0, 224


def _real_tiles(data_dir, n_slide_tiles: int = 8) -> np.ndarray:
    """Kather tiles + the most tissue-rich grid tiles of the CMU slide: (N, 224, 224, 3) uint8."""
    import openslide

    kather = sorted((data_dir / "tiles" / "kather-crc").glob("*.png"))
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in kather]
    slide = openslide.OpenSlide(str(data_dir / "slides" / "CMU-1-Small-Region.svs"))
    w, h = slide.dimensions
    grid = [np.asarray(slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB"))
            for y in range(0, h - TILE + 1, TILE) for x in range(0, w - TILE + 1, TILE)]
    tissue = [(g.mean(axis=2) < 200).mean() for g in grid]  # background is near-white
    tiles += [grid[i] for i in np.argsort(tissue)[::-1][:n_slide_tiles]]
    return np.stack(tiles)


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """(40, 224, 224, 3) uint8: real tiles with ../shared/data, else generated tissue-rich tiles."""
    if DATA.is_dir():
        return _real_tiles(DATA)
    return np.stack([slide_pixels(seed, TILE, TILE, blobs=10) for seed in range(40)])


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_capricorn_crc()


@pytest.fixture(scope="module")
def signed(model, tiles) -> np.ndarray:
    """features.norm5 output of the trained model, one row per cell: (1960, 1024) float32, signed."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0  # Capricorn input
    with torch.inference_mode():
        f = model.features(x)
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy().copy()


@pytest.fixture(scope="module")
def V(signed) -> np.ndarray:
    """ReLU of the norm5 output (what DenseNet's head applies): (1960, 1024) float32 >= 0."""
    return np.maximum(signed, 0)


@pytest.fixture(scope="module")
def sk_nmf(V):
    from sklearn.decomposition import NMF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: it is the reference anyway
        return NMF(n_components=K, init="nndsvd", max_iter=500, random_state=SEED).fit(V)


@pytest.fixture(scope="module")
def ours(V) -> TorchNMF:
    return TorchNMF(K, seed=SEED, device="cpu").fit(V)


def _direct_rel_error(V, W, H) -> float:
    V64 = V.astype(np.float64)
    return float(np.linalg.norm(V64 - W.astype(np.float64) @ H.astype(np.float64)) / np.linalg.norm(V64))


def test_factorised_cells_are_what_the_classifier_sees(V, model, tiles):
    """The ReLU'd norm5 cells, averaged over each tile's 7 x 7 cells and put through the classifier,
    give the model's own logits: the concepts explain the layer the prediction depends on."""
    x = torch.from_numpy(tiles[:8]).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        logits = model(x).numpy()
        pooled = torch.from_numpy(V[:8 * 49].reshape(8, 49, -1).mean(axis=1))
        from_cells = model.classifier(pooled).numpy()
    np.testing.assert_allclose(from_cells, logits, rtol=1e-4, atol=1e-4)
    zeros = (V == 0).mean()
    print(f"activations {V.shape}, {zeros:.1%} zeros")
    assert 0 < zeros < 1  # the ReLU did something, and left something


def test_fit_error_within_one_percent_of_sklearn(V, sk_nmf, ours):
    sk_err = _direct_rel_error(V, sk_nmf.transform(V), sk_nmf.components_)
    print(f"relative error: TorchNMF {ours.reconstruction_err_:.5f} in {ours.n_iter_} it, "
          f"sklearn {sk_err:.5f} in {sk_nmf.n_iter_} it, ratio {ours.reconstruction_err_ / sk_err:.4f}")
    assert ours.reconstruction_err_ <= 1.01 * sk_err
    assert ours.components_.shape == (K, V.shape[1]) and ours.components_.dtype == np.float32
    assert (ours.components_ >= 0).all()
    # The reported error is what the factors actually achieve (W re-solved with H fixed).
    W = ours.transform(V)
    assert _direct_rel_error(V, W, ours.components_) == pytest.approx(ours.reconstruction_err_, rel=2e-3)


def test_relative_error_matches_direct_computation(V, sk_nmf):
    W = sk_nmf.transform(V)
    direct = _direct_rel_error(V, W, sk_nmf.components_)
    assert relative_error(V, W, sk_nmf.components_) == pytest.approx(direct, rel=1e-5)


def test_same_seed_same_components(V, ours):
    again = TorchNMF(K, seed=SEED, device="cpu").fit(V)
    np.testing.assert_array_equal(again.components_, ours.components_)


def test_transform_agrees_with_sklearn(V, sk_nmf):
    W_sk = sk_nmf.transform(V)
    W = TorchNMF.from_components(sk_nmf.components_).transform(V, batch_rows=1000)
    rel = np.linalg.norm(W - W_sk) / np.linalg.norm(W_sk)
    same = (W.argmax(1) == W_sk.argmax(1)).mean()
    print(f"transform vs sklearn: relative difference of W {rel:.2e}, same argmax for {same:.2%} of rows")
    assert W.shape == (len(V), K) and W.dtype == np.float32
    assert (W >= 0).all()
    assert rel < 1e-3
    assert same > 0.99
    # W solves the NNLS problem at least as well as sklearn's solution does.
    assert relative_error(V, W, sk_nmf.components_) <= relative_error(V, W_sk, sk_nmf.components_) * (1 + 1e-5)


def test_nnls_rows_solves_each_row_like_scipy(V, ours):
    """The batched NNLS solver against scipy's active-set NNLS, row by row (an independent solver)."""
    from scipy.optimize import nnls

    H = ours.components_.astype(np.float64)
    rows = V[::97]
    W = nnls_rows(torch.from_numpy(rows), torch.from_numpy(ours.components_)).numpy()
    for v, w in zip(rows.astype(np.float64), W):
        ref, _ = nnls(H.T, v)
        res, res_ref = np.linalg.norm(v - w @ H), np.linalg.norm(v - ref @ H)
        assert res <= res_ref * (1 + 1e-3) + 1e-6  # as good a fit as the exact solution
        np.testing.assert_allclose(w, ref, rtol=1e-2, atol=1e-3 * max(1.0, ref.max()))
    np.testing.assert_allclose(ours.transform(rows), W, rtol=1e-4, atol=1e-5)


def test_converged_nnls_matches_scipy_across_batches_and_degenerate_prototypes():
    """The K grid's solve (nnls_rows to convergence, float64, in row batches) against scipy's NNLS per row,
    with an all-zero prototype, two equal prototypes (W not unique: the fits must match) and glass cells."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(3)
    H = rng.gamma(0.6, 1.0, size=(6, 40))
    H[2] = 0.0            # a concept that never fires
    H[5] = H[4]           # two identical concepts
    X = np.maximum(rng.gamma(0.5, 1.0, size=(300, 6)) @ H + rng.normal(0, 0.3, size=(300, 40)), 0)
    X[::50] = 0.0         # all-zero cells
    W = nnls_converged(X.astype(np.float32), H, batch_rows=64)  # several batches, the last one partial
    assert W.shape == (300, 6) and W.dtype == np.float64 and (W >= 0).all()
    assert not W[:, 2].any() and not W[::50].any()
    ref = np.stack([nnls(H.T, x)[0] for x in X.astype(np.float32).astype(np.float64)])
    fit, fit_ref = (np.linalg.norm(X.astype(np.float32) - w @ H, axis=1) for w in (W, ref))
    np.testing.assert_allclose(fit, fit_ref, rtol=1e-7, atol=1e-9)
    # Where W is unique (all but the duplicated pair), the weights themselves agree.
    unique = [0, 1, 3]
    np.testing.assert_allclose(W[:, unique], ref[:, unique], rtol=1e-5, atol=1e-6 * ref.max())
    np.testing.assert_allclose(W[:, 4] + W[:, 5], ref[:, 4] + ref[:, 5], rtol=1e-5, atol=1e-6 * ref.max())


def test_from_components_round_trip(V, ours):
    H = ours.components_.copy()
    reused = TorchNMF.from_components(H)
    H[:] = 0  # the model keeps its own copy of the prototypes
    np.testing.assert_array_equal(reused.components_, ours.components_)
    np.testing.assert_array_equal(reused.transform(V[:500]), ours.transform(V[:500]))
    with pytest.raises(ValueError, match="non-negative"):
        TorchNMF.from_components(-ours.components_)


def test_make_nonnegative_on_signed_activations(signed):
    half = len(signed) // 2
    assert (signed < 0).any()  # norm5 output before the ReLU really is signed
    A, stats = make_nonnegative(signed[:half])
    assert A.dtype == np.float32 and A.shape == (half, signed.shape[1])
    assert (A >= 0).all() and (A > 0).mean() > 0.5
    # New slides are mapped with the stats of the first call, not their own.
    B, stats_b = make_nonnegative(signed[half:], stats=stats)
    assert stats_b is stats
    expected = np.maximum((signed[half:] - stats["shift"]) / stats["scale"], 0)
    np.testing.assert_allclose(B, expected, rtol=1e-6, atol=1e-6)
    assert (B >= 0).all()
    model = TorchNMF(K, device="cpu").fit(A)  # now acceptable to NMF
    assert model.reconstruction_err_ < 1.0
    with pytest.raises(ValueError, match="channels"):
        make_nonnegative(signed[:, :10], stats=stats)


def test_signed_input_is_refused_with_a_pointer_to_the_fix(signed):
    n_neg = int((signed < 0).sum())
    with pytest.raises(ValueError, match=rf"{n_neg} negative values.*make_nonnegative"):
        TorchNMF(K, device="cpu").fit(signed)


def test_invalid_inputs(V):
    with pytest.raises(ValueError, match="n_components=6 is larger"):
        TorchNMF(K).fit(V[:4])
    bad = V[:200].copy()
    bad[3, 5] = np.nan
    bad[7, 1] = np.inf
    with pytest.raises(ValueError, match="2 NaN or infinite"):
        TorchNMF(K).fit(bad)
    with pytest.raises(ValueError, match="all zeros"):
        TorchNMF(K).fit(np.zeros((50, 20), np.float32))
    with pytest.raises(RuntimeError, match="not fitted"):
        TorchNMF(K).transform(V)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_fit_and_hook_style_nnls_match_cpu(V, ours):
    gpu = TorchNMF(K, seed=SEED, device="cuda").fit(V)
    assert gpu.reconstruction_err_ == pytest.approx(ours.reconstruction_err_, rel=1e-3)
    H = torch.from_numpy(ours.components_)
    W_gpu = nnls_rows(torch.from_numpy(V).cuda(), H.cuda()).cpu().numpy()
    np.testing.assert_allclose(W_gpu, ours.transform(V), rtol=1e-3, atol=1e-4)
