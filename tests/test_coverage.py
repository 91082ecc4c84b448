"""Area fractions of a mask under rectangles (tissue per tile, glass per map cell): the exact covered
area with partial pixels, checked against a brute-force supersampling and scipy's interpolation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from precompute.coverage import area_fraction


def test_area_fraction_is_the_covered_area():
    rng = np.random.default_rng(0)
    mask = (rng.random((23, 31)) > 0.6).astype(np.float64)
    u0, v0 = rng.uniform(-2, 28, 40), rng.uniform(-2, 20, 40)
    u1, v1 = u0 + rng.uniform(0.3, 9, 40), v0 + rng.uniform(0.3, 9, 40)
    got = area_fraction(mask, u0, v0, u1, v1)
    # brute force: sample each clipped rectangle on a fine grid of points (pixel p covers [p, p+1))
    for i in range(40):
        a, b = np.clip([u0[i], u1[i]], 0, 31), np.clip([v0[i], v1[i]], 0, 23)
        if a[1] - a[0] < 1e-9 or b[1] - b[0] < 1e-9:
            continue
        uu = np.linspace(a[0], a[1], 401)[:-1] + (a[1] - a[0]) / 800
        vv = np.linspace(b[0], b[1], 401)[:-1] + (b[1] - b[0]) / 800
        want = mask[np.floor(vv).astype(int)][:, np.floor(uu).astype(int)].mean()
        assert abs(got[i] - want) < 0.01, (i, got[i], want)
    # the same as interpolating the summed-area table with scipy (the earlier implementation)
    sat = np.zeros((24, 32))
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    cu0, cu1, cv0, cv1 = np.clip(u0, 0, 31), np.clip(u1, 0, 31), np.clip(v0, 0, 23), np.clip(v1, 0, 23)
    at = lambda v, u: ndimage.map_coordinates(sat, [v, u], order=1, mode="nearest")  # noqa: E731
    ref = (at(cv1, cu1) - at(cv0, cu1) - at(cv1, cu0) + at(cv0, cu0)) / np.maximum((cu1 - cu0) * (cv1 - cv0), 1e-12)
    np.testing.assert_allclose(got, np.clip(ref, 0, 1), atol=1e-12)
    assert area_fraction(mask, [], [], [], []).shape == (0,)
