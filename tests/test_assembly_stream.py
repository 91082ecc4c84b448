"""The out-of-core assembly's building blocks give what the in-memory versions give."""

from __future__ import annotations

import h5py
import numpy as np

from precompute.assemble import _choose_prototypes
from precompute.clustering import assign, assign_labels, fit_kmeans
from precompute.projection import project
from precompute.store import ColumnWriter, TileColumn


def test_sampled_rows_and_batches_read_what_the_column_holds(tmp_path):
    data = np.random.default_rng(0).random((10_007, 5)).astype(np.float16)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        col = TileColumn(f.create_dataset("x", data=data, chunks=(300, 5)), block_rows=1000)
        rows = np.sort(np.random.default_rng(1).choice(len(data), 777, replace=False))
        assert np.array_equal(col[rows], data[rows])
        assert np.array_equal(col[np.array([0, 999, 1000, 10_006])], data[[0, 999, 1000, 10_006]])
        assert np.array_equal(np.concatenate([b for _, b in col.batches(4096)]), data)


def test_streamed_kmeans_labels_and_projection_equal_the_in_memory_ones(tmp_path):
    rng = np.random.default_rng(2)
    emb = (rng.gamma(2, 1, (3, 16))[rng.integers(0, 3, 5000)] * rng.uniform(0.7, 1.3, (5000, 16))).astype(np.float16)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        col = TileColumn(f.create_dataset("emb", data=emb, chunks=(512, 16)), block_rows=700)
        km = fit_kmeans(col, 3, seed=0, sample=2000)
        km_mem = fit_kmeans(emb, 3, seed=0, sample=2000)
        assert np.array_equal(km.cluster_centers_, km_mem.cluster_centers_)
        labels = ColumnWriter(f.create_dataset("labels", shape=(5000,), dtype=np.int16))
        assign_labels(km, col, labels, batch=999)
        assert np.array_equal(labels.ds[()], assign(km_mem, emb)[0])
        proj = ColumnWriter(f.create_dataset("proj", shape=(5000, 2), dtype=np.float32))
        _, params = project(col, seed=0, fit_sample=3000, batch_rows=1234, out=proj)
        coords, params_mem = project(emb, seed=0, fit_sample=3000)
        assert np.array_equal(proj.ds[()], coords) and params == params_mem


def test_choosing_prototypes_slide_by_slide_equals_choosing_from_all():
    rng = np.random.default_rng(3)
    k, keep = 4, 6
    slides = []
    for s in range(9):
        n = int(rng.integers(0, 30))
        weights = rng.choice([0.5, 1.0, 2.0, 3.0], n) * (1 if s % 3 else rng.random(n) + 1)  # ties on purpose
        slides.append([(s, i, int(rng.integers(0, k)), float(weights[i]), 0, 0, bytes([s, i])) for i in range(n)])
    everything = _choose_prototypes([r for rows in slides for r in rows], k, keep)
    running: list[tuple] = []
    for rows in slides:
        running = _choose_prototypes(running + rows, k, keep)
    assert running == everything
    assert max(sum(r[0] == s and r[2] == c for r in running) for s in range(9) for c in range(k)) <= 2  # ceil(6/4)
