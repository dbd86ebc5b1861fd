"""One persisted faiss IVF index per feature store: :class:`StoreIndex` (open, check, search).

Built by :func:`npos.knn.store_index_build.build_store_index` (``npos index build``); used by
the ``knn`` score (``evaluate``/``score --index``) and offered to synthesis and head training.

**Metric**: Euclidean distance between L2-normalized vectors (cosine via L2), as everywhere in
:mod:`npos.knn`; queries are normalized here. The faiss ids **are the store's row indices**
(``add_with_ids``), so :meth:`StoreIndex.search` returns store rows.

**On disk** (default: the folder ``STORE.index`` beside a local store, see
:func:`default_index_path`), written atomically (temporary sibling, then ``os.replace``):

* ``index.faiss``: the CPU index (``faiss.write_index``), ``IndexIVFFlat`` or
  ``IndexIVFScalarQuantizer``;
* ``meta.json``: format, the store's URL, fingerprint, row count and content stamp; nlist,
  codec, nprobe and measured recall per k, the list probe of the every-row pass per k
  (:mod:`npos.knn.store_index_lists`), build settings and timings;
* ``rows.npy``: the indexed store rows (int64, ascending), i.e. valid rows -> store row;
* ``heldout.npy``: the held-out query rows (int64) nprobe was tuned on;
* ``queries.npy``: their unit vectors (float32), so later k are tuned without the store;
* ``truth.npy``: their exact neighbours (store rows, self excluded), depth ``max(k)``.

**Staleness**: the content stamp (:func:`store_stamp`) hashes the row count, dtype, chunking,
the done mask, the readable-row mask and the bytes of sampled rows; an index whose fingerprint
or stamp differs from the store's is refused in one line (:class:`IndexMismatchError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from npos.errors import MissingDependencyError, NposError, ParameterError
from npos.knn import faiss_gpus, import_faiss
from npos.knn.ivf import index_to_gpus, set_nprobe
from npos.validation import check_int

FORMAT = "npos.store-index/1"
INDEX_SUFFIX = ".index"
INDEX_FILE, META_FILE = "index.faiss", "meta.json"
ROWS_FILE, HELDOUT_FILE, QUERIES_FILE, TRUTH_FILE = ("rows.npy", "heldout.npy",
                                                      "queries.npy", "truth.npy")
#: Stores chunks whose rows enter the content stamp (evenly spaced).
STAMP_CHUNKS = 16
#: Query rows per faiss search call (bounds the (rows, k) result blocks).
SEARCH_BLOCK = 65536


class IndexMismatchError(NposError):
    """An index that was built for another store, or before the store changed."""


def default_index_path(store_url: str | os.PathLike) -> str | None:
    """Where ``npos index build`` puts a store's index: ``STORE.index`` beside a local store
    (a trailing ``/`` dropped); ``None`` for an fsspec URL (pass ``--out``/``--index``)."""
    url = str(store_url).rstrip("/")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url) and not url.startswith("file://"):
        return None
    return url.removeprefix("file://") + INDEX_SUFFIX


def _unit(x: Any) -> np.ndarray:
    """(n, D) numpy/torch -> C-contiguous float32 unit rows (a new array)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.array(x, dtype=np.float32, copy=True, ndmin=2, order="C")
    if x.size:  # torch's norm: numpy's builds an (n, D) square first (5x slower)
        import torch

        t = torch.from_numpy(x)
        t.div_(torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min_(1e-12))
    return x


def store_stamp(store: Any) -> str:
    """A content stamp of ``store`` (a :class:`~npos.store.FeatureStore`): sha256 of its
    shape, dtype, chunking, done mask, readable-row mask, the compressed sizes of its
    embeddings/labels/valid arrays (zarr ``nbytes_stored``, a listing, no reads) and the bytes
    of the rows (and labels) of up to :data:`STAMP_CHUNKS` evenly spaced chunks. Changes when
    rows are appended, invalidated, or rewritten with other values (a rewrite that keeps every
    compressed size and misses the sampled chunks is the blind spot)."""
    digest = hashlib.sha256()
    head = [store.n_rows, store.dim, store.dtype, store.chunk_rows]
    digest.update(json.dumps(head).encode())
    digest.update(np.packbits(store.done_mask()).tobytes())
    digest.update(np.packbits(store.readable_rows(complete=False)).tobytes())
    for name in ("embeddings", "labels", "valid"):  # compressed sizes: any rewrite shows
        if store.has(name):
            digest.update(str(store.array(name).nbytes_stored()).encode())
    picks = np.unique(np.linspace(0, store.n_chunks - 1, min(STAMP_CHUNKS, store.n_chunks))
                      .round().astype(int))
    for chunk in picks:
        rows = store.chunk_slice(int(chunk))
        digest.update(np.ascontiguousarray(store.read_rows("embeddings", rows.start,
                                                           rows.stop)).tobytes())
        if store.has("labels"):
            digest.update(np.ascontiguousarray(store.read_rows("labels", rows.start,
                                                               rows.stop)).tobytes())
    return digest.hexdigest()


