"""What an extraction run produced, and the checks on it: per-process statistics, the limit
on failed rows, the refusal of non-finite encoder outputs, and the checks of a store being
resumed or shared by torchrun ranks (see :mod:`npos.extract.extraction`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npos.errors import IncompatibleStoreError, NposError, StoreError
from npos.extract.datasets import ImageSource
from npos.store import FeatureStore


@dataclass
class ExtractionStats:
    """What one process did in one run.

    Attributes
    ----------
    rows : int
        Rows this process encoded (0 when every chunk was already done).
    failed : int
        Of those, rows whose image could not be read.
    chunks : int
        Chunks this process wrote.
    seconds : float
        Wall time of the encoding loop (data loading, encoding and writing).
    write_seconds : float
        Time the writer thread spent writing chunks (overlaps with encoding).
    rank, world_size : int
    store_failed : int or None
        Failed rows in the whole store (rank 0, after every rank finished).
    repaired : list of int
        Done chunks found damaged and encoded again (rank 0).
    """

    rows: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    write_seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    store_failed: int | None = None
    repaired: list[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class TooManyFailedError(NposError):
    """Every row failed, or more than ``max_failed`` of them; the store is kept."""


def tally_reasons(failed: Sequence[dict[str, str]]) -> str:
    """``"7 not an image, 5 truncated image"``: failure reasons by kind, most common first
    (the kind is the reason without its details in parentheses)."""
    counts = Counter(str(f.get("reason", "")).split(" (")[0] for f in failed)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def check_failed(store: FeatureStore, failed: Sequence[dict[str, str]],
                 max_failed: float | None) -> None:
    """Raise :class:`TooManyFailedError` when every row of ``store`` failed, or more than
    ``max_failed`` (a fraction; None: no limit) of them."""
    n, k = store.n_rows, len(failed)
    if k == 0 or (k < n and (max_failed is None or k <= max_failed * n)):
        return
    if k == n:
        head = f"all {n} images failed: {tally_reasons(failed)}"
    else:
        head = (f"{k} of {n} images failed ({k / n:.1%}, more than --max-failed "
                f"{max_failed:g}): {tally_reasons(failed)}")
    raise TooManyFailedError(
        f"{head}; the store {store.url!r} is kept (list them with 'npos store info "
        f"{store.url} --failed'; fix the files and re-run with --overwrite, or accept them "
        "with a larger --max-failed)")


def _check_finite(index: int, arrays: dict[str, np.ndarray]) -> None:
    """Refuse a chunk whose valid rows hold NaN/Inf embeddings or tokens (before writing)."""
    for name, what in (("embeddings", "embeddings"), ("tokens", "token rows")):
        if name not in arrays:
            continue
        values = arrays[name][arrays["valid"]]
        # an explicit row width: numpy cannot infer -1 for a chunk without valid rows
        finite = np.isfinite(values.reshape(len(values), math.prod(values.shape[1:]))).all(1)
        if not finite.all():
            hint = (" (float16 overflow: use --dtype float32)"
                    if name == "embeddings" and values.dtype == np.float16 else "")
            raise StoreError(f"the encoder produced {int((~finite).sum())} non-finite {what} "
                             f"in chunk {index}{hint}")


def _checked_text_embeddings(text: np.ndarray) -> np.ndarray:
    """``text`` (C, D), refused when a class's text embedding holds NaN/Inf."""
    finite = np.isfinite(text).all(axis=1)
    if not finite.all():
        raise StoreError(f"the text encoder produced non-finite embeddings for "
                         f"{int((~finite).sum())} of {len(text)} classes")
    return text


def _text_embeddings_ok(store: FeatureStore, n_classes: int, dim: int) -> bool:
    # A run killed while writing them leaves fill values (zeros) behind: recompute then.
    if not store.has("text_embeddings") or store.lost_chunks("text_embeddings"):
        return False
    text = store.read_extra("text_embeddings", dtype="float32")
    return text.shape == (n_classes, dim) and np.allclose(np.linalg.norm(text, axis=1), 1.0,
                                                          atol=1e-3)


def _check_same_run(store: FeatureStore, attrs: dict[str, Any], source: ImageSource) -> None:
    """On ranks > 0: the store rank 0 prepared must be the one this rank would have made."""
    mine = {"model": attrs["model"], "pretrained": attrs["pretrained"],
            "seed": attrs["seed"], "token_layer": attrs["token_layer"],
            "files": len(source), "fingerprint": source.fingerprint()}
    theirs = {**{k: store.attrs.get(k) for k in ("model", "pretrained", "seed", "token_layer")},
              "files": store.attrs["source"]["files"],
              "fingerprint": store.attrs["source"]["fingerprint"]}
    for key, value in mine.items():
        if theirs[key] != value:
            raise IncompatibleStoreError(
                f"this rank sees {key}={value!r} but rank 0 made {store.url!r} with "
                f"{key}={theirs[key]!r} (do all nodes see the same files and options?)")
