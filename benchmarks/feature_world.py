"""A generated feature benchmark whose classes are *not* Gaussian.

Used by the tests, ``benchmarks.head_study`` and ``benchmarks.train_head`` (not part of the
installed package: it lives with the benchmarks, see ``benchmarks/__init__.py``). It imitates
the properties of CLIP image embeddings that matter for outlier synthesis, without claiming
to be CLIP:

* **crowded in a low-dimensional subspace**: every class lives near a common mean direction
  (a narrow cone) inside a ``subspace``-dimensional subspace of the D-dimensional space, with
  a little isotropic noise in all D dimensions;
* **curved, multi-modal classes**: a class is a bent arc (a piece of a circle through its
  centre direction) with two or three modes along it, thickened by small noise — a shape a
  single Gaussian fits badly;
* **raw norms that vary like CLIP's** (about 10 ± 1, independent of the class), so methods
  must cope with un-normalized vectors;
* **text embeddings** offset by a shared "modality gap" vector, as CLIP's are, so their
  cosine with images is low but their argmax still classifies.

OOD sets: ``held-out`` — classes drawn from the same family but never seen in training
(near-OOD); ``off-manifold`` — test ID points pushed off their class's arc within the
subspace (between and beside the classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class FeatureWorld:
    """Arrays of one generated benchmark (all float32 raw embeddings of dim D).

    Attributes
    ----------
    train, test : ndarray of shape (N, D)
    train_labels, test_labels : ndarray of shape (N,)
    ood : dict of str -> ndarray of shape (M, D)
    text_embeddings : ndarray of shape (C, D)
    class_names : list of str
    """

    train: np.ndarray
    train_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    ood: dict[str, np.ndarray]
    text_embeddings: np.ndarray
    class_names: list[str]


def _orthonormal(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((dim, rows)))
    return q.T  # (rows, dim), orthonormal rows


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _ClassShape:
    """One class: an arc ``centre + r (sin t · a + (1 - cos t) · b)`` with a few modes."""

    def __init__(self, rng: np.random.Generator, cone: np.ndarray, spread: float,
                 radius: float, thickness: float) -> None:
        d = cone.shape[0]
        self.centre = _unit(cone + spread * rng.standard_normal(d) / np.sqrt(d))
        basis = rng.standard_normal((2, d))
        basis -= np.outer(basis @ self.centre, self.centre)
        basis = np.linalg.qr(basis.T)[0].T
        self.a, self.b = basis
        self.radius = radius * rng.uniform(0.7, 1.3)
        self.modes = rng.uniform(-1.2, 1.2, size=rng.integers(2, 4))
        self.thickness = thickness

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        t = rng.choice(self.modes, size=n) + 0.2 * rng.standard_normal(n)
        arc = self.radius * (np.sin(t)[:, None] * self.a + (1 - np.cos(t))[:, None] * self.b)
        noise = self.thickness * rng.standard_normal((n, self.centre.shape[0]))
        return self.centre + arc + noise

    def span(self) -> np.ndarray:
        return np.stack([self.centre, self.a, self.b])


def make_feature_world(*, n_classes: int = 10, n_heldout: int = 5, dim: int = 64,
                       subspace: int = 12, n_train: int = 200, n_test: int = 100,
                       n_off_manifold: int | None = None, spread: float = 0.8,
                       radius: float = 0.5, thickness: float = 0.1,
                       ambient_noise: float = 0.5, push: float = 0.35,
                       seed: int = 0) -> FeatureWorld:
    """Generate a benchmark.

    Parameters
    ----------
    n_classes, n_heldout : int
        ID classes and held-out (OOD) classes of the same family.
    dim, subspace : int
        Embedding dimension D and the dimension of the subspace the classes crowd into.
    n_train, n_test : int
        Rows per ID class in the train and test splits (and per held-out class).
    n_off_manifold : int, optional
        Rows of the ``off-manifold`` set (default: as many as the ID test split).
    spread : float
        How far class centres scatter around the common cone direction (smaller = more
        crowded, harder).
    radius, thickness : float
        Size of a class's arc and its thickness (relative to unit vectors).
    ambient_noise : float
        Norm of the isotropic noise in all D dimensions (relative).
    push : float
        How far ``off-manifold`` points are moved off their class, relative.
    seed : int

    Returns
    -------
    FeatureWorld
    """
    rng = np.random.default_rng(seed)
    basis = _orthonormal(rng, subspace, dim)  # (d, D)
    cone = _unit(rng.standard_normal(subspace))
    shapes = [_ClassShape(rng, cone, spread, radius, thickness)
              for _ in range(n_classes + n_heldout)]
    gap = _unit(rng.standard_normal(dim))

    def embed(points_sub: np.ndarray) -> np.ndarray:
        """Subspace points -> raw D-dim embeddings with ambient noise and CLIP-like norms."""
        n = points_sub.shape[0]
        x = _unit(points_sub) @ basis
        x = _unit(x + ambient_noise * rng.standard_normal((n, dim)) / np.sqrt(dim))
        norms = np.clip(rng.normal(10.0, 1.0, size=(n, 1)), 6.0, 14.0)
        return (x * norms).astype(np.float32)

    def split(n: int, classes: range) -> tuple[np.ndarray, np.ndarray]:
        pts = np.concatenate([shapes[c].sample(rng, n) for c in classes])
        return pts, np.repeat(np.arange(len(classes)), n)

    train_sub, train_y = split(n_train, range(n_classes))
    test_sub, test_y = split(n_test, range(n_classes))
    held_sub, _ = split(n_test, range(n_classes, n_classes + n_heldout))

    # Off-manifold: move test points along a random direction of the subspace orthogonal
    # to their class's arc plane and centre, so they leave the class but stay in the cone.
    n_off = test_sub.shape[0] if n_off_manifold is None else n_off_manifold
    pick = rng.choice(test_sub.shape[0], size=n_off, replace=n_off > test_sub.shape[0])
    off = []
    for i in pick:
        span = shapes[test_y[i]].span()
        v = rng.standard_normal(subspace)
        v -= span.T @ np.linalg.lstsq(span.T, v, rcond=None)[0]
        off.append(_unit(test_sub[i]) + push * _unit(v))
    off_sub = np.stack(off)

    text = np.stack([_unit(shapes[c].centre + 0.05 * rng.standard_normal(subspace))
                     for c in range(n_classes)]) @ basis
    text = _unit(text + 1.2 * gap).astype(np.float32)
    return FeatureWorld(
        train=embed(train_sub), train_labels=train_y.astype(np.int32),
        test=embed(test_sub), test_labels=test_y.astype(np.int32),
        ood={"held-out": embed(held_sub), "off-manifold": embed(off_sub)},
        text_embeddings=text, class_names=[f"class{c}" for c in range(n_classes)])


def write_world(world: FeatureWorld, root: str | Path, *, model: str = "generated-world",
                text: bool = True, dtype: str = "float32", chunk_rows: int = 4096,
                overwrite: bool = False) -> dict[str, str]:
    """Write a world's splits as feature stores under ``root``.

    Returns
    -------
    dict
        ``{"train": url, "test": url, "ood/<name>": url, ...}``. ID stores carry labels and
        class names (and ``text_embeddings`` when ``text``); OOD stores are unlabeled.
    """
    from npos.store import FeatureStore

    root = Path(root)
    urls: dict[str, str] = {}
    parts = {"train": (world.train, world.train_labels), "test": (world.test, world.test_labels),
             **{f"ood/{name}": (x, None) for name, x in world.ood.items()}}
    for name, (x, y) in parts.items():
        url = str(root / f"{name.replace('/', '-')}.zarr")
        store = FeatureStore.create(
            url, n_rows=x.shape[0], dim=x.shape[1], dtype=dtype, chunk_rows=chunk_rows,
            class_names=world.class_names if y is not None else None,
            attrs={"model": model, "pretrained": None, "preprocess": None,
                   "source": {"generator": "benchmarks.feature_world"}},
            overwrite=overwrite)
        arrays = {"embeddings": x, "ids": np.asarray([f"{name}/{i}" for i in range(len(x))])}
        if y is not None:
            arrays["labels"] = y
        store.write_all(**arrays)
        if y is not None and text:
            store.set_array("text_embeddings", world.text_embeddings)
        urls[name] = url
    return urls


def random_trained_head(dim, n_classes, *, head="rbf", fingerprint, seed=0):
    """An untrained :class:`TrainedHead` (identity projection) with random centres/weights:
    a head of a given size for scoring benchmarks and tests, without training one."""
    import torch

    from npos.train_head.checkpoint import TrainedHead

    config = {"num_classes": n_classes, "dim": dim, "projection": "linear", "head": head,
              "temperature": 0.07, "classifier_trainable": False, "head_hidden": 32,
              "rbf_centres": 4, "fingerprint": dict(fingerprint),
              "class_names": [f"c{i}" for i in range(n_classes)]}
    model = TrainedHead(config, "<test>")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(n_classes, dim, generator=g))
        if head == "rbf":
            model.head.centres.copy_(torch.randn(n_classes * 4, dim, generator=g))
    return model.eval()
