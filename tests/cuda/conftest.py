"""Fixtures of the CUDA tests: generated feature worlds, image folders and token stores.

Every test here is marked ``cuda``: always collected, skipped where torch sees no GPU (the
hook is in ``tests/conftest.py``). Run them with ``pytest -m cuda``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npos

REPO_ROOT = Path(npos.__file__).resolve().parents[1]
#: Extraction settings: tiny random-init model, float32 storage, no worker processes.
TINY = {"model": "npos-tiny", "dtype": "float32", "workers": 0, "progress": False}


def write_images(root: Path, per_class: int = 8, *, seed: int = 0,
                 classes=("red", "green", "blue")) -> Path:
    """Noisy images whose dominant colour channel is the class, as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.full((40, 48, 3), 90.0)
            base[..., c % 3] = 220
            pixels = np.clip(base + rng.normal(0, 35, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 8 generated images."""
    return write_images(tmp_path_factory.mktemp("cuda-images") / "data")


@pytest.fixture
def child_env():
    """``child_env(**extra)``: environment for subprocesses importing this checkout."""
    def make(**extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]
                                            ).rstrip(os.pathsep)
        env.update(extra)
        return env
    return make


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def feature_world(tmp_path_factory):
    """Labeled train/test stores (6 classes around their text embeddings, D=32) and an
    unlabeled far-OOD store. Returns ``{"train", "test", "ood"} -> url``."""
    from npos.store import FeatureStore

    rng = np.random.default_rng(0)
    n_classes, dim = 6, 32
    text = rng.normal(size=(n_classes, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    root = tmp_path_factory.mktemp("cuda-world")
    names = [f"c{i}" for i in range(n_classes)]

    def write(name, z, y=None):
        store = FeatureStore.create(str(root / f"{name}.zarr"), n_rows=len(z), dim=dim,
                                    chunk_rows=128, class_names=names if y is not None else None,
                                    attrs={"model": "gen", "pretrained": None,
                                           "preprocess": None})
        arrays = {"embeddings": z.astype(np.float32),
                  "ids": np.array([f"{name}/{i}" for i in range(len(z))])}
        if y is not None:
            arrays["labels"] = y.astype(np.int32)
        store.write_all(**arrays)
        store.set_array("text_embeddings", text.astype(np.float32))
        return store.url

    def id_rows(n):
        y = rng.integers(0, n_classes, n)
        return 3 * text[y] + 0.6 * rng.normal(size=(n, dim)), y

    return {"train": write("train", *id_rows(1200)), "test": write("test", *id_rows(300)),
            "ood": write("ood", rng.normal(size=(200, dim)))}


@pytest.fixture(scope="session")
def token_store(tmp_path_factory, image_folder):
    """A CPU-extracted npos-tiny store with tokens after block 1 (16 images per class)."""
    from npos.extract import extract_features

    root = tmp_path_factory.mktemp("cuda-tokens")
    data = write_images(root / "data", 16, seed=3)
    extract_features(str(data), str(root / "tokens.zarr"), tokens_layer=1, chunk_rows=16,
                     batch_size=16, templates=["a photo of a {}."], **TINY)
    return str(root / "tokens.zarr")
