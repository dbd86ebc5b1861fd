"""K-th-NN distances of a chunk of class banks for the synthesis engine: the batched ``torch``
kernel over all classes of a chunk, or one :class:`~npos.knn.KnnIndex` per class for any
other registered backend (with the caller's :class:`~npos.knn.KnnCache`, keyed by class)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npos.knn.index import KnnIndex
from npos.knn.ivf import KnnCache
from npos.knn.kth import kth_similarity, similarity_to_distance


class TorchScorer:
    """K-th-NN distances by batched products over a chunk of classes."""

    def __init__(self, k: int, max_elements: int) -> None:
        self.k, self.max_elements = k, max_elements

    def fit(self, unit: torch.Tensor, classes: torch.Tensor) -> TorchScorer:
        """Use the (c, Q, D) unit banks of the chunk of classes ``classes``."""
        self.unit = unit
        return self

    def bank(self) -> torch.Tensor:
        """(c, Q) distance of each bank point to its K-th nearest other point."""
        sim = kth_similarity(self.unit, self.unit, self.k, exclude_self=True,
                             max_elements=self.max_elements)
        return similarity_to_distance(sim)

    def queries(self, vectors: torch.Tensor) -> torch.Tensor:
        """(c, n, D) vectors (any norm) -> (c, n) K-th-NN distance to their class bank.

        Dividing the k-th largest raw product by the query norm equals the k-th largest
        cosine (division by a positive constant preserves order), and costs n divisions
        instead of normalizing n x D values.
        """
        norms = vectors.norm(dim=-1).clamp_min_(1e-12)
        sim = kth_similarity(vectors, self.unit, self.k, max_elements=self.max_elements)
        return similarity_to_distance(sim / norms)


class IndexScorer:
    """The same distances from one :class:`KnnIndex` per class (a Python loop over classes),
    for any registered backend other than ``torch`` (e.g. faiss, for banks too large for the
    (Q, Q) products of the torch engine)."""

    def __init__(self, backend: str, k: int, cache: KnnCache | None) -> None:
        self.backend, self.k, self.cache = backend, k, cache

    def fit(self, unit: torch.Tensor, classes: torch.Tensor) -> IndexScorer:
        self.unit = unit
        self.indexes = [KnnIndex(self.backend, cache=self.cache,
                                 cache_key=("synthesize", int(c))).fit(bank)
                        for c, bank in zip(classes.tolist(), unit, strict=True)]
        return self

    def bank(self) -> torch.Tensor:
        return torch.stack([index.kth_distance(bank, self.k, exclude_self=True)
                            for index, bank in zip(self.indexes, self.unit, strict=True)])

    def queries(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.stack([index.kth_distance(v, self.k)
                            for index, v in zip(self.indexes, vectors, strict=True)])


@dataclass(frozen=True)
class Scorers:
    """Makes the scorer of each chunk of classes: the concrete backend, K and the cache."""

    backend: str
    k: int
    cache: KnnCache | None

    def fit(self, unit: torch.Tensor, classes: torch.Tensor,
            max_sims: int) -> TorchScorer | IndexScorer:
        """A scorer over the (c, Q, D) unit banks of ``classes``."""
        if self.backend == "torch":
            return TorchScorer(self.k, max_sims).fit(unit, classes)
        return IndexScorer(self.backend, self.k, self.cache).fit(unit, classes)