def recall_of(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of each row's first ``k`` exact ids (``truth``) among its ``found`` ids
    (the first ``k`` columns of both)."""
    hits = 0
    for start in range(0, len(found), 64):  # (64, k, k) comparisons at a time
        f, t = found[start:start + 64, :k], truth[start:start + 64, :k]
        hits += int((t[:, :, None] == f[:, None, :]).any(axis=2).sum())
    return hits / float(truth[:, :k].size)


def drop_rows(dist: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int,
              ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` results of each query after removing its own row ``rows[i]`` (the
    search asked for k + 1; when the own row was not among them the last column goes)."""
    own = ids == rows[:, None]
    keep = ~own
    keep[~own.any(axis=1), -1] = False
    return (dist[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k))


class StoreIndex:
    """A store's persisted IVF index. Open with :meth:`open` (or :meth:`find`).

    Attributes
    ----------
    path : str
    meta : dict
        ``meta.json`` (see the module docstring).
    rows : ndarray of shape (n,)
        The indexed store rows (the faiss ids).
    on_gpu : bool
    """

    def __init__(self, path: str, meta: dict[str, Any], index: Any, rows: np.ndarray, *,
                 on_gpu: bool = False) -> None:
        self.path, self.meta, self.index, self.rows = str(path), meta, index, rows
        self.on_gpu = on_gpu
        self._nprobe = {int(k): int(v) for k, v in meta["nprobe"].items()}
        self._recall = {int(k): float(v) for k, v in meta["recall"].items()}
        self._list_probe = {int(k): int(v) for k, v in meta.get("list_probe", {}).items()}

    # ------------------------------------------------------------------ opening
    @classmethod
    def find(cls, path: str | os.PathLike | None, *, store: Any,
             device: str = "cpu") -> StoreIndex | None:
        """The index at ``path``, or at the store's default location when ``path`` is
        ``None`` and one exists there (else ``None``); checked against ``store``."""
        if path is None:
            path = default_index_path(store.url)
            if path is None or not Path(path, META_FILE).is_file():
                return None
        return cls.open(path, store=store, device=device)

    @classmethod
    def open(cls, path: str | os.PathLike | None, *, store: Any = None,
             device: str = "cpu") -> StoreIndex:
        """Load the index at ``path`` (``None``: the default location of ``store``).

        Parameters
        ----------
        store : FeatureStore or str, optional
            Checked with :meth:`check_store` (refused in one line when it does not match).
        device : str
            ``cpu`` keeps it on the CPU; ``auto``/``cuda`` move it to all GPUs faiss sees
            (``cuda`` without GPU faiss is an error).
        """
        from npos.device import resolve_device

        store = _as_store(store)
        if path is None:
            if store is None:
                raise ParameterError("StoreIndex.open needs a path or a store")
            path = default_index_path(store.url)
            if path is None:
                raise ParameterError(f"store {store.url!r} is not a local folder; pass the "
                                     "index path (--index PATH)")
        folder = Path(path)
        meta = _read_meta(folder)
        if store is not None:  # before reading what may be gigabytes
            check_store_meta(meta, str(folder), store)
        faiss = import_faiss(f"index {str(folder)!r}")
        rows = np.load(folder / ROWS_FILE, allow_pickle=False)
        self = cls(str(folder), meta, faiss.read_index(str(folder / INDEX_FILE)), rows)
        target = resolve_device(device)
        if target.type == "cuda":
            if faiss_gpus() == 0:
                raise MissingDependencyError(
                    f"device={device!r} for index {str(folder)!r} needs a GPU build of faiss; "
                    'install it with: pip install "npos[gpu]"')
            self.index = index_to_gpus(self.index, index_bytes=self.size_bytes)
            self.on_gpu = True
        return self

    def check_store(self, store: Any) -> None:
        """Raise :class:`IndexMismatchError` unless this index was built from ``store`` as it
        is now (see :func:`check_store_meta`)."""
        check_store_meta(self.meta, self.path, _as_store(store))

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Indexed rows."""
        return int(self.meta["n_indexed"])

    @property
    def dim(self) -> int:
        return int(self.meta["store"]["dim"])

    @property
    def nlist(self) -> int:
        return int(self.meta["nlist"])

    @property
    def nprobe(self) -> dict[int, int]:
        """nprobe per tuned k (tuned at build time, or later from the stored held-out rows)."""
        return dict(self._nprobe)

    @property
    def recall(self) -> dict[int, float]:
        """Recall@k measured on the held-out rows behind each nprobe."""
        return dict(self._recall)

    @property
    def size_bytes(self) -> int:
        """Bytes of the index file (about its memory on the CPU)."""
        return int(Path(self.path, INDEX_FILE).stat().st_size)

    def info(self) -> dict[str, Any]:
        """What ``npos index info`` prints."""
        meta = self.meta
        return {"path": self.path, "store": meta["store"]["url"], "rows": self.n,
                "dim": self.dim, "codec": meta["codec"], "nlist": self.nlist,
                "nprobe": {str(k): v for k, v in sorted(self._nprobe.items())},
                "recall": {str(k): round(v, 4) for k, v in sorted(self._recall.items())},
                "list_probe": {str(k): v for k, v in sorted(self._list_probe.items())},
                "list_recall": {str(k): round(float(v), 4)
                                for k, v in sorted(meta.get("list_recall", {}).items())},
                "target_recall": meta["target_recall"], "heldout": meta["heldout"],
                "size_bytes": self.size_bytes, "built": meta["created"],
                "build_seconds": meta.get("build_seconds")}

    # ------------------------------------------------------------------ searching
    def nprobe_for(self, k: int) -> int:
        """nprobe for depth ``k``: tuned at build time, or tuned now on the stored held-out
        rows (k up to their depth); a single list needs no tuning (exact)."""
        if self.nlist == 1:
            self._recall.setdefault(k, 1.0)
            return 1
        if k not in self._nprobe:
            from npos.knn.store_index_build import tune_nprobe

            truth = np.load(Path(self.path, TRUTH_FILE), allow_pickle=False)
            if k > truth.shape[1]:
                raise ParameterError(
                    f"k={k} is deeper than index {self.path!r} was tuned for (at most "
                    f"{truth.shape[1]}); rebuild it with --k {k}")
            heldout = np.load(Path(self.path, HELDOUT_FILE), allow_pickle=False)
            queries = np.load(Path(self.path, QUERIES_FILE), allow_pickle=False)
            self._nprobe[k], self._recall[k] = tune_nprobe(
                self, queries, heldout, truth, k, self.meta["target_recall"])
        return self._nprobe[k]

    def list_probe_for(self, k: int) -> int:
        """Lists scored per list by the every-row pass (:meth:`kth_every_row`) for depth
        ``k``: tuned at build time, or now on the stored held-out rows."""
        if k not in self._list_probe:
            from npos.knn.store_index_lists import tune_list_probe

            self.nprobe_for(k)  # the same depth checks
            held = np.load(Path(self.path, HELDOUT_FILE), allow_pickle=False)
            truth = np.load(Path(self.path, TRUTH_FILE), allow_pickle=False)
            self._list_probe[k], _ = tune_list_probe(self, held, truth, k,
                                                     self.meta["target_recall"])
        return self._list_probe[k]

    def kth_every_row(self, k: int, **options: Any) -> np.ndarray:
        """Distance of every indexed row to its k-th nearest *other* indexed row, shape (n,),
        aligned with :attr:`rows`, computed list by list
        (:func:`~npos.knn.store_index_lists.list_kth_distance`, CPU index; ``options`` go
        there)."""
        from npos.knn.store_index_lists import list_kth_distance

        rows, dist = list_kth_distance(self, k, **options)
        out = np.empty(self.n, np.float32)
        out[np.searchsorted(self.rows, rows)] = dist
        return out

    def _search_unit(self, unit: np.ndarray, k: int, nprobe: int, selector: Any = None,
                     ) -> tuple[np.ndarray, np.ndarray]:
        nprobe = min(nprobe, self.nlist)
        if selector is not None:  # per-call parameters: the index's own nprobe is untouched
            faiss = import_faiss("a filtered search")
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            d2, ids = self.index.search(unit, k, params=params)
        else:
            set_nprobe(self.index, nprobe, on_gpu=self.on_gpu)
            d2, ids = self.index.search(unit, k)
        dist = np.sqrt(np.clip(d2, 0.0, None))
        dist[ids < 0] = np.inf
        return dist, ids

    def search(self, queries: Any, k: int, *, exclude_rows: Any = None,
               nprobe: int | None = None, among: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed rows of each query (normalized here).

        Parameters
        ----------
        queries : ndarray or Tensor of shape (n, D)
        k : int
        exclude_rows : array of shape (n,), optional
            A store row per query that must not count as its neighbour (the query itself).
        nprobe : int, optional
            Lists probed (default :meth:`nprobe_for` k).
        among : array of int, optional
            Search only these store rows (e.g. one class: a label filter; a faiss
            ``IDSelectorBatch``, CPU only). The tuned nprobe assumed every row eligible: a
            small subset leaves fewer candidates in the probed lists, so pass a larger
            ``nprobe`` (missing neighbours come back as -1 / +inf).

        Returns
        -------
        D : ndarray of shape (n, k)
            float32 distances, ascending (+inf where the probed lists held fewer than k).
        I : ndarray of shape (n, k)
            int64 store rows (-1 there).
        """
        check_int("k", k, 1, self.n - (exclude_rows is not None), owner="the store index")
        probe = nprobe if nprobe is not None else self.nprobe_for(k)
        selector = None
        if among is not None:
            if self.on_gpu:
                raise ParameterError("a filtered search (among=...) runs on a CPU index; "
                                     "open it with device='cpu'")
            selector = import_faiss("a filtered search").IDSelectorBatch(
                np.ascontiguousarray(among, dtype=np.int64))
        depth = k + (exclude_rows is not None)
        dists, ids = [], []
        unit_all = queries
        for start in range(0, len(unit_all), SEARCH_BLOCK):
            unit = _unit(unit_all[start:start + SEARCH_BLOCK])
            if unit.shape[1] != self.dim:
                raise ParameterError(f"queries have dimension {unit.shape[1]} but index "
                                     f"{self.path!r} has dimension {self.dim}")
            d, i = self._search_unit(unit, depth, probe, selector)
            if exclude_rows is not None:
                own = np.asarray(exclude_rows[start:start + SEARCH_BLOCK], dtype=np.int64)
                d, i = drop_rows(d, i, own, k)
            dists.append(d)
            ids.append(i)
        if not dists:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(dists), np.concatenate(ids)

    def kth_distance(self, queries: Any, k: int, *, exclude_self: bool = False,
                     rows: Any = None, **search_options: Any) -> np.ndarray:
        """Distance of each query to its k-th nearest indexed row, shape (n,).

        With ``exclude_self`` the queries are indexed rows: ``rows`` gives their store rows
        (default: all indexed rows in order, i.e. ``queries`` is every valid row), and a row
        never counts as its own neighbour. ``search_options`` (``nprobe``, ``among``) go to
        :meth:`search`.
        """
        if exclude_self and rows is None:
            if len(queries) != self.n:
                raise ParameterError(
                    f"exclude_self needs the store rows of the queries (rows=...), or all "
                    f"{self.n} indexed rows as queries; got {len(queries)} rows")
            rows = self.rows
        dist, _ = self.search(queries, k, exclude_rows=rows if exclude_self else None,
                              **search_options)
        return dist[:, k - 1] if len(dist) else np.zeros(0, np.float32)

    def __repr__(self) -> str:
        return (f"StoreIndex({self.path!r}, rows={self.n}, codec={self.meta['codec']!r}, "
                f"nlist={self.nlist})")


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def check_store_meta(meta: dict[str, Any], path: str, store: Any) -> None:
    """Refuse (:class:`IndexMismatchError`, one line) an index whose ``meta`` does not
    describe ``store`` as it is now: another encoder fingerprint or dim; or another content
    stamp, reported as *another store* when the index was built from a different location
    and as *stale* when built from this one. A store copied or moved whole is accepted."""
    store = _as_store(store)
    built = meta["store"]
    what = f"index {path!r}"
    other = (f"{what} was built for another store ({built['url']!r}), not {store.url!r}; "
             f"build one for it with 'npos index build {store.url}'")
    if dict(built["fingerprint"]) != store.fingerprint() or built["dim"] != store.dim:
        raise IndexMismatchError(f"{other} (the encoders differ)")
    if built["n_rows"] != store.n_rows or built["stamp"] != store_stamp(store):
        if not _same_place(built["url"], store.url):
            raise IndexMismatchError(other)
        raise IndexMismatchError(
            f"{what} is stale: store {store.url!r} changed since the index was built "
            f"({built['n_rows']} rows then, {store.n_rows} now); rebuild it with "
            f"'npos index build {store.url} --overwrite'")


def _as_store(store: Any) -> Any:
    if store is None or hasattr(store, "fingerprint"):
        return store
    from npos.store import FeatureStore

    return FeatureStore.open(str(store))


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise IndexMismatchError(f"no store index at {str(folder)!r} (expected a folder "
                                 f"with {META_FILE}; build one with 'npos index build')")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IndexMismatchError(f"{str(meta_file)!r} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise IndexMismatchError(f"{str(folder)!r} is not an npos store index (format="
                                 f"{meta.get('format')!r}, expected {FORMAT!r})")
    return meta
