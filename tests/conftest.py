"""Shared fixtures: small feature stores built from generated data (never faked embeddings
from an encoder: these are plain arrays, as a user would import them)."""

from __future__ import annotations

import numpy as np
import pytest

from npos.store import FeatureStore


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are always collected and skipped where torch sees no GPU."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in cuda_items:
        item.add_marker(skip)


def write_store(url, embeddings, labels=None, *, class_names=None, chunk_rows=64,
                dtype="float32", model="test-model", text_embeddings=None, kind="features",
                attrs=None, ids=None):
    """Create a complete store from arrays (test helper, also used by later stages' tests)."""
    embeddings = np.asarray(embeddings)
    n, d = embeddings.shape
    if labels is not None and class_names is None:
        class_names = [f"class{i}" for i in range(int(np.max(labels)) + 1)]
    store = FeatureStore.create(
        str(url), n_rows=n, dim=d, dtype=dtype, chunk_rows=chunk_rows, kind=kind,
        class_names=class_names,
        attrs={"model": model, "pretrained": None, "preprocess": None, **(attrs or {})})
    arrays = {"embeddings": embeddings.astype(dtype),
              "ids": np.asarray(ids if ids is not None else [f"row{i}" for i in range(n)])}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int32)
    store.write_all(**arrays)
    if text_embeddings is not None:
        store.set_array("text_embeddings", np.asarray(text_embeddings, dtype=np.float32))
    return store


@pytest.fixture
def make_store():
    """Factory fixture: ``make_store(url, embeddings, labels=None, **kw) -> FeatureStore``."""
    return write_store


@pytest.fixture
def rng():
    return np.random.default_rng(0)


_HOLD_LOCK = """\
import sys, time
from npos.store.lock import WriterLock
WriterLock(sys.argv[1], what=sys.argv[2], command="npos holder --test").acquire()
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture
def lock_holder():
    """``lock_holder(target, what) -> Popen``: a child process holding ``target``'s writer
    lock (command line ``npos holder --test``) until the test ends (killed then).
    ``lock_holder.refused(result, holder, what, target)`` checks that a CLI run was refused
    in one line naming the holder, with exit 2, and left no output."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    children = []

    def hold(target, what="output"):
        child = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(target), what],
                                 stdout=subprocess.PIPE, env=env)
        children.append(child)
        assert child.stdout.readline().strip() == b"held"
        return child

    def refused(result, holder, what, target):
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert (f"{what} {str(target)!r} is being written by another process "
                f"(pid {holder.pid}") in lines[0], lines[0]
        assert "npos holder --test" in lines[0]
        assert not Path(target).exists()

    hold.refused = refused
    yield hold
    for child in children:
        child.kill()
        child.wait()
        child.stdout.close()
