"""Selection and distance primitives shared by the synthesis engine and the kNN backends.

:func:`kth_largest_` is the selection primitive of every kNN distance in npos.

Measured on the paper's shapes (rows of 1000 similarities, K=400; 2-core CPU, see
``BENCHMARKS.md``): ``torch.topk``/``torch.kthvalue`` on CPU cost as much as
the matrix product that made the similarities, because they carry indices through a generic
introselect. numpy's in-place ``ndarray.partition`` is a values-only, SIMD-vectorized select
(x86-simd-sort in numpy >= 2) and releases the GIL, so splitting the rows over threads is
~5x faster than ``topk``. On CUDA, ``torch.kthvalue`` (a radix select) is used.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

#: Default bound (bytes) on the working memory of similarity blocks and synthesis chunks.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
# Below this many elements one thread is faster than handing work to a pool.
_PARALLEL_MIN_ELEMENTS = 1 << 16


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npos-kth")


def kth_largest_(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value along the last dimension; **reorders ``x`` in place**.

    Parameters
    ----------
    x : Tensor of shape (..., n)
        Floating values; on CPU it must be contiguous (it is used as scratch space).
    k : int
        1 <= k <= n.

    Returns
    -------
    Tensor of shape (...)
        Same dtype and device as ``x``. Exact: the same value a full sort would give.
    """
    n = x.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return x.kthvalue(n - k + 1, dim=-1).values
    if not x.is_contiguous():
        raise ValueError("kth_largest_ needs a contiguous CPU tensor")
    rows = x.detach().numpy().reshape(-1, n)
    position = n - k  # ascending order: the k-th largest sits at index n - k
    workers = min(torch.get_num_threads(), rows.shape[0])
    if workers <= 1 or rows.size < _PARALLEL_MIN_ELEMENTS:
        rows.partition(position, axis=-1)
    else:
        parts = np.array_split(rows, workers)  # views: each thread partitions its rows in place
        list(_pool(workers).map(lambda part: part.partition(position, axis=-1), parts))
    return torch.from_numpy(rows[:, position].copy()).view(x.shape[:-1])


def similarity_to_distance(sim: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between unit vectors from their cosine: ``sqrt(2 - 2 cos)``."""
    return (2.0 - 2.0 * sim).clamp_min(0.0).sqrt_()
