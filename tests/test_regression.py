"""The numpy output regression (precompute/regression.py) against scikit-learn computed independently:
LinearRegression for the fit, GroupKFold for the single split, an explicit loop over folds for the
repeated cross-validation. The report's R^2 figures come from these functions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score as sk_r2
from sklearn.model_selection import GroupKFold

from precompute.regression import output_regression, repeated_group_cv, tile_groups


def _data(seed: int, n_groups: int = 13, collinear: bool = False):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 40, n_groups)
    sizes[1] = sizes[0]  # a tie in group size: the seed decides which goes where
    groups = np.repeat([f"slide-{i}" for i in range(n_groups)], sizes)
    X = rng.gamma(2.0, 1.0, (len(groups), 5))
    if collinear:  # cells per cluster: rows sum to the same count, collinear with the intercept
        X = X / X.sum(axis=1, keepdims=True) * 49
    y = X @ rng.normal(size=5) + rng.normal(size=n_groups)[np.unique(groups, return_inverse=True)[1]] \
        + rng.normal(scale=0.5, size=len(groups))
    return X, y, groups


@pytest.mark.parametrize("collinear", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_and_grouped_split_equal_scikit_learn(seed, collinear):
    X, y, groups = _data(seed, collinear=collinear)
    res = output_regression(X, y, groups, seed=seed)
    ref = LinearRegression().fit(X, y)
    assert res["r2"] == pytest.approx(sk_r2(y, ref.predict(X)), abs=1e-9)
    if not collinear:  # collinear: any least-squares solution fits equally; compare predictions only
        np.testing.assert_allclose(res["coef"], ref.coef_, rtol=1e-7, atol=1e-9)
        assert res["intercept"] == pytest.approx(ref.intercept_, rel=1e-7, abs=1e-9)
    np.testing.assert_allclose(res["intercept"] + X @ res["coef"], ref.predict(X), rtol=1e-7, atol=1e-7)
    _, codes = np.unique(groups, return_inverse=True)
    relabel = np.random.default_rng(seed).permutation(codes.max() + 1)[codes]
    oof, fold = np.empty(len(y)), np.empty(len(y), dtype=int)
    for f, (train, test) in enumerate(GroupKFold(n_splits=5).split(X, y, relabel)):
        oof[test] = LinearRegression().fit(X[train], y[train]).predict(X[test])
        fold[test] = f
    np.testing.assert_array_equal(res["fold"], fold)
    assert res["r2_cv"] == pytest.approx(sk_r2(y, oof), abs=1e-9)
    assert (res["n_folds"], res["n_groups"], res["n_tiles"]) == (5, 13, len(y))


def test_repeated_cv_equals_a_loop_of_fits():
    X, y, groups = _data(4, n_groups=9)
    res = repeated_group_cv(X, y, groups, n_repeats=6, seed=3)
    _, codes = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(3)
    expected = []
    for _ in range(6):
        fold_of_group = np.empty(9, dtype=int)
        fold_of_group[rng.permutation(9)] = np.arange(9) % 5
        fold = fold_of_group[codes]
        oof = np.empty(len(y))
        for f in range(5):
            t = fold == f
            oof[t] = LinearRegression().fit(X[~t], y[~t]).predict(X[t])
        expected.append(sk_r2(y, oof))
    np.testing.assert_allclose(res["r2_cv_repeats"], expected, atol=1e-9)
    assert res["r2_cv_median"] == pytest.approx(np.median(expected))
    assert res["r2_cv_p5"] <= res["r2_cv_median"] <= res["r2_cv_p95"]


def test_undefined_cases_say_why():
    X, y, groups = _data(0)
    one = output_regression(X, y, np.zeros(len(y)))
    assert np.isnan(one["r2_cv"]) and "at least 2 groups" in one["note"] and (one["fold"] == -1).all()
    flat = output_regression(X, np.full(len(y), 2.5), groups)
    assert np.isnan(flat["r2"]) and "same on every tile" in flat["note"]
    with pytest.raises(ValueError, match="NaN"):
        output_regression(X, np.where(np.arange(len(y)) == 3, np.nan, y), groups)
    assert np.isnan(repeated_group_cv(X, y, np.zeros(len(y)))["r2_cv_median"])


def test_patient_codes_give_the_folds_of_the_patient_names():
    X, y, _ = _data(5, n_groups=6)
    rng = np.random.default_rng(5)
    patients = np.array(["P-10", "P-02", "P-02", "P-31", "P-07", "P-10", "P-19", "P-44", "P-07"])
    slide_of_tile = rng.integers(0, len(patients), len(y))
    codes, kind = tile_groups(slide_of_tile, patients)
    assert kind == "patient" and codes.dtype == np.int64
    by_name = output_regression(X, y, patients[slide_of_tile], seed=2)
    by_code = output_regression(X, y, codes, seed=2)
    np.testing.assert_array_equal(by_code["fold"], by_name["fold"])
    assert by_code["r2_cv"] == by_name["r2_cv"]
    # one slide without a patient: slides are the groups
    codes, kind = tile_groups(slide_of_tile, np.where(np.arange(9) == 4, "", patients))
    assert kind == "slide" and (codes == slide_of_tile).all()
