"""Selection and distance kernels shared by the synthesis engine and the kNN backends.

:func:`kth_largest_` is the selection primitive of every kNN distance in npos;
:func:`kth_similarity` applies it to row blocks of (batched) similarity products.

Measured on the paper's shapes (rows of 1000 similarities, K=400; 2-core CPU, see
``BENCHMARKS.md``): ``torch.topk``/``torch.kthvalue`` on CPU cost as much as
the matrix product that made the similarities, because they carry indices through a generic
introselect. numpy's in-place ``ndarray.partition`` is a values-only, SIMD-vectorized select
(x86-simd-sort in numpy >= 2) and releases the GIL, so splitting the rows over threads is
~5x faster than ``topk``. On CUDA, ``torch.kthvalue`` (a radix select) is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

#: Default bound (bytes) on the working memory of similarity blocks and synthesis chunks.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
# Below this many elements one thread is faster than handing work to a pool.
_PARALLEL_MIN_ELEMENTS = 1 << 16


@lru_cache(maxsize=4)
def thread_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool of ``workers`` threads (for torch/numpy work that releases the GIL)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npos-kth")


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 for the block (restored after), so that the
    caller's own threads each run one single-threaded product. Why: on a shared CPU, two
    intra-op threads waiting for each other at every small product ran 15x slower than one
    (measured: a 200 x 512 x 200 product, 1.0 ms on one thread, 14.9 ms on two, with
    another job busy); and each list's result then never depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        list(thread_pool(workers).map(lambda part: part.partition(position, axis=-1), parts))
    return torch.from_numpy(rows[:, position].copy()).view(x.shape[:-1])


def kth_similarity(queries: torch.Tensor, bank: torch.Tensor, k: int, *,
                   exclude_self: bool = False, max_elements: int = 1 << 26) -> torch.Tensor:
    """Batched k-th largest dot product of every query with its class bank.

    Parameters
    ----------
    queries : Tensor of shape (C, n, D)
        Any norm (the result is then a dot product, not a cosine).
    bank : Tensor of shape (C, Q, D)
        Unit vectors.
    k : int
        1 <= k <= Q (k <= Q - 1 with ``exclude_self``).
    exclude_self : bool
        The queries are the bank itself (n == Q, same order): query i never counts bank
        point i, so this is the k-th nearest *other* point even among duplicates.
    max_elements : int
        Bound on the similarity block held at once; queries are processed in row blocks.

    Returns
    -------
    Tensor of shape (C, n)
        The k-th largest ``query . bank_point``; for unit queries, the cosine of the k-th
        nearest neighbour.
    """
    c, n, _ = queries.shape
    q = bank.shape[1]
    rows = max(1, min(n, max_elements // max(1, c * q)))
    out = torch.empty((c, n), dtype=queries.dtype, device=queries.device)
    bank_t = bank.transpose(1, 2)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = torch.bmm(queries[:, start:stop], bank_t)  # (c, rows, Q)
        if exclude_self:
            own = torch.arange(start, stop, device=sims.device)
            sims[:, own - start, own] = float("-inf")
        out[:, start:stop] = kth_largest_(sims, k)
    return out


def similarity_to_distance(sim: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between unit vectors from their cosine: ``sqrt(2 - 2 cos)``."""
    return (2.0 - 2.0 * sim).clamp_min(0.0).sqrt_()
