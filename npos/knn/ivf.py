"""The approximate ``faiss-ivf`` backend and :class:`KnnCache`, which keeps its trained lists and
tuned nprobe across fits.

Sizing in the spirit of autofaiss: ``nlist`` is ``4 sqrt(N)`` rounded to a power of two,
capped so every list has ~100 training points (:func:`ivf_nlist`); the lists are trained on a
seeded sample of at most 256 points per list. Unless ``nprobe`` is given, the first search for
a given k tunes it: nprobe doubles from a start where the probed lists hold ~2k points until
recall@k against exact search on a seeded sample of bank points reaches ``target_recall``; the
measured recall is kept in ``recall_[k]``.

**Training once.** Training (k-means) and tuning (several recall measurements) cost far more
than a search of a small bank. A caller that fits banks of the same shape again and again (the
synthesis engine, once per class and call) passes a :class:`KnnCache` it owns: the trained,
empty index and the tuned nprobe are stored under ``(cache_key, N, D, nlist, seed)`` (and k),
and later fits only add the new points to a copy of the trained lists. The lists then describe
the bank they were trained on; for slowly drifting banks (online training) that only costs
recall, and ``cache.clear()`` (e.g. each epoch) retrains.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from npos.knn.backends import FAISS_GPU_MAX_K, FaissBackend, recall_at_k

#: Least number of training points per IVF list.
IVF_MIN_POINTS_PER_LIST = 100
#: faiss k-means samples at most this many points per list.
IVF_MAX_POINTS_PER_LIST = 256


def ivf_nlist(n: int) -> int:
    """IVF list count for n points: ``4 sqrt(n)`` rounded to a power of two, then capped (to a
    power of two) so that every list gets at least :data:`IVF_MIN_POINTS_PER_LIST` points."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    cap = 2 ** int(math.floor(math.log2(max(n // IVF_MIN_POINTS_PER_LIST, 1))))
    return max(1, min(nlist, cap))


def set_nprobe(index: Any, nprobe: int, *, on_gpu: bool) -> None:
    """Probe ``nprobe`` lists of a (CPU or GPU, possibly sharded) IVF index."""
    import faiss

    if on_gpu:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    else:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)


def index_to_gpus(index: Any, *, index_bytes: int) -> Any:
    """``index`` on all GPUs faiss sees: replicated when it fits one GPU (with a quarter
    to spare), sharded across them otherwise. The cloner's ``useFloat16`` asks for float16
    storage where the GPU index type has it; float16 inverted lists on CPU and GPU alike
    come from the store index's ``fp16`` codec. Not exercised on CPU-only machines."""
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    if hasattr(options, "useFloat16"):
        options.useFloat16 = True
    try:
        import torch

        free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    except Exception:  # no torch CUDA view of the GPUs: shard to be safe
        free = 0
    options.shard = index_bytes > 0.75 * free
    return faiss.index_cpu_to_all_gpus(index, co=options)


class KnnCache:
    """State kNN backends keep across fits, owned by the caller (no global cache).

    A plain keyed store: backends choose their keys (``faiss-ivf``: trained lists and tuned
    nprobe). Pass one to :class:`~npos.knn.KnnIndex` (``cache=``) or to
    :func:`npos.synthesize.synthesize` (``knn_cache=``) and keep it between calls.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, Any] = {}

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        return self._entries.get(key, default)

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key``."""
        self._entries[key] = value

    def clear(self) -> None:
        """Forget everything (the next fits train and tune again)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class FaissIvfBackend(FaissBackend):
    """Approximate ``IndexIVFFlat`` with a tuned nprobe (see the module docstring).

    Attributes
    ----------
    nlist : int
    nprobe_ : dict[int, int]
        nprobe used for each k searched so far (empty when ``nprobe`` is fixed).
    recall_ : dict[int, float]
        Measured recall@k behind each tuned nprobe.
    """

    def make_index(self, data: np.ndarray) -> Any:
        import faiss

        opts = self.options
        n, dim = data.shape
        self.nlist = min(opts.nlist or ivf_nlist(n), n)
        self.nprobe_: dict[int, int] = {}
        self.recall_: dict[int, float] = {}
        self._key = (opts.cache_key, n, dim, self.nlist, opts.seed)
        trained = opts.cache.get(("ivf-trained", *self._key)) if opts.cache else None
        if trained is None:
            trained = self._train(data)
            if opts.cache is not None:
                opts.cache.put(("ivf-trained", *self._key), trained)
        index = faiss.clone_index(trained)  # the cached copy stays empty
        index.add(data)
        return index

    def _train(self, data: np.ndarray) -> Any:
        """An empty IVF index whose lists are trained on a seeded sample of ``data``."""
        import faiss

        n, dim = data.shape
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, self.nlist, faiss.METRIC_L2)
        n_train = min(n, IVF_MAX_POINTS_PER_LIST * self.nlist)
        rows = np.random.default_rng(self.options.seed).choice(n, n_train, replace=False)
        index.train(data[np.sort(rows)])
        return index

    def set_nprobe(self, nprobe: int) -> None:
        """Probe ``nprobe`` lists (at most ``nlist``) from now on."""
        set_nprobe(self.index, min(nprobe, self.nlist), on_gpu=self.on_gpu)

    def search(self, unit: torch.Tensor, k: int, *,
               nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`KnnBackend.search`; ``nprobe`` overrides the configured/tuned one."""
        if nprobe is None:
            fixed = self.options.nprobe
            nprobe = fixed if fixed is not None else self.tuned_nprobe(k)
        self.set_nprobe(nprobe)
        return super().search(unit, k)

    def _ids(self, unit: torch.Tensor, k: int, *, nprobe: int) -> torch.Tensor:
        return self.search(unit, k, nprobe=nprobe)[1]

    def tuned_nprobe(self, k: int) -> int:
        """nprobe reaching ``target_recall`` at this k: from this fit, the cache, or tuned."""
        if k not in self.nprobe_:
            cache = self.options.cache
            found = cache.get(("ivf-nprobe", *self._key, k)) if cache else None
            if found is None:
                found = self._tune(k)
                if cache is not None:
                    cache.put(("ivf-nprobe", *self._key, k), found)
            self.nprobe_[k], self.recall_[k] = found
        return self.nprobe_[k]

    def _tune(self, k: int) -> tuple[int, float]:
        """Double nprobe until recall@k (on bank rows) reaches the target; (nprobe, recall)."""
        n = self.bank.shape[0]
        if n < 2:
            return self.nlist, 1.0
        k = min(k, n - 1)  # the recall sample leaves each row's own id out
        probe = max(1, math.ceil(2 * k * self.nlist / n))
        probe = min(2 ** math.ceil(math.log2(probe)), self.nlist)
        limit = min(self.nlist, FAISS_GPU_MAX_K) if self.on_gpu else self.nlist
        while True:
            recall = recall_at_k(self.bank, functools.partial(self._ids, nprobe=probe), k,
                                 seed=self.options.seed)
            if recall >= self.options.target_recall or probe >= limit:
                return probe, recall
            probe = min(probe * 2, limit)
