"""The K-th-NN distance of **every** row of a store index, list by list (the every-row pass of
``--scope global`` synthesis and of ``benchmarks/scale.py``).

A faiss IVF search handles one query at a time: each query scans the vectors of its probed
lists, ~2,700 float32 vectors (5.5 MB) per query at nprobe 8 of 512 lists, so the search is
memory-bound (0.58 ms per query measured on a 2-core CPU, ~3 GFLOP/s, where a BLAS product
runs at ~100 GFLOP/s; ``BENCHMARKS.md``). When the queries are the indexed rows themselves,
the members of one list share their neighbourhood, so this pass takes the members of list
``l`` as one block of queries and scores them against the rows of the ``m`` lists whose
centroids are nearest to ``l``'s centroid (``l`` first) with **one matrix product**, then an
in-place k-th selection (:func:`~npos.knn.kth.kth_largest_`). Each row's own column is
excluded (a row never counts as its own neighbour; a duplicate row does).

``m`` (the *list probe*) is tuned like nprobe, on the index's held-out rows: doubling from 1
until recall@k of this very computation against their exact neighbours reaches the index's
target recall (:func:`tune_list_probe`, stored in ``meta.json`` as ``list_probe`` /
``list_recall`` at build time, tuned on first use for an older index). Measured on 100,000
generated rows (512 lists): m = 8 gives recall 0.998, as per-query nprobe 8 does, and the
pass takes 1.5 s instead of 20-95 s of faiss search.

Memory: the list vectors are read in place from the CPU index (float32 codes of ``flat``;
``fp16``/``sq8`` lists are decoded one list at a time), and one (queries, candidates)
similarity block is held, the queries of a long list split to fit ``memory_budget``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from npos.knn.kth import (DEFAULT_MEMORY_BUDGET, kth_largest_, one_torch_thread,
                          similarity_to_distance, thread_pool)


class ListLayout:
    """The inverted lists of a CPU faiss IVF index (``IndexIVFFlat`` or
    ``IndexIVFScalarQuantizer``), read in place.

    Attributes
    ----------
    nlist, dim : int
    sizes : ndarray of shape (nlist,)
        Rows per list.
    offsets : ndarray of shape (nlist + 1,)
        Where each list starts in :attr:`ids`.
    ids : ndarray of shape (n,)
        The faiss ids (store rows) of every list, concatenated in list order.
    centroids : ndarray of shape (nlist, dim)
    """

    def __init__(self, index: Any) -> None:
        import faiss

        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))  # the concrete class
        self._ivf, self._lists = ivf, ivf.invlists
        self.nlist, self.dim = int(ivf.nlist), int(ivf.d)
        self.sizes = np.array([self._lists.list_size(i) for i in range(self.nlist)],
                              dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.ids = np.empty(int(self.offsets[-1]), dtype=np.int64)
        for i in np.flatnonzero(self.sizes).tolist():
            size = int(self.sizes[i])
            self.ids[self.offsets[i]:self.offsets[i + 1]] = faiss.rev_swig_ptr(
                self._lists.get_ids(i), size)
        self.centroids = ivf.quantizer.reconstruct_n(0, self.nlist)
        self._sq = getattr(ivf, "sq", None)  # IndexIVFScalarQuantizer: codes to decode
        self._residual = bool(getattr(ivf, "by_residual", False)) and self._sq is not None

    def vectors(self, i: int) -> np.ndarray:
        """float32 (sizes[i], dim) vectors of list ``i``: a view of a ``flat`` list, decoded
        otherwise (a new array)."""
        import faiss

        size = int(self.sizes[i])
        if size == 0:
            return np.zeros((0, self.dim), np.float32)
        code_size = int(self._lists.code_size)
        codes = faiss.rev_swig_ptr(self._lists.get_codes(int(i)), size * code_size)
        if self._sq is None:
            return codes.view(np.float32).reshape(size, self.dim)
        x = self._sq.decode(codes.reshape(size, code_size))
        return x + self.centroids[i] if self._residual else x

    def max_list_bytes(self) -> int:
        """float32 bytes of the longest list."""
        return int(self.sizes.max(initial=0)) * self.dim * 4

    def probes(self, m: int) -> np.ndarray:
        """(nlist, m) the lists whose centroids are nearest to each list's centroid, the list
        itself first (so the own rows of a list's members are its first columns)."""
        import faiss

        m = min(m, self.nlist)
        near = np.empty((self.nlist, m), dtype=np.int64)
        near[:, 0] = np.arange(self.nlist)
        if m > 1:
            flat = faiss.IndexFlatL2(self.dim)
            flat.add(self.centroids)
            _, found = flat.search(self.centroids, m + 1)
            for i in range(self.nlist):  # drop the list itself (ties may place it anywhere)
                others = found[i][(found[i] != i) & (found[i] >= 0)]
                near[i, 1:] = others[:m - 1]
        return near

    def position(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(list, position in the list)`` of each indexed store row in ``rows``."""
        order = np.argsort(self.ids, kind="stable")
        at = order[np.searchsorted(self.ids, rows, sorter=order)]
        lists = np.searchsorted(self.offsets, at, side="right") - 1
        return lists, at - self.offsets[lists]


def _similarities(layout: ListLayout, probe: np.ndarray, queries: torch.Tensor,
                  ) -> tuple[torch.Tensor, np.ndarray]:
    """(q, c) dot products of ``queries`` with every row of the ``probe`` lists, and the
    (c,) store rows of the columns. One product per probe list into the rows of the
    transposed block (each list's vectors are used in place, never gathered)."""
    bounds = np.concatenate([[0], np.cumsum(layout.sizes[probe])])
    sims_t = torch.empty((int(bounds[-1]), queries.shape[0]))
    for j, i in enumerate(probe.tolist()):
        if bounds[j + 1] > bounds[j]:
            torch.mm(torch.from_numpy(layout.vectors(i)), queries.T,
                     out=sims_t[int(bounds[j]):int(bounds[j + 1])])
    ids = np.concatenate([layout.ids[layout.offsets[i]:layout.offsets[i + 1]]
                          for i in probe.tolist()])
    return sims_t.T.contiguous(), ids


def _blocks_of(layout: ListLayout, i: int, probe: np.ndarray, memory_budget: int,
               ) -> Iterable[tuple[int, int]]:
    """Query row ranges of list ``i`` whose (rows, candidates) blocks fit the budget (the
    transposed product and its contiguous copy)."""
    columns = int(layout.sizes[probe].sum())
    step = max(1, memory_budget // max(1, 8 * columns))
    return ((s, min(int(layout.sizes[i]), s + step)) for s in range(0, int(layout.sizes[i]), step))


def _list_kth(layout: ListLayout, i: int, probe: np.ndarray, k: int,
              memory_budget: int) -> np.ndarray:
    sim = np.full(int(layout.sizes[i]), -np.inf, dtype=np.float32)
    if int(layout.sizes[probe].sum()) - 1 >= k:
        own = torch.from_numpy(layout.vectors(i))
        for s, e in _blocks_of(layout, i, probe, memory_budget):
            sims, _ = _similarities(layout, probe, own[s:e])
            sims[torch.arange(e - s), torch.arange(s, e)] = -math.inf  # own columns
            sim[s:e] = kth_largest_(sims, k).numpy()
    return sim


def list_kth_similarity(layout: ListLayout, lists: Iterable[int], k: int, m: int, *,
                        memory_budget: int = DEFAULT_MEMORY_BUDGET,
                        ) -> dict[int, np.ndarray]:
    """The k-th largest dot product of every member of each of ``lists`` with the rows of its
    ``m`` probe lists (:meth:`ListLayout.probes`), own row excluded: ``{list: (size,)}``;
    ``-inf`` where the probed lists hold fewer than k other rows. The lists are shared by
    torch's thread count of single-threaded workers (:func:`one_torch_thread`), each with
    its share of ``memory_budget``."""
    near = layout.probes(m)
    lists = [int(i) for i in lists]
    workers = max(1, min(torch.get_num_threads(), len(lists)))
    share = max(1, memory_budget // workers)
    with one_torch_thread():
        sims = thread_pool(workers).map(
            lambda i: _list_kth(layout, i, near[i], k, share), lists)
        return dict(zip(lists, sims, strict=True))


def list_kth_distance(index: Any, k: int, *, lists: Iterable[int] | None = None,
                      list_probe: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                      layout: ListLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distance of indexed rows to their k-th nearest other indexed row, list by list.

    Parameters
    ----------
    index : StoreIndex
        On the CPU.
    k : int
    lists : iterable of int, optional
        The lists whose members are computed (default all; ``torchrun`` ranks share them).
    list_probe : int, optional
        Lists scored per list (default :meth:`StoreIndex.list_probe_for` k).
    layout : ListLayout, optional
        The index's layout, when the caller already read it.

    Returns
    -------
    rows : ndarray of shape (n,)
        int64 store rows, in list order.
    distance : ndarray of shape (n,)
        float32; ``+inf`` where the probed lists held fewer than k other rows.
    """
    layout = layout or ListLayout(index.index)
    m = list_probe if list_probe is not None else index.list_probe_for(k)
    wanted = range(layout.nlist) if lists is None else lists
    sims = list_kth_similarity(layout, wanted, k, m, memory_budget=memory_budget)
    if not sims:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    rows = np.concatenate([layout.ids[layout.offsets[i]:layout.offsets[i + 1]] for i in sims])
    dist = similarity_to_distance(torch.from_numpy(np.concatenate(list(sims.values()))))
    return rows, dist.numpy()


def tune_list_probe(index: Any, held: np.ndarray, truth: np.ndarray, k: int,
                    target_recall: float, layout: ListLayout | None = None,
                    ) -> tuple[int, float]:
    """Smallest doubling list probe ``m`` whose recall@k on the held-out rows ``held``
    (indexed store rows; ``truth`` their exact neighbours, own row excluded) reaches
    ``target_recall`` (or all lists): ``(m, recall)``. The held-out rows are scored exactly
    as the pass scores them: against the ``m`` lists nearest to their own list's centroid."""
    layout = layout or ListLayout(index.index)
    lists, at = layout.position(held)
    with one_torch_thread():
        return _tune(layout, lists, at, truth, k, target_recall)


def _tune(layout: ListLayout, lists: np.ndarray, at: np.ndarray, truth: np.ndarray, k: int,
          target_recall: float) -> tuple[int, float]:
    from npos.knn.store_index import recall_of

    m = 1
    while True:
        near = layout.probes(m)
        found = np.full((len(lists), k), -1, dtype=np.int64)
        for i in np.unique(lists).tolist():
            mine = np.flatnonzero(lists == i)
            queries = torch.from_numpy(layout.vectors(i)[at[mine]])
            sims, ids = _similarities(layout, near[i], queries)
            sims[torch.arange(len(mine)), torch.from_numpy(at[mine])] = -math.inf
            top = sims.topk(min(k, sims.shape[1]), dim=1).indices.numpy()
            found[mine, :top.shape[1]] = ids[top]
        recall = recall_of(found, truth, k)
        if recall >= target_recall or m >= layout.nlist:
            return m, recall
        m = min(2 * m, layout.nlist)
