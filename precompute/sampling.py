"""One row sampler for the whole job: calibration tiles per slide, NMF and k-means fit samples, the
projection's fit sample, the K grid's cells; and the generator of the calibration's cells within each
sampled tile. Seeded by the run's seed and, where a sample belongs to one slide, by a full sha256 of
the slide id (never by the slide's place in the cohort, so reordering a manifest changes no sample)."""

from __future__ import annotations

import numpy as np

from .hashing import id_words


CELL_STREAM = 1  # a slide's calibration cells within its sampled tiles (stream 0 chose those tiles)


def generator(seed: int, key: str | None = None, stream: int = 0) -> np.random.Generator:
    """numpy Generator for `seed`, or for (seed, all bytes of key) when a key (a slide id) is given.

    stream > 0 gives an independent generator of the same (seed, key), for a second draw of one
    slide that must not reuse the random bits of its first (its tiles); stream 0 is the plain one.
    """
    entropy = int(seed) if key is None else [int(seed), *id_words(key)]
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(int(stream),) if stream else ()))


def sample_rows(n: int, size: int, seed: int, key: str | None = None) -> np.ndarray:
    """Sorted int64 indices of a seeded sample of min(size, n) of n rows, without replacement (all rows
    when size >= n). key: e.g. a slide id, so each slide gets its own sample under one seed."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(generator(seed, key).choice(n, int(size), replace=False)).astype(np.int64)
