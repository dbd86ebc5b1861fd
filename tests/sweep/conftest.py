"""A small generated world (4 classes of 60 train rows, 16-d) shared by the sweep tests."""

from __future__ import annotations

import pytest

from benchmarks.feature_world import make_feature_world, write_world

SMALL = ["--id-loss", "none", "--queue", "50", "--k", "10", "--select", "20", "--pick", "2",
         "--candidates", "20", "--keep", "2", "--epochs", "2", "--device", "cpu"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """``{"train": url, "test": url, "ood/held-out": url, "ood/off-manifold": url}``."""
    w = make_feature_world(n_classes=4, n_heldout=2, dim=16, n_train=60, n_test=30)
    return write_world(w, tmp_path_factory.mktemp("world"), chunk_rows=64)


@pytest.fixture(scope="session")
def small():
    """Fixed settings (flags) small enough for the world's 60 rows per class."""
    return list(SMALL)


@pytest.fixture(scope="session")
def data(world):
    """TRAIN and the --val-id/--val-ood flags of the world."""
    return [world["train"], "--val-id", world["test"],
            "--val-ood", f"held={world['ood/held-out']}",
            "--val-ood", f"off={world['ood/off-manifold']}"]
