"""`FeatureStore`: one dataset split encoded by one encoder, as a chunked Zarr v3 group.

Layout (see the README's "Store format"):

========================  ===========  =========  ==========================================
array                     shape        dtype      notes
========================  ===========  =========  ==========================================
``embeddings``            (N, D)       f16 / f32  chunked by ``chunk_rows`` rows; NaN fill
``labels``                (N,)         int32      -1 where unlabeled
``ids``                   (N,)         string     relative path or caller-given id
``done``                  (n_chunks,)  bool       chunk completion mask (one zarr chunk each)
``valid``                 (N,)         bool       optional: False for rows whose input failed
``text_embeddings``       (C, D)       float32    optional: zero-shot class embeddings
``tokens`` and others     (N, ...)     any        optional row-aligned arrays
========================  ===========  =========  ==========================================

Write protocol: a chunk's rows are written to every row-aligned array, *then* its ``done``
flag. Readers trust only done chunks, so a killed writer never leaves trusted garbage, and
writers on different processes touch disjoint chunks (``done`` has one zarr chunk per store
chunk, so flags never share a file). Every chunk gets a file, even one equal to the fill value
(:mod:`npos.store.chunks`), so readers refuse a done chunk whose file is lost in an array they
read. One writer process at a time: writing takes the store's lock (:mod:`npos.store.lock`).
Every array carries Zarr v3 ``dimension_names`` (``row``, ``dim``, ``class``, ``token``,
``width``, ``chunk``), so ``xarray.open_zarr`` opens any store.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import zarr

from npos import __version__
from npos.errors import (IncompatibleStoreError, ParameterError, StoreError, StoreExistsError,
                         StoreNotFoundError)
from npos.store.chunks import MARKER, WRITE_CONFIG, ChunkFiles
from npos.store.identity import IDENTITY_KEYS, check_fingerprints
from npos.store.lock import WriterLock

SCHEMA = "npos.features/1"
KINDS = ("features", "outliers", "scores", "text-bank")
EMBEDDING_DTYPES = ("float16", "float32")
#: Row-aligned arrays every store has.
CORE_ARRAYS = ("embeddings", "labels", "ids", "done")
DEFAULT_CHUNK_ROWS = 4096
#: Zarr v3 dimension names of the arrays with fixed meanings; other row-aligned arrays get
#: ``("row", "<name>_1", ...)`` and other whole arrays ``("<name>_0", ...)``.
DIMENSION_NAMES = {"embeddings": ("row", "dim"), "labels": ("row",), "ids": ("row",),
                   "done": ("chunk",), "valid": ("row",), "error": ("row",),
                   "knn_distance": ("row",), "tokens": ("row", "token", "width"),
                   "text_embeddings": ("class", "dim")}


def _dimension_names(name: str, ndim: int, *, rows: bool) -> tuple[str, ...]:
    known = DIMENSION_NAMES.get(name)
    if known is not None and len(known) == ndim:
        return known
    if rows:
        return ("row", *(f"{name}_{i}" for i in range(1, ndim)))
    return tuple(f"{name}_{i}" for i in range(ndim))


def _kind_phrase(kinds: Sequence[str]) -> str:
    return " or ".join(f"{'an' if k[0] in 'aeiou' else 'a'} {k} store" for k in kinds)


def _open_group(url: str, mode: Literal["r", "r+"]) -> zarr.Group:
    try:
        return zarr.open_group(str(url), mode=mode)
    except FileNotFoundError:  # zarr's GroupNotFoundError derives from it too
        raise StoreNotFoundError(f"no feature store at {str(url)!r}") from None


def _group_array(group: zarr.Group, name: str, url: str) -> zarr.Array:
    """``group[name]``, which must be an array (zarr types it as array or subgroup)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"store {url!r}: {name!r} is a group, not an array")
    return node


def store_exists(url: str) -> bool:
    """True when a Zarr group (of any kind) exists at ``url``."""
    try:
        _open_group(url, "r")
    except StoreNotFoundError:
        return False
    return True


