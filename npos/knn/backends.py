"""The kNN backend interface and the exact backends (``torch``, ``faiss-flat``).

A backend finds nearest neighbours among **unit** vectors; :class:`~npos.knn.KnnIndex`
validates and normalizes its inputs, checks ``k``, and converts results back to numpy or torch,
so a backend only implements :meth:`KnnBackend.fit` and :meth:`KnnBackend.search` on float32
torch tensors (and may override :meth:`KnnBackend.kth_distance` when it has a faster way).
Register a new one with :func:`npos.knn.register_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from npos.errors import MissingDependencyError, ParameterError
from npos.knn import faiss_gpus, import_faiss
from npos.knn.kth import kth_similarity, similarity_to_distance

if TYPE_CHECKING:
    from npos.knn.index import KnnIndex

DEFAULT_TARGET_RECALL = 0.95
#: Bank points used as queries when tuning nprobe / measuring recall.
RECALL_SAMPLE = 256
#: faiss GPU indexes return at most this many neighbours (and probe at most this many lists).
FAISS_GPU_MAX_K = 2048


class KnnBackend:
    """One way of searching a bank of unit vectors; subclass it to add a backend.

    Parameters
    ----------
    options : KnnIndex
        The index the backend serves: its ``device``, ``seed``, ``memory_budget``, ``nlist``,
        ``nprobe``, ``target_recall``, ``cache`` and ``cache_key`` are the options.

    Attributes
    ----------
    bank : Tensor of shape (N, D)
        The unit bank after :meth:`fit` (kept for recall measurements).
    on_gpu : bool
        The searchable structure lives on GPU(s).
    """

    bank: torch.Tensor

    def __init__(self, options: KnnIndex) -> None:
        self.options = options
        self.on_gpu = False

    @property
    def query_device(self) -> torch.device:
        """Where :meth:`search` wants its queries (the CPU unless overridden)."""
        return torch.device("cpu")

    def fit(self, unit: torch.Tensor) -> None:
        """Index the (N, D) float32 unit rows ``unit``."""
        raise NotImplementedError

    def search(self, unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) float32 distances, ascending, and int64 bank ids (-1 where fewer than k
        points were found; distance +inf there) of the unit queries ``unit``."""
        raise NotImplementedError

    def check_k(self, k: int) -> None:
        """Refuse a search depth the backend cannot serve (``k`` includes the extra self
        neighbour of ``exclude_self``). The index already checked ``1 <= k <= N``."""

    def kth_distance(self, unit: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
        """(n,) distance to the k-th nearest bank point.

        With ``exclude_self`` (the queries are the bank, same order) search k + 1 and drop each
        row's own index, or the last column when an exact duplicate hid it.
        """
        if not exclude_self:
            return self.search(unit, k)[0][:, k - 1]
        dist, ids = self.search(unit, k + 1)
        own = ids == torch.arange(unit.shape[0], device=ids.device)[:, None]
        # self among the first k results -> the k-th other is column k; else column k-1
        self_early = own[:, :k].any(dim=1)
        return torch.where(self_early, dist[:, k], dist[:, k - 1])


class TorchBackend(KnnBackend):
    """Exact search by row blocks of ``queries @ bank.T`` on the bank's device (CPU or GPU);
    the block size keeps the similarity block under ``memory_budget`` bytes."""

    @property
    def query_device(self) -> torch.device:
        return self.bank.device

    def fit(self, unit: torch.Tensor) -> None:
        self.bank = unit
        self.on_gpu = unit.device.type == "cuda"

    def _rows_per_block(self) -> int:
        return max(1, self.options.memory_budget // (4 * self.bank.shape[0]))

    def search(self, unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        dists, ids = [], []
        rows = self._rows_per_block()
        for start in range(0, unit.shape[0], rows):
            sims, idx = (unit[start:start + rows] @ self.bank.T).topk(k, dim=1)
            dists.append(similarity_to_distance(sims))
            ids.append(idx)
        return torch.cat(dists), torch.cat(ids)

    def kth_distance(self, unit: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
        # The synthesis engine's kernel with one "class": an in-place k-th-value select.
        sim = kth_similarity(unit[None], self.bank[None], k, exclude_self=exclude_self,
                             max_elements=self.options.memory_budget // 4)
        return similarity_to_distance(sim[0])


class FaissBackend(KnnBackend):
    """Shared parts of the faiss backends: CPU build, then all GPUs when faiss sees any
    (``index_cpu_to_all_gpus`` shards/replicates) unless ``device="cpu"``."""

    index: Any

    def make_index(self, data: np.ndarray) -> Any:
        """A filled CPU faiss index of the (N, D) float32 rows ``data``."""
        raise NotImplementedError

    def fit(self, unit: torch.Tensor) -> None:
        faiss = import_faiss(f"backend {self.options.backend_!r}")
        self.bank = unit.cpu()  # kept for recall measurements
        index = self.make_index(np.ascontiguousarray(self.bank.numpy()))
        device = self.options.device_
        if (device is None or device.type != "cpu") and faiss_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
            self.on_gpu = True
        elif device is not None and device.type == "cuda":
            raise MissingDependencyError(
                f"device={str(device)!r} with backend {self.options.backend_!r} needs a GPU "
                'build of faiss; install it with: pip install "npos[gpu]"')
        self.index = index

    def check_k(self, k: int) -> None:
        if self.on_gpu and k > FAISS_GPU_MAX_K:
            raise ParameterError(
                f"faiss GPU indexes return at most {FAISS_GPU_MAX_K} neighbours; got "
                f"k={k} (use backend 'torch' or device='cpu')")

    def search(self, unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        d2, ids = self.index.search(np.ascontiguousarray(unit.cpu().numpy()), k)
        # Lists too short to hold k points leave id -1 (distance +inf).
        dist = torch.from_numpy(np.sqrt(np.clip(d2, 0.0, None)))
        dist[torch.from_numpy(ids < 0)] = float("inf")
        return dist, torch.from_numpy(ids)


class FaissFlatBackend(FaissBackend):
    """Exact ``IndexFlatL2``."""

    def make_index(self, data: np.ndarray) -> Any:
        import faiss

        index = faiss.IndexFlatL2(data.shape[1])
        index.add(data)
        return index


def recall_at_k(bank: torch.Tensor, search_ids: Callable[[torch.Tensor, int], torch.Tensor],
                k: int, *, queries: torch.Tensor | None = None, sample: int = RECALL_SAMPLE,
                seed: int = 0) -> float:
    """Recall@k of ``search_ids(unit_queries, depth) -> (n, depth) ids`` against exact search.

    Recall@k is the mean fraction of each query's exact k nearest ids that the search returns.
    ``queries`` (unit rows) default to a seeded sample of at most ``sample`` bank rows; then
    each row's own id is left out of both lists (k + 1 neighbours are searched), because
    finding a point itself is free and would flatter the estimate for unseen queries.
    """
    own_rows = queries is None
    unit = bank if queries is None else queries
    rows = torch.arange(unit.shape[0])
    if unit.shape[0] > sample:
        rows = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(
            unit.shape[0], sample, replace=False)))
        unit = unit[rows.to(unit.device)]
    depth = k + int(own_rows)
    exact = (unit.to(bank.device) @ bank.T).topk(depth, dim=1).indices.cpu()
    found = search_ids(unit, depth).cpu()
    wanted = exact != rows[:, None] if own_rows else torch.ones_like(exact, dtype=torch.bool)
    hits = (exact.unsqueeze(2) == found.unsqueeze(1)).any(dim=2) & wanted
    return float(hits.sum() / wanted.sum())
