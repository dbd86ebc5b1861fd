"""``--holdout-classes N``: held-out classes of the training store as a near-OOD proxy.

N classes, drawn with the seed, leave training entirely and become the OOD set ``heldout``;
of the other classes a seeded ``test_fraction`` of each class's rows becomes the ID test
store. The three stores are written once into ``DIR/data/`` with the training store's
encoder fingerprint, so the sweep then needs nothing but the training cache. This is a
*proxy*: held-out classes of the same dataset are near-OOD, usually harder than real OOD sets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npos.atomic import atomic_path
from npos.errors import ParameterError
from npos.store import FeatureStore
from npos.synthesize.offline import CARRIED_ATTRS

HELDOUT = "heldout"
TEST_FRACTION = 0.2


@dataclass
class Split:
    """Store URLs of a sweep's data: training store, ID test store, OOD stores by name."""

    train: str
    test: str
    ood: dict[str, str]


def check_holdout(store: FeatureStore, n: int) -> None:
    """At least 2 ID classes must remain; raise :class:`ParameterError` otherwise."""
    labels = store.read("labels")
    present = np.unique(labels[labels >= 0])
    if n < 1:
        raise ParameterError(f"--holdout-classes must be >= 1; got {n}")
    if len(present) - n < 2:
        raise ParameterError(f"--holdout-classes {n}: {store.url!r} has {len(present)} labelled "
                             "classes and at least 2 must stay in-distribution")


def holdout_split(train: str, n: int, *, seed: int, out_dir: str | os.PathLike,
                  test_fraction: float = TEST_FRACTION) -> Split:
    """Write (or reuse) ``out_dir/data/{train,test,heldout}.zarr`` for ``n`` held-out classes.

    Returns the :class:`Split`. A previous split of the same store, ``n`` and seed is reused
    (``data/split.json`` records them); another one is an error.
    """
    data = Path(out_dir) / "data"
    urls = Split(str(data / "train.zarr"), str(data / "test.zarr"),
                 {HELDOUT: str(data / "heldout.zarr")})
    record = {"train": str(train), "holdout_classes": n, "seed": seed,
              "test_fraction": test_fraction}
    marker = data / "split.json"
    if marker.exists():
        if json.loads(marker.read_text()) != record:
            raise ParameterError(f"{str(data)!r} holds another split ({marker.read_text()}); "
                                 "use another --out or --overwrite")
        return urls
    source = FeatureStore.open(train)
    check_holdout(source, n)
    labels = source.read("labels").astype(np.int64)
    x = source.read("embeddings", dtype="float32")
    ids = source.read("ids")
    rng = np.random.default_rng(seed)
    present = np.unique(labels[labels >= 0])
    held = np.sort(rng.choice(present, size=n, replace=False))
    kept = np.setdiff1d(present, held)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in kept:
        rows = np.flatnonzero(labels == c)
        test_mask[rng.choice(rows, size=max(1, int(len(rows) * test_fraction)),
                             replace=False)] = True
    remap = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    names = source.class_names or [f"class{c}" for c in range(len(remap))]
    text = source.read_extra("text_embeddings") if source.has("text_embeddings") else None
    data.mkdir(parents=True, exist_ok=True)
    train_mask = np.isin(labels, kept) & ~test_mask
    for url, mask, labelled in ((urls.train, train_mask, True), (urls.test, test_mask, True),
                                (urls.ood[HELDOUT], np.isin(labels, held), False)):
        _write(url, source, x[mask], remap[labels[mask]] if labelled else None, ids[mask],
               [names[c] for c in kept] if labelled else None,
               text[kept] if labelled and text is not None else None, record)
    with atomic_path(marker, overwrite=True, directory=False, what="split record") as tmp:
        tmp.write_text(json.dumps(record))
    return urls


def _write(url, source, x, labels, ids, class_names, text, record) -> None:
    # overwrite: a store left by an interrupted split (no split.json yet) is made again
    store = FeatureStore.create(
        url, n_rows=len(x), dim=x.shape[1], dtype="float32", chunk_rows=source.chunk_rows,
        class_names=class_names, overwrite=True,
        attrs={**{k: source.attrs[k] for k in CARRIED_ATTRS if k in source.attrs},
               "source": {"sweep_holdout": record}})
    arrays = {"embeddings": x, "ids": ids}
    if labels is not None:
        arrays["labels"] = labels
    store.write_all(**arrays)
    if text is not None:
        store.set_array("text_embeddings", np.asarray(text, dtype=np.float32))
    store.close()
