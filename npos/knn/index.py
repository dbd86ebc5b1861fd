"""`KnnIndex`: nearest neighbours of L2-normalized vectors through any registered backend.

See :mod:`npos.knn` for the metric, the backends and the ``auto`` policy.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from npos.errors import ParameterError
from npos.knn import get_backend, resolve_knn_backend
from npos.knn.backends import DEFAULT_TARGET_RECALL, RECALL_SAMPLE, KnnBackend, recall_at_k
from npos.knn.ivf import KnnCache
from npos.knn.kth import DEFAULT_MEMORY_BUDGET
from npos.validation import check_float, check_int


def _as_unit_tensor(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """(N, D) numpy/torch -> float32 unit rows (a new tensor)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ParameterError(f"{name} must have shape (rows, dim) with rows, dim >= 1; "
                             f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ParameterError(f"{name} must be floating point; got {t.dtype}")
    t = t.detach().to(device=device if device is not None else t.device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ParameterError(f"{name} contains NaN or Inf values")
    return F.normalize(t, dim=-1)


def _like(reference: Any, value: torch.Tensor) -> Any:
    """Return ``value`` as numpy when ``reference`` is not a tensor, else on its device."""
    if isinstance(reference, torch.Tensor):
        return value.to(reference.device)
    return value.cpu().numpy()


class KnnIndex:
    """Nearest neighbours of L2-normalized vectors: ``KnnIndex(backend).fit(bank).search(q, k)``.

    Parameters
    ----------
    backend : str
        ``"auto"`` (see :func:`npos.knn.resolve_knn_backend`) or a registered name:
        ``"torch"``, ``"faiss-flat"``, ``"faiss-ivf"``, or one added with
        :func:`npos.knn.register_backend`.
    nlist : int, optional
        IVF lists (``faiss-ivf``); default :func:`~npos.knn.ivf.ivf_nlist` of the bank size.
    nprobe : int, optional
        IVF lists probed per query; default: tuned per k for ``target_recall``.
    device : str or torch.device, optional
        ``torch``: where the bank lives (default: the bank's device). faiss: ``"cpu"`` keeps the
        index on the CPU; otherwise it goes to all GPUs when faiss sees any.
    target_recall : float
        Recall@k the nprobe tuning aims for.
    seed : int
        Seeds the IVF training sample and the recall sample.
    memory_budget : int
        Bytes of similarity block the ``torch`` backend holds at once.
    cache : KnnCache, optional
        Keeps what a backend learns (trained IVF lists, tuned nprobe) for later fits of
        banks of the same shape; owned by the caller.
    cache_key : hashable, optional
        Separates banks sharing one cache (e.g. the class id).

    Attributes
    ----------
    backend_ : str
        The concrete backend after ``fit``.
    n_, dim_ : int
        Bank size and dimension.
    nlist_ : int or None
        IVF lists (``faiss-ivf``).
    nprobe_ : dict[int, int]
        nprobe used for each k searched so far (``faiss-ivf``).
    recall_ : dict[int, float]
        Measured recall@k behind each tuned nprobe (``faiss-ivf``).
    on_gpu_ : bool
        The index lives on GPU(s).
    """

    def __init__(self, backend: str = "auto", *, nlist: int | None = None,
                 nprobe: int | None = None, device: str | torch.device | None = None,
                 target_recall: float = DEFAULT_TARGET_RECALL, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, cache: KnnCache | None = None,
                 cache_key: Hashable = None) -> None:
        self.backend = backend
        self.nlist = nlist
        self.nprobe = nprobe
        self.device = device
        self.target_recall = target_recall
        self.seed = seed
        self.memory_budget = memory_budget
        self.cache = cache
        self.cache_key = cache_key

    # ------------------------------------------------------------------ fitting
    def _validate(self) -> None:
        resolve_knn_backend(self.backend, 1)
        for name in ("nlist", "nprobe"):
            check_int(name, getattr(self, name), 1, allow_none=True)
        check_float("target_recall", self.target_recall, 0.0, 1.0, low_open=True)
        if self.cache is not None and not isinstance(self.cache, KnnCache):
            raise ParameterError(f"cache must be a KnnCache or None; got "
                                 f"{type(self.cache).__name__}")

    def fit(self, bank: Any) -> KnnIndex:
        """Index ``bank`` of shape (N, D) (numpy or torch; normalized here). Returns self."""
        self._validate()
        on_gpu = isinstance(bank, torch.Tensor) and bank.device.type == "cuda"
        self.device_ = torch.device(self.device) if self.device is not None else None
        unit = _as_unit_tensor(bank, "bank", self.device_)
        self.n_, self.dim_ = unit.shape
        asks_gpu = self.device_ is not None and self.device_.type == "cuda"
        self.backend_ = resolve_knn_backend(self.backend, self.n_, on_gpu=on_gpu or asks_gpu)
        impl: KnnBackend = get_backend(self.backend_)(self)
        impl.fit(unit)
        self._impl = impl
        self.on_gpu_ = impl.on_gpu
        self.nlist_ = getattr(impl, "nlist", None)
        self.nprobe_ = getattr(impl, "nprobe_", {})
        self.recall_ = getattr(impl, "recall_", {})
        return self

    def _check_fitted(self, queries: Any) -> torch.Tensor:
        if not hasattr(self, "_impl"):
            raise ParameterError("this KnnIndex is not fitted yet; call fit(bank) first")
        unit = _as_unit_tensor(queries, "queries", self._impl.query_device)
        if unit.shape[1] != self.dim_:
            raise ParameterError(
                f"queries have dimension {unit.shape[1]} but the index was fitted on "
                f"dimension {self.dim_}")
        return unit

    def _check_k(self, k: int, *, extra: int = 0) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
                1 <= k <= self.n_ - extra):
            why = " (k < bank size: self is excluded)" if extra else ""
            raise ParameterError(
                f"The 'k' parameter must be an int in the range [1, {self.n_ - extra}]{why}. "
                f"Got {k!r} instead.")
        self._impl.check_k(k + extra)

    # ------------------------------------------------------------------ searching
    def search(self, queries: Any, k: int) -> tuple[Any, Any]:
        """The k nearest bank points of each query.

        Parameters
        ----------
        queries : ndarray or Tensor of shape (n, D)
        k : int

        Returns
        -------
        D : shape (n, k)
            float32 Euclidean distances between normalized vectors, ascending.
        I : shape (n, k)
            int64 bank row indices (-1 where an IVF search found fewer than k points).
            numpy arrays for numpy queries, torch tensors (on the queries' device) for torch.
        """
        unit = self._check_fitted(queries)
        self._check_k(k)
        dist, ids = self._impl.search(unit, k)
        return _like(queries, dist), _like(queries, ids)

    def kth_distance(self, queries: Any, k: int, *, exclude_self: bool = False) -> Any:
        """Distance of each query to its k-th nearest bank point, shape (n,).

        With ``exclude_self`` the queries are the bank itself (same rows, same order) and a
        row never counts as its own neighbour (sklearn's ``kneighbors(X=None)``): the torch
        backend masks the diagonal; faiss backends search k + 1 and drop each row's own
        index (or the last column when an exact duplicate hid it).
        """
        unit = self._check_fitted(queries)
        if exclude_self and unit.shape[0] != self.n_:
            raise ParameterError(
                f"exclude_self needs the queries to be the bank ({self.n_} rows); got "
                f"{unit.shape[0]} rows")
        self._check_k(k, extra=int(exclude_self))
        return _like(queries, self._impl.kth_distance(unit, k, exclude_self))

    def measure_recall(self, k: int, *, queries: Any = None, sample: int = RECALL_SAMPLE,
                       nprobe: int | None = None) -> float:
        """Recall@k of this index against exact search, on at most ``sample`` query rows.

        ``queries`` default to a seeded sample of the bank itself, each row's own id left out
        (see :func:`npos.knn.backends.recall_at_k`). ``nprobe`` (``faiss-ivf``) measures at
        that nprobe instead of the configured/tuned one. Exact backends return 1.0 up to ties.
        """
        own_rows = queries is None
        unit = self._check_fitted(self._impl.bank if own_rows else queries)
        self._check_k(k, extra=int(own_rows))
        options = {"nprobe": nprobe} if nprobe is not None and self.backend_ == "faiss-ivf" else {}
        return recall_at_k(self._impl.bank, lambda u, depth: self._impl.search(
            u, depth, **options)[1], k, queries=None if own_rows else unit, sample=sample,
            seed=self.seed)

    def __repr__(self) -> str:
        fitted = (f", fitted on {self.n_}x{self.dim_} as {self.backend_!r}"
                  if hasattr(self, "backend_") else "")
        return f"KnnIndex(backend={self.backend!r}{fitted})"


def knn_kth_distance(queries: Any, bank: Any, k: int, *, backend: str = "auto",
                     exclude_self: bool = False, **index_options: Any) -> Any:
    """Distance of each query to its k-th nearest point of ``bank`` (normalized vectors).

    Parameters
    ----------
    queries : ndarray or Tensor of shape (n, D)
    bank : ndarray or Tensor of shape (N, D)
    k : int
    backend : str
        As :class:`KnnIndex`.
    exclude_self : bool
        ``queries`` is ``bank`` (same rows): a row is not its own neighbour.
    **index_options
        Passed to :class:`KnnIndex` (``nlist``, ``nprobe``, ``device``, ``cache``, ...).

    Returns
    -------
    ndarray or Tensor of shape (n,)
        Same kind as ``queries``.
    """
    index = KnnIndex(backend, **index_options).fit(bank)
    return index.kth_distance(queries, k, exclude_self=exclude_self)
