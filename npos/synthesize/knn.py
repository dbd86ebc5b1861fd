"""k-nearest-neighbour backends behind one small interface, for synthesis and KNN scoring.

Metric: Euclidean distance between **L2-normalized** vectors (not squared), ascending; bank
and queries are normalized inside, so raw embeddings can be passed. ``search`` returns
``(D, I)`` of shape (n_queries, k), numpy in -> numpy out, torch in -> torch out.

Backends:

* ``torch``: exact; row blocks of ``queries @ bank.T`` (bounded memory) then top-k, or for
  :meth:`KnnIndex.kth_distance` an in-place k-th-value select. CPU or GPU (the bank's
  device).
* ``faiss-flat``: exact ``IndexFlatL2``.
* ``faiss-ivf``: approximate ``IndexIVFFlat``. Sized in the spirit of autofaiss: ``nlist``
  is ``4 sqrt(N)`` rounded to a power of two, capped so every list has ~100 training points
  (:func:`ivf_nlist`); trained on a seeded sample of at most 256 points per list. Unless
  ``nprobe`` is given, the first search for a given k tunes it: nprobe doubles from a
  start where the probed lists hold ~2k points until recall@k against exact search on a
  seeded sample of bank points reaches ``target_recall``; the measured recall is kept in
  ``recall_[k]``.
* ``auto``: ``torch`` up to :data:`AUTO_TORCH_MAX` bank points (or when faiss is missing, or
  for banks already on a GPU without faiss GPU support), ``faiss-flat`` up to
  :data:`AUTO_EXACT_MAX`, ``faiss-ivf`` beyond.

faiss indexes go to the GPU(s) when ``faiss.get_num_gpus() > 0`` (``index_cpu_to_all_gpus``
shards/replicates over every visible GPU) unless ``device="cpu"``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from npos.errors import MissingDependencyError, ParameterError
from npos.synthesize._kth import DEFAULT_MEMORY_BUDGET, kth_largest_, similarity_to_distance
from npos.validation import check_float, check_int

KNN_BACKENDS = ("auto", "torch", "faiss-flat", "faiss-ivf")
#: ``auto`` chooses exact torch search up to this many bank points.
AUTO_TORCH_MAX = 20_000
#: ... exact faiss search up to this many, and IVF beyond.
AUTO_EXACT_MAX = 1_000_000
#: Least number of training points per IVF list.
IVF_MIN_POINTS_PER_LIST = 100
#: faiss k-means samples at most this many points per list.
IVF_MAX_POINTS_PER_LIST = 256
DEFAULT_TARGET_RECALL = 0.95
#: Bank points used as queries when tuning nprobe / measuring recall.
RECALL_SAMPLE = 256
#: faiss GPU indexes return at most this many neighbours (and probe at most this many lists).
FAISS_GPU_MAX_K = 2048

_INSTALL_HINT = ('install it with: pip install "npos[cpu]" (or pip install "npos[gpu]" on a '
                 'CUDA machine)')


def import_faiss(purpose: str):
    """Import faiss or raise :class:`MissingDependencyError` with the install hint."""
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs faiss; {_INSTALL_HINT}") from None
    return faiss


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import_faiss("")
    except MissingDependencyError:
        return False
    return True


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 without faiss or with the CPU build)."""
    if not faiss_available():
        return 0
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def ivf_nlist(n: int) -> int:
    """IVF list count for n points: ``4 sqrt(n)`` rounded to a power of two, then capped (to a
    power of two) so that every list gets at least :data:`IVF_MIN_POINTS_PER_LIST` points."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    cap = 2 ** int(math.floor(math.log2(max(n // IVF_MIN_POINTS_PER_LIST, 1))))
    return max(1, min(nlist, cap))


def _as_unit_tensor(x: Any, name: str, device=None) -> torch.Tensor:
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


def resolve_knn_backend(backend: str, n: int, *, on_gpu: bool = False) -> str:
    """The concrete backend for a bank of ``n`` points (see the module docstring)."""
    if backend not in KNN_BACKENDS:
        options = ", ".join(repr(b) for b in KNN_BACKENDS)
        raise ParameterError(
            f"The 'backend' parameter must be one of {options}. Got {backend!r} instead.")
    if backend != "auto":
        return backend
    if not faiss_available() or (on_gpu and faiss_gpus() == 0) or n <= AUTO_TORCH_MAX:
        return "torch"
    return "faiss-flat" if n <= AUTO_EXACT_MAX else "faiss-ivf"


class KnnIndex:
    """Nearest neighbours of L2-normalized vectors: ``KnnIndex(backend).fit(bank).search(q, k)``.

    Parameters
    ----------
    backend : {"auto", "torch", "faiss-flat", "faiss-ivf"}
    nlist : int, optional
        IVF lists (``faiss-ivf``); default :func:`ivf_nlist` of the bank size.
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
                 nprobe: int | None = None, device=None,
                 target_recall: float = DEFAULT_TARGET_RECALL, seed: int = 0,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.backend = backend
        self.nlist = nlist
        self.nprobe = nprobe
        self.device = device
        self.target_recall = target_recall
        self.seed = seed
        self.memory_budget = memory_budget

    # ------------------------------------------------------------------ fitting
    def _validate(self) -> None:
        resolve_knn_backend(self.backend, 1)
        for name in ("nlist", "nprobe"):
            check_int(name, getattr(self, name), 1, allow_none=True)
        check_float("target_recall", self.target_recall, 0.0, 1.0, low_open=True)

    def fit(self, bank) -> KnnIndex:
        """Index ``bank`` of shape (N, D) (numpy or torch; normalized here). Returns self."""
        self._validate()
        on_gpu = isinstance(bank, torch.Tensor) and bank.device.type == "cuda"
        device = torch.device(self.device) if self.device is not None else None
        unit = _as_unit_tensor(bank, "bank", device)
        self.n_, self.dim_ = unit.shape
        self.backend_ = resolve_knn_backend(self.backend, self.n_,
                                            on_gpu=on_gpu or (device is not None
                                                              and device.type == "cuda"))
        self.nlist_, self.nprobe_, self.recall_ = None, {}, {}
        self.on_gpu_ = False
        if self.backend_ == "torch":
            self._bank = unit
            self.on_gpu_ = unit.device.type == "cuda"
            return self
        faiss = import_faiss(f"backend {self.backend_!r}")
        self._bank = unit.cpu()  # kept for recall measurements
        data = np.ascontiguousarray(self._bank.numpy())
        if self.backend_ == "faiss-flat":
            index = faiss.IndexFlatL2(self.dim_)
        else:
            self.nlist_ = min(self.nlist or ivf_nlist(self.n_), self.n_)
            quantizer = faiss.IndexFlatL2(self.dim_)
            index = faiss.IndexIVFFlat(quantizer, self.dim_, self.nlist_, faiss.METRIC_L2)
            n_train = min(self.n_, IVF_MAX_POINTS_PER_LIST * self.nlist_)
            rows = np.random.default_rng(self.seed).choice(self.n_, n_train, replace=False)
            index.train(data[np.sort(rows)])
        index.add(data)
        wants_gpu = device is None or device.type != "cpu"
        if wants_gpu and faiss_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
            self.on_gpu_ = True
        elif device is not None and device.type == "cuda":
            raise MissingDependencyError(
                f"device={str(device)!r} with backend {self.backend_!r} needs a GPU build of "
                'faiss; install it with: pip install "npos[gpu]"')
        self._index = index
        return self

    def _check_fitted(self, queries) -> torch.Tensor:
        if not hasattr(self, "backend_"):
            raise ParameterError("this KnnIndex is not fitted yet; call fit(bank) first")
        device = self._bank.device if self.backend_ == "torch" else None
        unit = _as_unit_tensor(queries, "queries", device)
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
        if self.on_gpu_ and self.backend_ != "torch" and k + extra > FAISS_GPU_MAX_K:
            raise ParameterError(
                f"faiss GPU indexes return at most {FAISS_GPU_MAX_K} neighbours; got "
                f"k={k + extra} (use backend 'torch' or device='cpu')")

    # ------------------------------------------------------------------ searching
    def _rows_per_block(self) -> int:
        return max(1, self.memory_budget // (4 * self.n_))

    def _torch_search(self, unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        dists, ids = [], []
        rows = self._rows_per_block()
        for start in range(0, unit.shape[0], rows):
            sims, idx = (unit[start:start + rows] @ self._bank.T).topk(k, dim=1)
            dists.append(similarity_to_distance(sims))
            ids.append(idx)
        return torch.cat(dists), torch.cat(ids)

    def _faiss_search(self, unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend_ == "faiss-ivf":
            self._set_nprobe(self.nprobe if self.nprobe is not None else self._tuned_nprobe(k))
        d2, ids = self._index.search(np.ascontiguousarray(unit.cpu().numpy()), k)
        # Lists too short to hold k points leave id -1 (distance +inf).
        dist = torch.from_numpy(np.sqrt(np.clip(d2, 0.0, None)))
        dist[torch.from_numpy(ids < 0)] = float("inf")
        return dist, torch.from_numpy(ids)

    def _search_unit(self, unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend_ == "torch":
            return self._torch_search(unit, k)
        return self._faiss_search(unit, k)

    def search(self, queries, k: int):
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
        dist, ids = self._search_unit(unit, k)
        return _like(queries, dist), _like(queries, ids)

    def kth_distance(self, queries, k: int, *, exclude_self: bool = False):
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
        if self.backend_ == "torch":
            out = self._torch_kth(unit, k, exclude_self)
        elif exclude_self:
            dist, ids = self._search_unit(unit, k + 1)
            own = ids == torch.arange(unit.shape[0])[:, None]
            # self among the first k results -> the k-th other is column k; else column k-1
            self_early = own[:, :k].any(dim=1)
            out = torch.where(self_early, dist[:, k], dist[:, k - 1])
        else:
            out = self._search_unit(unit, k)[0][:, k - 1]
        return _like(queries, out)

    def _torch_kth(self, unit: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
        out = torch.empty(unit.shape[0], device=unit.device)
        rows = self._rows_per_block()
        for start in range(0, unit.shape[0], rows):
            sims = unit[start:start + rows] @ self._bank.T
            if exclude_self:
                own = torch.arange(start, start + sims.shape[0], device=sims.device)
                sims[own - start, own] = float("-inf")
            out[start:start + sims.shape[0]] = kth_largest_(sims, k)
        return similarity_to_distance(out)

    # ------------------------------------------------------------------ IVF tuning
    def _set_nprobe(self, nprobe: int) -> None:
        import faiss

        nprobe = min(nprobe, self.nlist_)
        if self.on_gpu_:
            faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", nprobe)
        else:
            faiss.extract_index_ivf(self._index).nprobe = nprobe

    def measure_recall(self, k: int, *, queries=None, sample: int = RECALL_SAMPLE,
                       nprobe: int | None = None) -> float:
        """Recall@k of this index against exact search, on at most ``sample`` query rows.

        Recall@k is the mean fraction of each query's exact k nearest ids that the index
        returns. ``queries`` default to a seeded sample of the bank itself; then each row's
        own id is left out of both lists (neighbours k+1 are searched), because finding a
        point itself is free and would flatter the estimate for unseen queries. Exact
        backends return 1.0 up to ties.
        """
        own_rows = queries is None
        unit = self._check_fitted(self._bank if own_rows else queries)
        self._check_k(k, extra=int(own_rows))
        rows = torch.arange(unit.shape[0])
        if unit.shape[0] > sample:
            rows = torch.from_numpy(np.sort(np.random.default_rng(self.seed).choice(
                unit.shape[0], sample, replace=False)))
            unit = unit[rows.to(unit.device)]
        depth = k + int(own_rows)
        exact = (unit.to(self._bank.device) @ self._bank.T).topk(depth, dim=1).indices.cpu()
        if self.backend_ == "faiss-ivf" and nprobe is not None:
            self._set_nprobe(nprobe)
            found = torch.from_numpy(self._index.search(
                np.ascontiguousarray(unit.cpu().numpy()), depth)[1])
        else:
            found = self._search_unit(unit, depth)[1].cpu()
        wanted = exact != rows[:, None] if own_rows else torch.ones_like(exact, dtype=torch.bool)
        hits = (exact.unsqueeze(2) == found.unsqueeze(1)).any(dim=2) & wanted
        return float(hits.sum() / wanted.sum())

    def _tuned_nprobe(self, k: int) -> int:
        if k in self.nprobe_:
            return self.nprobe_[k]
        probe = max(1, math.ceil(2 * k * self.nlist_ / self.n_))
        probe = min(2 ** math.ceil(math.log2(probe)), self.nlist_)
        limit = min(self.nlist_, FAISS_GPU_MAX_K) if self.on_gpu_ else self.nlist_
        while True:
            recall = self.measure_recall(k, nprobe=probe)
            if recall >= self.target_recall or probe >= limit:
                break
            probe = min(probe * 2, limit)
        self.nprobe_[k], self.recall_[k] = probe, recall
        return probe

    def __repr__(self) -> str:
        fitted = (f", fitted on {self.n_}x{self.dim_} as {self.backend_!r}"
                  if hasattr(self, "backend_") else "")
        return f"KnnIndex(backend={self.backend!r}{fitted})"


def _like(reference, value: torch.Tensor):
    """Return ``value`` as numpy when ``reference`` is not a tensor, else on its device."""
    if isinstance(reference, torch.Tensor):
        return value.to(reference.device)
    return value.cpu().numpy()


def knn_kth_distance(queries, bank, k: int, *, backend: str = "auto",
                     exclude_self: bool = False, **index_options):
    """Distance of each query to its k-th nearest point of ``bank`` (normalized vectors).

    Parameters
    ----------
    queries : ndarray or Tensor of shape (n, D)
    bank : ndarray or Tensor of shape (N, D)
    k : int
    backend : {"auto", "torch", "faiss-flat", "faiss-ivf"}
    exclude_self : bool
        ``queries`` is ``bank`` (same rows): a row is not its own neighbour.
    **index_options
        Passed to :class:`KnnIndex` (``nlist``, ``nprobe``, ``device``, ...).

    Returns
    -------
    ndarray or Tensor of shape (n,)
        Same kind as ``queries``.
    """
    index = KnnIndex(backend, **index_options).fit(bank)
    return index.kth_distance(queries, k, exclude_self=exclude_self)