def _refuse_foreign_path(url: str) -> None:
    """Creating a store empties its location: never do that to something that is not an
    npos store (a file, a non-empty folder, another Zarr group), ``overwrite`` or not."""
    if store_exists(url):
        schema = dict(_open_group(url, "r").attrs).get("schema")
        if schema != SCHEMA:
            raise StoreExistsError(f"{url!r} is a Zarr group but not an npos store; it will "
                                   "not be replaced (choose another output)")
        return
    if "://" in url or not os.path.exists(url):
        return
    if not os.path.isdir(url) or os.listdir(url):
        raise StoreExistsError(f"{url!r} exists and is not a feature store; it will not be "
                               "replaced (choose another output)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_string(dtype: Any) -> bool:
    return dtype is str or isinstance(dtype, np.dtypes.StringDType) or \
        np.dtype(dtype).kind in "OUT"


def _describe_mismatch(key: str, stored: Any, wanted: Any) -> str:
    return f"it was made with {key}={stored!r} but this run uses {key}={wanted!r}"


class FeatureStore(ChunkFiles):
    """A Zarr v3 feature store. Create with :meth:`create`, open with :meth:`open`.

    Parameters are never passed to the constructor directly; it wraps an open group.

    Attributes
    ----------
    url : str
        Where the store lives (local path or fsspec URL such as ``memory://x``, ``s3://b/k``).
    """

    def __init__(self, group: zarr.Group, url: str, *, writable: bool,
                 lock: WriterLock | None = None) -> None:
        self._group = group
        self.url = str(url)
        self.writable = writable
        attrs = dict(group.attrs)
        if attrs.get("schema") != SCHEMA:
            raise StoreError(
                f"{self.url!r} is not an npos store (schema={attrs.get('schema')!r}, "
                f"expected {SCHEMA!r})")
        self._arrays: dict[str, zarr.Array] = {}
        self._keys: dict[str, set[str]] = {}  # listed chunk keys per array (see chunk_files)
        self._checked: set[str] = set()  # arrays whose done chunks all have their files
        self._row_names: list[str] | None = None
        self._lock = lock
        if lock is not None:  # released when the store is closed, collected, or at exit
            weakref.finalize(self, lock.release)

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(
        cls,
        url: str,
        *,
        n_rows: int,
        dim: int,
        dtype: str = "float16",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        kind: str = "features",
        class_names: Sequence[str] | None = None,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> FeatureStore:
        """Create a store with the core arrays, or reopen a compatible one to resume.

        Parameters
        ----------
        url : str
            Local directory or fsspec URL.
        n_rows, dim : int
            Number of rows N and embedding dimension D.
        dtype : {"float16", "float32"}
            Storage dtype of ``embeddings``.
        chunk_rows : int
            Rows per chunk: the unit of writing, resuming and sharding across processes.
        kind : {"features", "outliers", "scores"}
        class_names : sequence of str, optional
            Names of the label ids 0..C-1.
        attrs : mapping, optional
            Further group attributes: ``model``, ``pretrained``, ``preprocess``,
            ``token_layer``, ``source``, and for derived stores their parameters and seed.
        overwrite : bool
            Replace an existing store. Without it (and without ``resume``) an existing
            store is an error.
        resume : bool
            If a store exists and was made with the same shape, dtype, chunking, identity
            attributes and ``source``, open it for writing so the caller can fill only its
            missing chunks. A store made differently is refused.
        """
        n_rows, dim, chunk_rows = int(n_rows), int(dim), int(chunk_rows)
        if n_rows < 1:
            raise ParameterError(f"a store needs at least one row; got n_rows={n_rows}")
        if dim < 1:
            raise ParameterError(f"dim must be >= 1; got {dim}")
        if chunk_rows < 1:
            raise ParameterError(f"chunk_rows must be >= 1; got {chunk_rows}")
        if dtype not in EMBEDDING_DTYPES:
            raise ParameterError(f"dtype must be one of {EMBEDDING_DTYPES}; got {dtype!r}")
        if kind not in KINDS:
            raise ParameterError(f"kind must be one of {KINDS}; got {kind!r}")
        attrs = _jsonable(dict(attrs or {}))
        class_names = list(class_names) if class_names is not None else None

        _refuse_foreign_path(str(url))
        lock = WriterLock(str(url)).acquire()  # before anything is read, replaced or written
        try:
            return cls._create_locked(url, lock, n_rows=n_rows, dim=dim, dtype=dtype,
                                      chunk_rows=chunk_rows, kind=kind,
                                      class_names=class_names, attrs=attrs,
                                      overwrite=overwrite, resume=resume)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create_locked(cls, url, lock, *, n_rows, dim, dtype, chunk_rows, kind, class_names,
                       attrs, overwrite, resume) -> FeatureStore:
        if store_exists(url) and not overwrite:
            if not resume:
                raise StoreExistsError(
                    f"{str(url)!r} already exists; pass --overwrite (overwrite=True) to replace it")
            store = cls(_open_group(url, "r+"), url, writable=True, lock=lock)
            wanted = {"n_rows": n_rows, "dim": dim, "dtype": dtype, "chunk_rows": chunk_rows,
                      "kind": kind, "class_names": class_names,
                      **{k: attrs.get(k) for k in (*IDENTITY_KEYS, "token_layer", "source")
                         if k in attrs}}
            for key, value in wanted.items():
                if store.attrs.get(key) != value:
                    raise IncompatibleStoreError(
                        f"cannot resume into {store.url!r}: "
                        f"{_describe_mismatch(key, store.attrs.get(key), value)}; "
                        "pass --overwrite to start over")
            return store

        group = zarr.open_group(str(url), mode="w")  # mode "w" first removes an old store
        n_chunks = math.ceil(n_rows / chunk_rows)
        for name, shape, chunks, arr_dtype, fill in (
                ("embeddings", (n_rows, dim), (chunk_rows, dim), dtype, float("nan")),
                ("labels", (n_rows,), (chunk_rows,), "int32", -1),
                ("ids", (n_rows,), (chunk_rows,), str, None),
                ("done", (n_chunks,), (1,), "bool", False)):
            group.create_array(name, shape=shape, chunks=chunks, dtype=arr_dtype,
                               fill_value=fill, dimension_names=DIMENSION_NAMES[name],
                               config=WRITE_CONFIG)
        group.attrs.update({
            **attrs,
            "schema": SCHEMA,
            "kind": kind,
            "n_rows": n_rows,
            "dim": dim,
            "dtype": dtype,
            "chunk_rows": chunk_rows,
            "class_names": class_names,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "npos_version": __version__,
            MARKER: True,
        })
        return cls(group, url, writable=True, lock=lock)

    @classmethod
    def open(cls, url: str, mode: Literal["r", "r+"] = "r", *, kinds: Sequence[str] | None = None,
             what: str | None = None) -> FeatureStore:
        """Open an existing store, read-only (``"r"``) or for writing (``"r+"``).

        Parameters
        ----------
        kinds : sequence of str, optional
            The kinds the caller takes (e.g. ``("features",)``); another kind is refused
            with :class:`~npos.errors.StoreError` (see :meth:`check_kind`).
        what : str, optional
            Who is opening it, for that message (e.g. ``"synthesize"``).

        Opening for writing takes the store's lock (:class:`~npos.store.lock.WriterLock`):
        a store another process is writing is refused, naming that process.
        """
        if mode not in ("r", "r+"):  # checked at run time too: callers pass strings
            raise ParameterError(f"mode must be 'r' or 'r+'; got {mode!r}")
        group = _open_group(url, mode)
        lock = WriterLock(str(url)).acquire() if mode == "r+" else None
        try:
            store = cls(group, url, writable=mode == "r+", lock=lock)
            if kinds is not None:
                store.check_kind(kinds, what=what)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return store

    def check_kind(self, kinds: Sequence[str], *, what: str | None = None) -> None:
        """Raise :class:`~npos.errors.StoreError` unless this store's ``kind`` is in
        ``kinds``; the message names what was expected and what was found."""
        if self.kind not in kinds:
            who = f"{what} takes" if what else "expected"
            raise StoreError(f"{self.url!r} is {_kind_phrase([self.kind])}; {who} "
                             f"{_kind_phrase(kinds)}")

    def close(self) -> None:
        """Stop writing: release the lock (the store stays readable)."""
        self.writable = False
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties
    @property
    def attrs(self) -> dict[str, Any]:
        """The group attributes, as a plain dict (a copy)."""
        return dict(self._group.attrs)

    def update_attrs(self, **values: Any) -> None:
        """Set group attributes (e.g. the ``failed`` list after extraction)."""
        self._require_writable()
        self._group.attrs.update(_jsonable(values))

    @property
    def n_rows(self) -> int:
        return int(self._attr("n_rows"))

    @property
    def dim(self) -> int:
        return int(self._attr("dim"))

    @property
    def dtype(self) -> str:
        return str(self._attr("dtype"))

    @property
    def chunk_rows(self) -> int:
        return int(self._attr("chunk_rows"))

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    @property
    def kind(self) -> str:
        return str(self._attr("kind"))

    @property
    def class_names(self) -> list[str] | None:
        names = self._attr("class_names", None)
        return list(names) if names is not None else None

    def _attr(self, key: str, *default: Any) -> Any:
        # zarr types attribute values as JSON (a union); the schema fixes each key's type.
        attrs = self._group.attrs
        return attrs.get(key, *default) if default else attrs[key]

    def fingerprint(self) -> dict[str, Any]:
        """The identity attributes (encoder, weights, preprocessing, dim) of this store."""
        attrs = self.attrs
        return {key: attrs.get(key) for key in IDENTITY_KEYS}

    def check_compatible(self, fingerprint: Mapping[str, Any], *, what: str) -> None:
        """Raise :class:`IncompatibleStoreError` unless ``fingerprint`` matches this store's.

        ``what`` names the other side in the message, e.g. ``"head 'runs/head'"``. Stores of
        unknown encoder combine only with each other, with a warning
        (:mod:`npos.store.identity`).
        """
        check_fingerprints(self.fingerprint(), fingerprint, what=what, url=self.url)

    def has(self, name: str) -> bool:
        """True when the store holds an array called ``name``."""
        return name in self._arrays or name in set(self._group.array_keys())

    def _array(self, name: str) -> zarr.Array:
        # Listing a group costs a store round trip per call (slow on object stores), so
        # array handles are cached; arrays are only ever added, or replaced via set_array.
        if name not in self._arrays:
            if not self.has(name):
                raise StoreError(f"store {self.url!r} has no array {name!r}")
            self._arrays[name] = _group_array(self._group, name, self.url).with_config(
                WRITE_CONFIG)
        return self._arrays[name]

    def array(self, name: str) -> zarr.Array:
        """The underlying zarr array (for advanced, read-only use).

        Refuses (:class:`~npos.errors.StoreError`) an array that lost the file of a done
        chunk: reading it would silently give fill values (see :meth:`require_chunks`).
        """
        self.require_chunks(name)
        return self._array(name)

    # ------------------------------------------------------------------ chunks
    def chunk_slice(self, index: int) -> slice:
        """Rows covered by chunk ``index``."""
        if not 0 <= index < self.n_chunks:
            raise ParameterError(f"chunk index {index} out of range [0, {self.n_chunks})")
        start = index * self.chunk_rows
        return slice(start, min(start + self.chunk_rows, self.n_rows))

    def done_mask(self) -> np.ndarray:
        """Boolean mask of completed chunks, shape (n_chunks,)."""
        return np.asarray(self._array("done")[:], dtype=bool)

    def missing_chunks(self) -> list[int]:
        """Indices of chunks not yet marked done."""
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    @property
    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"store {self.url!r} is open read-only")

    def add_array(self, name: str, row_shape: Sequence[int], dtype: str, *,
                  fill_value: Any = None, chunk_rows: int | None = None,
                  dimension_names: Sequence[str] | None = None) -> zarr.Array:
        """Create an optional row-aligned array of shape (N, *row_shape); reuse if present.

        ``chunk_rows`` must divide the store's ``chunk_rows`` so chunk writes stay aligned
        (useful for large rows such as tokens); by default it equals it.
        ``dimension_names`` name the dimensions after ``row`` (default: see
        :data:`DIMENSION_NAMES`). Rows of chunks already done get ``fill_value``.
        """
        self._require_writable()
        chunk_rows = self.chunk_rows if chunk_rows is None else int(chunk_rows)
        if chunk_rows < 1 or self.chunk_rows % chunk_rows:
            raise ParameterError(
                f"chunk_rows={chunk_rows} of array {name!r} must divide the store's "
                f"chunk_rows={self.chunk_rows}")
        shape = (self.n_rows, *map(int, row_shape))
        if self.has(name):
            existing = _group_array(self._group, name, self.url)
            same_dtype = (_is_string(existing.dtype) and _is_string(dtype)) or \
                (not _is_string(dtype) and existing.dtype == np.dtype(dtype))
            if tuple(existing.shape) != shape or not same_dtype:
                raise IncompatibleStoreError(
                    f"store {self.url!r} already has {name!r} with shape "
                    f"{tuple(existing.shape)} and dtype {existing.dtype}; wanted {shape} {dtype}")
            return self._array(name)
        if fill_value is None and np.dtype(dtype).kind == "f":
            fill_value = float("nan")
        dims = (("row", *dimension_names) if dimension_names is not None
                else _dimension_names(name, len(shape), rows=True))
        arr = self._group.create_array(
            name, shape=shape, chunks=(chunk_rows, *shape[1:]), dtype=dtype,
            fill_value=fill_value, dimension_names=dims, config=WRITE_CONFIG)
        self._arrays[name] = arr
        self._row_names = None
        if self.checks_chunk_files:  # done chunks must have a file in every array
            for index in np.flatnonzero(self.done_mask()):
                rows = self.chunk_slice(int(index))
                arr[rows] = np.full((rows.stop - rows.start, *shape[1:]), arr.fill_value,
                                    dtype=arr.dtype)
        return arr

    def set_array(self, name: str, data: np.ndarray) -> None:
        """Write a whole non-row array such as ``text_embeddings`` (C, D) in one go."""
        self._require_writable()
        data = np.asarray(data)
        if self.has(name):
            del self._group[name]
            self._arrays.pop(name, None)
        self._keys.pop(name, None)
        self._checked.discard(name)
        self._row_names = None
        arr = self._group.create_array(
            name, shape=data.shape, dtype=data.dtype, chunks=data.shape or "auto",
            dimension_names=_dimension_names(name, data.ndim, rows=False), config=WRITE_CONFIG)
        arr[...] = data

    def write_chunk(self, index: int, **arrays: np.ndarray) -> None:
        """Write the rows of chunk ``index`` to the given row-aligned arrays, then mark it done.

        Every array passed must have exactly the chunk's number of rows; ``embeddings`` is
        required. Row-aligned arrays not passed get their fill values (labels -1, ids "").
        """
        self._require_writable()
        rows = self.chunk_slice(index)
        n = rows.stop - rows.start
        if "embeddings" not in arrays:
            raise ParameterError("write_chunk needs 'embeddings'")
        for name, data in arrays.items():
            data = np.asarray(data)
            if data.shape[:1] != (n,):
                raise ParameterError(
                    f"chunk {index} covers {n} rows but {name!r} has shape {data.shape}")
            self._array(name)[rows] = data
        if self.checks_chunk_files:  # a file for every array: a lost one is then visible
            for name in self._row_arrays():
                if name not in arrays:
                    arr = self._array(name)
                    arr[rows] = np.full((n, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
        self._array("done")[index] = True

    def _row_arrays(self) -> list[str]:
        if self._row_names is None:  # listing the group is a round trip: once per change
            self._row_names = [n for n in self._group.array_keys() if self.is_row_array(n)]
        return self._row_names

    def mark_undone(self, chunks: Sequence[int]) -> None:
        """Clear the ``done`` flag of ``chunks`` so the next run writes them again (repair)."""
        self._require_writable()
        done = self._array("done")
        for index in chunks:
            done[int(index)] = False

    def write_all(self, *, progress: bool = False, **arrays: np.ndarray) -> None:
        """Write whole arrays (N rows each) chunk by chunk; convenient for derived stores."""
        from tqdm.auto import tqdm

        for index in tqdm(range(self.n_chunks), desc="writing", unit="chunk",
                          disable=not progress):
            rows = self.chunk_slice(index)
            self.write_chunk(index, **{k: np.asarray(v)[rows] for k, v in arrays.items()})

    # ------------------------------------------------------------------ reading
    def readable_rows(self, *, complete: bool = True) -> np.ndarray:
        """Mask (N,) of rows a reader may use: rows of done chunks that are not invalid.

        With ``complete=True`` (the default for every stage) an unfinished store is an error
        rather than a silently smaller dataset.
        """
        done = self.done_mask()
        if complete and not done.all():
            raise StoreError(
                f"store {self.url!r} is incomplete: {int(done.sum())}/{done.size} chunks done "
                "(finish the run that writes it, or check it with 'npos store verify')")
        mask = np.repeat(done, self.chunk_rows)[: self.n_rows]
        if self.has("valid"):
            mask &= self.read_rows("valid").astype(bool)
        return mask

    def read(self, name: str = "embeddings", *, complete: bool = True, dtype: str | None = None,
             as_torch: bool = False):
        """Read the readable rows of a row-aligned array (see :meth:`readable_rows`).

        Returns a numpy array (or a torch tensor with ``as_torch=True``), cast to ``dtype``
        when given.
        """
        mask = self.readable_rows(complete=complete)
        data = self.read_rows(name)[mask]
        return self._convert(data, dtype, as_torch)

    def read_extra(self, name: str, *, dtype: str | None = None, as_torch: bool = False):
        """Read a whole non-row array such as ``text_embeddings``."""
        return self._convert(self.read_rows(name), dtype, as_torch)

    @staticmethod
    def _convert(data: np.ndarray, dtype: str | None, as_torch: bool):
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        if as_torch:
            import torch

            if data.dtype.kind in "OUT":
                raise ParameterError("string arrays cannot be returned as torch tensors")
            return torch.from_numpy(np.ascontiguousarray(data))
        return data

    def iter_batches(self, batch_rows: int, names: Sequence[str] = ("embeddings",), *,
                     complete: bool = True, dtype: str | None = None,
                     as_torch: bool = False) -> Iterator[dict[str, Any]]:
        """Yield dicts of readable rows, ``batch_rows`` stored rows at a time.

        Each dict maps every requested name to its rows, plus ``"row"``: the rows' positions
        in the store. Every readable row appears in exactly one batch, in order. ``dtype``
        applies to floating arrays only.
        """
        if batch_rows < 1:
            raise ParameterError(f"batch_rows must be >= 1; got {batch_rows}")
        mask = self.readable_rows(complete=complete)
        for name in names:  # refuse lost chunk files before the first batch
            self.require_chunks(name)
        for start in range(0, self.n_rows, batch_rows):
            stop = min(start + batch_rows, self.n_rows)
            keep = mask[start:stop]
            if not keep.any():
                continue
            batch: dict[str, Any] = {"row": np.arange(start, stop)[keep]}
            for name in names:
                data = self.read_rows(name, start, stop)[keep]
                cast = dtype if data.dtype.kind == "f" else None
                batch[name] = self._convert(data, cast, as_torch and data.dtype.kind not in "OUT")
            if as_torch:
                import torch

                batch["row"] = torch.from_numpy(batch["row"])
            yield batch

    # ------------------------------------------------------------------ inspection
    def failed_rows(self, *, recompute: bool = False) -> list[dict[str, str]]:
        """Rows (of done chunks) whose input failed, as ``[{"id": ..., "reason": ...}]``: the
        ``failed`` attribute written at the end of a run, or, with ``recompute`` or without
        it, read from the ``valid`` and ``error`` arrays."""
        failed = None if recompute else self.attrs.get("failed")
        if failed is not None:
            return [dict(row) for row in failed]
        if not self.has("valid"):
            return []
        rows = np.flatnonzero(~np.asarray(self.array("valid")[:], dtype=bool)
                              & np.repeat(self.done_mask(), self.chunk_rows)[: self.n_rows])
        ids = np.asarray(self.array("ids")[:])[rows]
        reasons = (np.asarray(self.array("error")[:])[rows] if self.has("error")
                   else [""] * rows.size)
        return [{"id": str(i), "reason": str(r)} for i, r in zip(ids, reasons, strict=True)]

    def info(self) -> dict[str, Any]:
        """A summary: rows, dim, dtype, kind, model, classes, chunks done."""
        attrs = self.attrs
        done = self.done_mask()
        names = self.class_names
        return {
            "url": self.url,
            "kind": self.kind,
            "rows": self.n_rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "model": attrs.get("model"),
            "pretrained": attrs.get("pretrained"),
            "classes": len(names) if names is not None else None,
            "chunks_done": int(done.sum()),
            "chunks_total": int(done.size),
            "arrays": sorted(self._group.array_keys()),
            "failed": len(attrs.get("failed") or []),
            "created": attrs.get("created"),
        }

    def verify(self, *, check_values: bool = True, batch_rows: int = 65536,
               progress: bool = False) -> list[str]:
        """Check every array; return one human-readable line per problem (empty = healthy).

        See :func:`npos.store.verify.find_problems` for what is checked.
        """
        from npos.store.verify import find_problems

        return [p.message for p in find_problems(self, check_values=check_values,
                                                 batch_rows=batch_rows, progress=progress)]

    def damaged_chunks(self, *, check_values: bool = True) -> list[int]:
        """Done chunks with a lost file or bad values in any array: what a re-run repairs."""
        from npos.store.verify import find_problems

        chunks: set[int] = set()
        for problem in find_problems(self, check_values=check_values):
            chunks.update(problem.chunks)
        return sorted(chunks)

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, kind={self.kind!r}, rows={self.n_rows}, "
                f"dim={self.dim}, dtype={self.dtype!r})")
