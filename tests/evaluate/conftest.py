"""Fixtures for the evaluate stage: a small generated world of ID/OOD stores."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def arrays():
    """Generated embeddings: 4 classes around their text embeddings (dim 16), a far OOD set
    (pure noise) and a near one (around class 0's text embedding)."""
    rng = np.random.default_rng(1)
    n_classes, dim = 4, 16
    text = rng.normal(size=(n_classes, dim))

    def id_rows(n):
        y = rng.integers(0, n_classes, n)
        return text[y] * 2 + rng.normal(size=(n, dim)), y

    z_train, y_train = id_rows(400)
    z_test, y_test = id_rows(150)
    return {"text": text, "z_train": z_train, "y_train": y_train, "z_test": z_test,
            "y_test": y_test, "z_far": rng.normal(size=(120, dim)),
            "z_near": rng.normal(size=(90, dim)) + text[0]}


@pytest.fixture
def world(tmp_path, make_store, arrays):
    """:func:`arrays` written as stores (several chunks each): ``train`` and ``test``
    (labeled, with text embeddings), ``far`` and ``near`` (unlabeled, no text).

    Returns the arrays plus the store paths under those names and ``tmp``.
    """
    paths = {name: str(tmp_path / f"{name}.zarr") for name in ("train", "test", "far", "near")}
    names = [f"c{i}" for i in range(len(arrays["text"]))]
    make_store(paths["train"], arrays["z_train"], arrays["y_train"], class_names=names,
               text_embeddings=arrays["text"], chunk_rows=64)
    make_store(paths["test"], arrays["z_test"], arrays["y_test"], class_names=names,
               text_embeddings=arrays["text"], chunk_rows=32)
    make_store(paths["far"], arrays["z_far"], chunk_rows=50)
    make_store(paths["near"], arrays["z_near"], chunk_rows=50)
    return {**arrays, **paths, "tmp": tmp_path}


class ContractHead:
    """A test double with the ``TrainedHead`` interface (project / logits / ood_logit /
    score / config), so head-space scoring is testable with known weights.

    ``project(z) = z @ A``; ``logits = cos(h, w_c) / temperature``; ``ood_logit = h @ v``.
    """

    def __init__(self, dim, n_classes, *, fingerprint, temperature=0.07, seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.A = torch.eye(dim) + 0.3 * torch.randn(dim, dim, generator=g)
        self.W = torch.randn(n_classes, dim, generator=g)
        self.v = torch.randn(dim, generator=g)
        self.config = {"temperature": temperature, "fingerprint": dict(fingerprint),
                       "class_names": [f"c{i}" for i in range(n_classes)]}

    def to(self, device):
        return self

    def eval(self):
        return self

    def project(self, z):
        return z @ self.A

    def logits(self, z):
        import torch.nn.functional as F

        h = F.normalize(self.project(z), dim=1)
        return h @ F.normalize(self.W, dim=1).T / self.config["temperature"]

    def ood_logit(self, z):
        return self.project(z) @ self.v

    def score(self, z, *, batch_size=65536):
        return {"h": self.project(z), "logits": self.logits(z), "ood_logit": self.ood_logit(z)}


@pytest.fixture
def contract_head():
    return ContractHead
