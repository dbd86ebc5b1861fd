"""Building a store's persisted IVF index (``npos index build``); see :mod:`npos.knn.store_index`.

Two streaming passes over the store's valid rows, never the whole store in float32 unless it
fits ``memory_budget``:

1. gather a seeded training sample (at most :data:`~npos.knn.ivf.IVF_MAX_POINTS_PER_LIST`
   per list, and at most half the budget) and the **held-out** query rows, normalized once;
   train the coarse quantizer (and the scalar quantizer for ``sq8``) on the sample only —
   the held-out rows are never in it, so they behave like new queries;
2. add every valid row, chunk by chunk, with its store row as faiss id, and — in the same
   pass — compute the held-out rows' exact neighbours (self excluded) block by block over
   the bank, merging top-``max(k)`` lists.

nprobe is then tuned per k: doubling from where the probed lists hold ~2k points until
recall@k of the held-out rows (own row dropped from both lists) reaches ``target_recall``;
the every-row pass's list probe likewise (:func:`~npos.knn.store_index_lists.tune_list_probe`).
On GPU (faiss-gpu) k-means and the list assignment run on all GPUs; on the CPU they are
:mod:`npos.knn.coarse`'s (bfloat16 products, exact assignment). The index is written from
the CPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from npos import __version__
from npos.atomic import atomic_path, check_output
from npos.errors import ParameterError
from npos.knn import faiss_gpus, import_faiss
from npos.knn.backends import DEFAULT_TARGET_RECALL, FAISS_GPU_MAX_K
from npos.knn.coarse import assign, kmeans
from npos.knn.ivf import IVF_MAX_POINTS_PER_LIST, ivf_nlist
from npos.knn.store_index import (FORMAT, HELDOUT_FILE, INDEX_FILE, META_FILE, QUERIES_FILE,
                                  ROWS_FILE, TRUTH_FILE, StoreIndex, _unit, default_index_path,
                                  drop_rows, recall_of, store_stamp)
from npos.knn.store_index_lists import ListLayout, tune_list_probe
from npos.validation import check_choice, check_float, check_int, fail, format_size

#: ``flat``: float32 lists; ``fp16``: float16 lists (scalar quantizer, 2 bytes/dim, CPU and
#: GPU); ``sq8``: 8-bit scalar quantizer (1 byte/dim, approximate distances).
CODECS = ("flat", "fp16", "sq8")
#: Default working memory of a build (the index itself comes on top).
DEFAULT_BUILD_BUDGET = 1 << 30
#: Held-out query rows used to tune nprobe (at most a tenth of the rows).
DEFAULT_HELDOUT = 1000
DEFAULT_KS = (50,)
#: faiss warns below this many training rows per list (``min_points_per_centroid``).
TRAIN_MIN_PER_LIST = 39
#: k-means iterations of the coarse quantizer (faiss's default is 25). Training was the
#: largest part of a 1M-row build (93 of 225 s on a 2-core CPU); later iterations barely
#: move the lists, and the nprobe tuned afterwards measures what the lists give (1M rows:
#: nprobe 32 and recall 0.997 at K = 50 after 25 iterations and after 10).
KMEANS_ITERATIONS = 10


def _bytes_per_row(store: Any) -> int:
    """Working bytes per streamed row: the stored row, its float32 copy, the unit copy."""
    return store.dim * (np.dtype(store.dtype).itemsize + 8)


def _blocks(store: Any, rows: np.ndarray, block_rows: int) -> Iterator[tuple[np.ndarray, Any]]:
    """``(store rows, raw embeddings)`` of the valid ``rows``, ``block_rows`` stored rows at a
    time (whole chunks)."""
    for start in range(0, store.n_rows, block_rows):
        stop = min(start + block_rows, store.n_rows)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            data = store.read_rows("embeddings", start, stop)
            yield rows[lo:hi], data[rows[lo:hi] - start]


def _check_options(store: Any, n: int, codec: str, nlist: Any, ks: Sequence[int],
                   target_recall: float, budget: int, heldout: int) -> tuple[int, int]:
    """Validate the build options (CLI flag names in messages); ``(nlist, min budget)``."""
    owner = "index build"
    check_choice("--codec", codec, CODECS, owner=owner)
    check_float("--target-recall", target_recall, 0.0, 1.0, low_open=True, owner=owner)
    if n < 3:
        raise ParameterError(f"store {store.url!r} has {n} valid rows; an index needs >= 3")
    auto = ivf_nlist(n)
    if nlist in (None, "auto"):
        nlist = auto
    else:
        try:
            nlist = int(nlist)
        except (TypeError, ValueError):
            fail("--nlist", nlist, f"'auto' or an int (auto = {auto} here)", owner=owner)
        check_int("--nlist", nlist, 1, n, owner=owner,
                  why=f" (at most the {n} valid rows of the store; auto = {auto})")
    for k in ks:
        check_int("--k", k, 1, n - 2, owner=owner, why=f" (the store has {n} valid rows)")
    check_int("heldout", heldout, 1, owner=owner)
    need = store.chunk_rows * (_bytes_per_row(store) + 4 * min(heldout, n))
    if budget < need:
        fail("--memory-budget", format_size(budget), f"at least {format_size(need)}",
             owner=owner, why=f" (one chunk of {store.chunk_rows} rows x {store.dim} dims "
                              "and the held-out similarities)")
    # half the budget holds the training sample: at least faiss's minimum rows per list
    train_need = 2 * 4 * store.dim * min(n, TRAIN_MIN_PER_LIST * nlist)
    if budget < train_need:
        fail("--memory-budget", format_size(budget), f"at least {format_size(train_need)}",
             owner=owner, why=f" (k-means needs {TRAIN_MIN_PER_LIST} training rows per list "
                              f"for nlist {nlist}; or pass a smaller --nlist)")
    return nlist, need


def _empty_index(dim: int, nlist: int, codec: str) -> Any:
    faiss = import_faiss("npos index build")
    quantizer = faiss.IndexFlatL2(dim)
    if codec == "flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
    else:
        kind = faiss.ScalarQuantizer.QT_fp16 if codec == "fp16" else \
            faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, kind, faiss.METRIC_L2)
    index.own_fields = True
    quantizer.this.disown()  # the index owns (and frees) its quantizer
    return index


class _ExactTopK:
    """The exact ``depth`` nearest rows of fixed unit queries, merged block by block over the
    bank (largest dot products; the query's own store row excluded). Each block's top
    ``depth + 1`` come from ``faiss.knn`` (BLAS products and a heap per query, never a
    (Q, B) sort), the own row is dropped and the result merged with the running best."""

    def __init__(self, queries: np.ndarray, query_rows: np.ndarray, depth: int) -> None:
        self.q = queries
        self.own = query_rows
        self.depth = depth
        self.sims = np.full((len(queries), depth), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), depth), -1, dtype=np.int64)

    def update(self, unit: np.ndarray, rows: np.ndarray) -> None:
        faiss = import_faiss("npos index build")
        sims, at = faiss.knn(self.q, unit, min(self.depth + 1, len(rows)),
                             metric=faiss.METRIC_INNER_PRODUCT)
        ids = np.where(at >= 0, rows[np.maximum(at, 0)], -1)
        sims[(ids == self.own[:, None]) | (ids < 0)] = -np.inf  # the own row never counts
        all_sims = np.concatenate([self.sims, sims], axis=1)
        all_ids = np.concatenate([self.ids, ids], axis=1)
        # descending by similarity, ties by store row (stable: the running best first)
        order = np.argsort(-all_sims, axis=1, kind="stable")[:, :self.depth]
        self.sims = np.take_along_axis(all_sims, order, axis=1)
        self.ids = np.take_along_axis(all_ids, order, axis=1)

    def result(self) -> np.ndarray:
        return self.ids


def tune_nprobe(index: StoreIndex, queries: np.ndarray, query_rows: np.ndarray,
                truth: np.ndarray, k: int, target_recall: float) -> tuple[int, float]:
    """Smallest doubling nprobe whose recall@k on the held-out ``queries`` (own rows dropped)
    reaches ``target_recall`` (or all lists); ``(nprobe, recall)``."""
    nlist = index.nlist
    limit = min(nlist, FAISS_GPU_MAX_K) if index.on_gpu else nlist
    probe = max(1, math.ceil(2 * k * nlist / max(index.n, 1)))
    probe = min(2 ** math.ceil(math.log2(probe)), limit)
    while True:
        dist, ids = index._search_unit(queries, k + 1, probe)
        _, ids = drop_rows(dist, ids, query_rows, k)
        recall = recall_of(ids, truth, k)
        if recall >= target_recall or probe >= limit:
            return probe, recall
        probe = min(probe * 2, limit)


def build_store_index(store: Any, out: str | None = None, *, codec: str = "flat",
                      nlist: int | str = "auto", target_recall: float = DEFAULT_TARGET_RECALL,
                      ks: Sequence[int] = DEFAULT_KS, device: str = "auto",
                      memory_budget: int = DEFAULT_BUILD_BUDGET, seed: int = 0,
                      heldout: int = DEFAULT_HELDOUT, overwrite: bool = False,
                      progress: bool = False) -> StoreIndex:
    """Build, tune and write the IVF index of every valid row of ``store``.

    Parameters
    ----------
    store : FeatureStore or str
        A complete store (any kind with embeddings).
    out : str, optional
        The index folder (default :func:`~npos.knn.store_index.default_index_path`).
    codec : {"flat", "fp16", "sq8"}
        ``flat``: float32 lists (``IndexIVFFlat``, 4 bytes/dim); ``fp16``: float16 lists
        (``IndexIVFScalarQuantizer`` QT_fp16, 2 bytes/dim); ``sq8``: 8-bit scalar quantizer
        (1 byte/dim, approximate distances).
    nlist : int or "auto"
        IVF lists; ``auto`` is :func:`~npos.knn.ivf.ivf_nlist` of the row count.
    target_recall : float
        Recall@k on held-out rows each tuned nprobe reaches (unless all lists are probed).
    ks : sequence of int
        Depths tuned now (others are tuned on first use, up to ``max(ks)``).
    device : str
        ``auto``/``cuda``: k-means and list assignment on all GPUs when faiss sees any.
    memory_budget : int
        Bytes of working memory (blocks, training sample, held-out similarities); the index
        itself comes on top.
    seed : int
        Seeds the training sample and the held-out rows.
    heldout : int
        Held-out query rows (at most a tenth of the valid rows).

    Returns
    -------
    StoreIndex
        The written index, on the CPU.
    """
    from tqdm.auto import tqdm

    from npos.device import resolve_device
    from npos.knn.store_index import _as_store

    began = time.perf_counter()
    store = _as_store(store)
    out = out or default_index_path(store.url)
    if out is None:
        raise ParameterError(f"store {store.url!r} is not a local folder; pass --out PATH")
    check_output(out, overwrite=overwrite, what="store index")
    rows = np.flatnonzero(store.readable_rows()).astype(np.int64)
    n = len(rows)
    ks = sorted({int(k) for k in ks})
    nlist, _ = _check_options(store, n, codec, nlist, ks, target_recall, memory_budget,
                              heldout)
    on_gpu = resolve_device(device).type == "cuda" and faiss_gpus() > 0
    stamp = store_stamp(store)

    rng = np.random.default_rng(seed)
    n_held = min(heldout, max(1, n // 10))
    order = rng.permutation(n)
    held = np.sort(rows[order[:n_held]])
    n_train = max(1, min(n - n_held, IVF_MAX_POINTS_PER_LIST * nlist,
                         memory_budget // 2 // (4 * store.dim)))
    train_rows = np.sort(rows[order[n_held:n_held + n_train]])
    per_row = _bytes_per_row(store)
    block = max(1, memory_budget // 2 // per_row // store.chunk_rows) * store.chunk_rows

    # pass 1: the training sample and the held-out queries, normalized once
    wanted = np.union1d(train_rows, held)
    train_x = np.empty((n_train, store.dim), np.float32)
    queries = np.empty((n_held, store.dim), np.float32)
    for part, data in tqdm(_blocks(store, wanted, block), desc="index: sample",
                           disable=not progress, total=math.ceil(store.n_rows / block)):
        unit = _unit(data)
        t = np.isin(part, train_rows)
        train_x[np.searchsorted(train_rows, part[t])] = unit[t]
        h = np.isin(part, held)
        queries[np.searchsorted(held, part[h])] = unit[h]
    index = _empty_index(store.dim, nlist, codec)
    faiss = import_faiss("npos index build")
    index.cp.niter = KMEANS_ITERATIONS
    centroids = None
    if on_gpu:  # k-means on all GPUs (faiss's bench_all_ivf does the same)
        index.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(store.dim))
    elif n_train >= nlist:  # on the CPU, npos.knn.coarse (faiss then trains codecs only)
        centroids = kmeans(train_x, nlist, niter=KMEANS_ITERATIONS, seed=seed)
        index.quantizer.add(centroids)
    index.train(train_x)
    del train_x
    cpu_quantizer = index.quantizer
    if on_gpu:  # assign rows to lists on the GPUs, then give the CPU quantizer back
        index.quantizer = faiss.index_cpu_to_all_gpus(cpu_quantizer)

    # pass 2: add every valid row; exact neighbours of the held-out rows on the way
    depth = max(ks)
    exact = _ExactTopK(queries, held, depth)
    block = max(1, memory_budget // (per_row + 4 * n_held) // store.chunk_rows) \
        * store.chunk_rows
    for part, data in tqdm(_blocks(store, rows, block), desc="index: add",
                           disable=not progress, total=math.ceil(store.n_rows / block)):
        unit = _unit(data)
        if centroids is None:
            index.add_with_ids(unit, part)
        else:  # the lists assigned by npos.knn.coarse (exact, faster than faiss's on CPU)
            lists = assign(unit, centroids)
            index.add_core(len(unit), faiss.swig_ptr(unit), faiss.swig_ptr(part),
                           faiss.swig_ptr(lists))
        exact.update(unit, part)
    index.quantizer = cpu_quantizer
    truth = exact.result()

    meta = {"format": FORMAT, "npos_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "store": {"url": store.url, "fingerprint": store.fingerprint(),
                      "n_rows": store.n_rows, "dim": store.dim, "stamp": stamp},
            "n_indexed": n, "codec": codec, "nlist": nlist, "metric": "l2-unit",
            "target_recall": target_recall, "heldout": n_held, "train_rows": n_train,
            "seed": seed, "memory_budget": memory_budget, "nprobe": {}, "recall": {},
            "list_probe": {}, "list_recall": {}}
    result = StoreIndex(out, meta, index, rows)
    layout = ListLayout(index)
    for k in ks:
        probe, recall = tune_nprobe(result, queries, held, truth, k, target_recall)
        meta["nprobe"][str(k)], meta["recall"][str(k)] = probe, recall
        probe, recall = tune_list_probe(result, held, truth, k, target_recall, layout)
        meta["list_probe"][str(k)], meta["list_recall"][str(k)] = probe, recall
    meta["build_seconds"] = round(time.perf_counter() - began, 3)
    with atomic_path(out, overwrite=overwrite, directory=True, what="store index") as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        for name, array in ((ROWS_FILE, rows), (HELDOUT_FILE, held), (QUERIES_FILE, queries),
                            (TRUTH_FILE, truth)):
            np.save(tmp / name, array, allow_pickle=False)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return StoreIndex(str(Path(out)), meta, index, rows)
