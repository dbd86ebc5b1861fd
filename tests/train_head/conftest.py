"""Fixtures of the train-head tests: a small generated feature world written as stores."""

from __future__ import annotations

import pytest

from benchmarks.feature_world import make_feature_world, write_world


@pytest.fixture(scope="session")
def world():
    """8 ID classes (150 train / 60 test rows each), 4 held-out classes, D=64."""
    return make_feature_world(n_classes=8, n_heldout=4, dim=64, subspace=12, n_train=150,
                              n_test=60, seed=0)


@pytest.fixture(scope="session")
def world_stores(world, tmp_path_factory):
    """The world as stores: {"train", "test", "ood/held-out", "ood/off-manifold"} -> url."""
    return write_world(world, tmp_path_factory.mktemp("world"), chunk_rows=256)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tests use tiny matrices, for which intra-op threads only add synchronization:
    on a 2-core box they ran ~10x slower with 2 threads than with 1 (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
