"""The two ways a synthesis bank of :mod:`npos.synthesize.scale` is searched, behind one
small interface, so the engine code is one path:

* :class:`MemoryBank`: the bank's float32 rows held in memory with their own
  :class:`~npos.knn.KnnIndex` (:func:`~npos.synthesize.scale.fit_bank_index`): ``--index
  none``, or no store index;
* :class:`IndexedBank`: the rows stay in the store and the persisted
  :class:`~npos.knn.StoreIndex` answers (``--scope global``: the whole index; ``--bank all``
  for a class the ``auto`` policy sends to IVF: the index filtered to the class's rows with
  ``among=``). Rows are read from the store block by block, so at most one query block, the
  sources of one candidate batch and the per-row distances are held, never the whole store.

Both give: ``n``, ``dim``, ``backend``, ``device``; :meth:`query_block` (bank rows per
search call under a budget), :meth:`kth_of_rows` (``d_K`` of bank rows ``start..stop``
against the *other* bank rows), :meth:`IndexedBank.pass_lists` (IVF lists of a
list-by-list every-row pass, :meth:`IndexedBank.kth_of_lists`; 0: none; a memory bank is
searched in row blocks), :meth:`rows` (float32 rows at bank positions),
:meth:`prepare` (once the sources are known) and :meth:`candidate_kth` (``d_K`` of the
candidates drawn around each source, against the bank).

**Candidates against an IVF store index** are scored against their source's neighbourhood:
the :data:`LOCAL_DEPTH` x K nearest rows of the source (found through the index once per
distinct source; there are at most ``select``), exactly, by one matrix product per source
(:func:`npos.synthesize.scale._score_locally`; :meth:`IndexedBank.candidate_kth` does the
same for given candidate vectors). Why: a candidate lies at distance ~``sigma sqrt(D)`` from
its source (0.22 at the sphere default, D = 512), its noise nearly orthogonal to every row,
so its K nearest rows are among the source's nearest few K; and a full index search per
candidate (``candidates`` = 1500 per source) is what made global synthesis cost hours at 1M
rows.
Measured on 20,000 clustered rows (K = 50, 40 boundary sources x 1500 candidates): with
2K neighbours 98.8 % of the kept outliers equal full exact search's (max ``d_K`` error
0.003); with 4K, 100 % and every ``d_K`` exact, at D = 512 and D = 64. This is an
approximation of the same kind as IVF itself, so it applies to IVF indexes only; an exact
(one-list) index scores candidates by full search, equal to the in-memory exact path.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from npos.knn.index import KnnIndex
from npos.knn.kth import kth_similarity, similarity_to_distance
from npos.knn.store_index_lists import ListLayout, list_kth_distance

#: Neighbours of a source (x K) its candidates are scored against, with an IVF store index.
LOCAL_DEPTH = 4


def read_rows(store: Any, positions: np.ndarray) -> np.ndarray:
    """float32 ``embeddings`` of the (ascending) store ``positions``, streamed one store chunk
    at a time into one preallocated array."""
    out = np.empty((positions.size, store.dim), dtype=np.float32)
    chunk = store.chunk_rows
    bounds = np.searchsorted(positions, np.arange(0, store.n_rows + chunk, chunk))
    for i in np.flatnonzero(np.diff(bounds)):  # only the chunks holding wanted rows
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        start = int(i) * chunk
        rows = store.read_rows("embeddings", start, min(start + chunk, store.n_rows))
        out[lo:hi] = rows[positions[lo:hi] - start]
    return out


class MemoryBank:
    """A bank of float32 rows ``raw`` (any device) searched through ``index`` (fitted on it)."""

    def __init__(self, raw: torch.Tensor, index: KnnIndex) -> None:
        self.raw, self.index = raw, index
        self.n, self.dim = raw.shape
        self.backend, self.device = index.backend_, raw.device

    def query_block(self, k: int, memory_budget: int) -> int:
        """The (rows, bank) similarity block of the torch backend, or the (rows, k + 1)
        results and the queries themselves for faiss, under the budget."""
        per_row = 4 * self.n if self.backend == "torch" else 12 * (k + 1) + 4 * self.dim
        return int(min(65536, max(1, memory_budget // per_row)))

    def kth_of_rows(self, start: int, stop: int, k: int) -> torch.Tensor:
        """Search k + 1 and drop the row's own id (or the last column when a duplicate hid
        it); CPU float32."""
        dist, ids = self.index.search(self.raw[start:stop], k + 1)
        own = ids.cpu() == torch.arange(start, stop)[:, None]
        early = own[:, :k].any(dim=1)
        return torch.where(early, dist.cpu()[:, k], dist.cpu()[:, k - 1])

    #: Candidates are searched against the whole bank (:meth:`candidate_kth`).
    scores_locally = False

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        return self.raw[positions.to(self.raw.device)]

    def prepare(self, sources: torch.Tensor, k: int) -> None:
        """Nothing to prepare: candidates are searched against the whole bank."""

    def candidate_kth(self, v: torch.Tensor, sources: torch.Tensor, k: int,
                      max_elements: int) -> torch.Tensor:
        """``d_K`` (s, m) of candidates ``v`` (s, m, D) drawn around bank rows ``sources``."""
        return self.index.kth_distance(v.reshape(-1, self.dim), k).cpu().view(v.shape[:2])


class IndexedBank:
    """The store rows ``positions`` (ascending) of ``store``, searched through its persisted
    :class:`~npos.knn.StoreIndex` ``index``.

    ``among``: search only these rows (a class of ``--bank all``); the nprobe tuned for the
    whole index is then scaled by the inverse share of the class (capped at nlist), so the
    probed lists hold about as many eligible rows as an unfiltered search scans: exact for
    a class spread over every list, conservative (slower, not less accurate) for a class
    concentrated in a few.
    """

    backend = "store-index"
    device = torch.device("cpu")

    def __init__(self, store: Any, index: Any, positions: np.ndarray, *,
                 among: bool = False) -> None:
        self.store, self.index, self.positions = store, index, positions
        self.n, self.dim = int(positions.size), store.dim
        self.among = positions if among else None
        self._units: torch.Tensor | None = None  # see prepare
        self._slot: torch.Tensor | None = None
        self._layout: ListLayout | None = None  # see pass_lists
        self._sources: torch.Tensor | None = None  # raw rows of the prepared sources

    def _options(self, k: int) -> dict[str, Any]:
        if self.among is None:
            return {}
        share = self.n / max(self.index.n, 1)
        probe = min(self.index.nlist, math.ceil(self.index.nprobe_for(k) / share))
        return {"among": self.among, "nprobe": probe}

    def query_block(self, k: int, memory_budget: int) -> int:
        """float32 query rows, their unit copy and the (rows, k + 1) results."""
        per_row = 8 * self.dim + 12 * (k + 1)
        return int(min(65536, max(1, memory_budget // per_row)))

    def kth_of_rows(self, start: int, stop: int, k: int) -> torch.Tensor:
        rows = self.positions[start:stop]
        queries = read_rows(self.store, rows)
        dist = self.index.kth_distance(queries, k, exclude_self=True, rows=rows,
                                       **self._options(k))
        return torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32))

    def pass_lists(self, memory_budget: int) -> int:
        """The IVF lists of the every-row pass (:meth:`kth_of_lists`), or 0 when it does not
        apply: a class (filtered) bank, an index on the GPU (searched there), or quantized
        lists longer than the budget (each would be decoded for every block of queries)."""
        if self.among is not None or self.index.on_gpu:
            return 0
        if self._layout is None:
            self._layout = ListLayout(self.index.index)
        if self.index.meta["codec"] != "flat" and \
                self._layout.max_list_bytes() > memory_budget // 4:
            return 0
        return self._layout.nlist

    def kth_of_lists(self, lists: range, k: int, memory_budget: int,
                     ) -> tuple[np.ndarray, torch.Tensor]:
        """(bank positions, ``d_K``) of the members of IVF ``lists``, list by list."""
        rows, dist = list_kth_distance(self.index, k, lists=lists, layout=self._layout,
                                       memory_budget=memory_budget)
        return np.searchsorted(self.positions, rows), torch.from_numpy(dist)

    @property
    def scores_locally(self) -> bool:
        """Candidates are scored in their source's neighbourhood (:meth:`neighbourhood`,
        set by :meth:`prepare` for an IVF index)."""
        return self._units is not None

    def neighbourhood(self, sources: torch.Tensor) -> torch.Tensor:
        """(s, depth, D) unit rows of the neighbourhoods of bank positions ``sources``
        (prepared)."""
        assert self._units is not None and self._slot is not None  # see prepare
        return self._units[self._slot[sources]]

    def neighbours(self, position: int) -> torch.Tensor:
        """(depth, D) unit rows of the neighbourhood of one prepared source (a view)."""
        assert self._units is not None and self._slot is not None  # see prepare
        return self._units[int(self._slot[position])]

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        if self._sources is not None:  # the prepared sources: no store read
            slot = self._slot[positions] if self._slot is not None else None
            if slot is not None and bool((slot >= 0).all()):
                return self._sources[slot]
        wanted = self.positions[positions.numpy()]
        order = np.argsort(wanted, kind="stable")
        out = np.empty((wanted.size, self.dim), dtype=np.float32)
        out[order] = read_rows(self.store, wanted[order])
        return torch.from_numpy(out)

    def prepare(self, sources: torch.Tensor, k: int) -> None:
        """With an IVF index: the unit vectors of the :data:`LOCAL_DEPTH` x K nearest rows
        of every distinct source (bank positions ``sources``), searched once."""
        self._slot = self._units = self._sources = None
        if self.index.nlist == 1:  # exact index: full search stays exact
            return
        distinct = torch.unique(sources)
        depth = min(self.index.n, LOCAL_DEPTH * k)
        # a depth of LOCAL_DEPTH x K at the nprobe tuned for K loses neighbours: probe that
        # many times more lists (at most ``select`` queries: cheap)
        probe = min(self.index.nlist, LOCAL_DEPTH * self._options(k).get(
            "nprobe", self.index.nprobe_for(k)))
        raw = self.rows(distinct)
        _, ids = self.index.search(raw, depth, **{**self._options(k), "nprobe": probe})
        found = np.unique(ids[ids >= 0])
        units = F.normalize(torch.from_numpy(read_rows(self.store, found)), dim=-1)
        # a missing neighbour (-1: the probed lists ran short) is the antipode of a row
        units = torch.cat([units, -units[:1]])
        self._units = units[torch.from_numpy(
            np.where(ids >= 0, np.searchsorted(found, ids), found.size))]  # (u, depth, D)
        self._slot = torch.full((self.n,), -1, dtype=torch.int64)
        self._slot[distinct] = torch.arange(distinct.numel())
        self._sources = raw  # read once, not once per candidate batch

    def candidate_kth(self, v: torch.Tensor, sources: torch.Tensor, k: int,
                      max_elements: int) -> torch.Tensor:
        """``d_K`` (s, m) of candidates ``v`` (s, m, D) drawn around bank rows ``sources``:
        against each source's neighbourhood (IVF index, see the module docstring), or by a
        full search of the index."""
        if self._units is None:
            dist = self.index.kth_distance(v.reshape(-1, self.dim), k, **self._options(k))
            return torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32)
                                    ).view(v.shape[:2])
        near = self.neighbourhood(sources)
        # the k-th largest of v.x / |v| is the k-th largest v.x over |v|: no unit copy of v
        sim = kth_similarity(v, near, k, max_elements=max_elements)
        return similarity_to_distance(sim.div_(v.norm(dim=-1).clamp_min_(1e-12)))
