"""The one row sampler: seeded, sorted, without replacement, and per slide by the whole slide id."""

from __future__ import annotations

import numpy as np

from precompute.hashing import id_words, sha256_file
from precompute.sampling import CELL_STREAM, generator, sample_rows


def test_sample_is_seeded_sorted_and_without_replacement():
    a = sample_rows(1000, 50, seed=3)
    assert np.array_equal(a, sample_rows(1000, 50, seed=3))
    assert not np.array_equal(a, sample_rows(1000, 50, seed=4))
    assert len(np.unique(a)) == 50 and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    assert np.array_equal(sample_rows(7, 50, seed=3), np.arange(7))


def test_slide_ids_sharing_a_long_prefix_get_their_own_sample():
    # TCGA diagnostic slides of one patient differ only after the first 16 bytes (...-DX1 / ...-DX2).
    dx1 = "TCGA-A6-2671-01Z-00-DX1.85dcd7ac-a3f9-4be6-99b8-5a6a0a8a2a7e"
    dx2 = "TCGA-A6-2671-01Z-00-DX2.0fe3d4b5-6a57-4f5a-8f35-0b1f1f0a9c11"
    assert dx1[:16] == dx2[:16]
    s1, s2 = sample_rows(5000, 48, seed=0, key=dx1), sample_rows(5000, 48, seed=0, key=dx2)
    assert not np.array_equal(s1, s2)
    assert np.array_equal(s1, sample_rows(5000, 48, seed=0, key=dx1))
    assert not np.array_equal(sample_rows(5000, 48, seed=0, key=dx1[:-1] + "f"), s1)  # the last byte counts too


def test_the_cell_stream_of_a_slide_is_its_own():
    """The calibration's cells of a slide are drawn from a second stream of (seed, slide id): repeatable, not
    the random bits that chose its tiles, and not another slide's."""
    dx1 = "TCGA-A6-2671-01Z-00-DX1.85dcd7ac-a3f9-4be6-99b8-5a6a0a8a2a7e"
    cells = generator(0, dx1, CELL_STREAM).integers(0, 2**32, 16)
    assert np.array_equal(cells, generator(0, dx1, CELL_STREAM).integers(0, 2**32, 16))
    assert not np.array_equal(cells, generator(0, dx1).integers(0, 2**32, 16))
    assert not np.array_equal(cells, generator(0, dx1[:-1] + "f", CELL_STREAM).integers(0, 2**32, 16))
    assert not np.array_equal(cells, generator(1, dx1, CELL_STREAM).integers(0, 2**32, 16))


def test_hash_helpers(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert id_words("a") != id_words("b") and len(id_words("a")) == 8
