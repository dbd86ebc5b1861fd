"""The CPU coarse quantizer of a store index build (``npos.knn.coarse``): the list assignment
equals faiss's exact nearest-centroid search, k-means is seeded and gives lists whose
assignment is at least as tight as the random start's."""

from __future__ import annotations

import numpy as np
import pytest

from npos.knn.coarse import assign, kmeans


@pytest.fixture
def unit_rows():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 64))
    x = (centres[rng.integers(0, 40, 6000)] + 0.8 * rng.normal(size=(6000, 64)))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inertia(x, c, labels):
    return float(((x - c[labels]) ** 2).sum())


def test_assign_equals_faiss_nearest_centroid(unit_rows):
    faiss = pytest.importorskip("faiss")
    centroids = kmeans(unit_rows, 128, niter=3, seed=1)
    flat = faiss.IndexFlatL2(64)
    flat.add(centroids)
    _, nearest = flat.search(unit_rows, 1)
    np.testing.assert_array_equal(assign(unit_rows, centroids), nearest[:, 0])


def test_kmeans_is_seeded_and_improves_on_its_start(unit_rows):
    a = kmeans(unit_rows, 64, niter=5, seed=3)
    np.testing.assert_array_equal(a, kmeans(unit_rows, 64, niter=5, seed=3))
    assert not np.array_equal(a, kmeans(unit_rows, 64, niter=5, seed=4))
    start = kmeans(unit_rows, 64, niter=0, seed=3)  # the seeded random rows
    assert _inertia(unit_rows, a, assign(unit_rows, a)) < \
        0.9 * _inertia(unit_rows, start, assign(unit_rows, start))
    assert len(np.unique(assign(unit_rows, a))) == 64  # empty lists were re-seeded
