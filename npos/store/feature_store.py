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

This module holds the class, its creation, opening and attributes; the schema constants live
in :mod:`npos.store.schema` (re-exported here), reading in :mod:`npos.store.reading`, writing
in :mod:`npos.store.writing` and chunk-file checks in :mod:`npos.store.chunks` (mixins).
"""


from __future__ import annotations

import datetime as _dt
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import zarr

from npos import __version__
from npos.atomic import writing
from npos.errors import IncompatibleStoreError, ParameterError, StoreError, StoreExistsError
from npos.store.chunks import MARKER, WRITE_CONFIG
from npos.store.identity import IDENTITY_KEYS, check_fingerprints
from npos.store.lock import WriterLock
from npos.store.reading import StoreReading
# The schema names are re-exported here, their historical home: callers import them from
# npos.store.feature_store (or npos.store).
from npos.store.schema import (CORE_ARRAYS, CREATING, DEFAULT_CHUNK_ROWS, DIMENSION_NAMES,
                               EMBEDDING_DTYPES, KINDS, SCHEMA, _describe_mismatch,
                               _group_array, _jsonable, _kind_phrase, _open_group,
                               _refuse_foreign_path, store_exists)
from npos.store.writing import StoreWriting, _writes

__all__ = ["CORE_ARRAYS", "CREATING", "DEFAULT_CHUNK_ROWS", "DIMENSION_NAMES",
           "EMBEDDING_DTYPES", "IDENTITY_KEYS", "KINDS", "SCHEMA", "FeatureStore",
           "store_exists"]


class FeatureStore(StoreReading, StoreWriting):
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
            with writing(str(url), "store"):
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
                    f"{str(url)!r} already exists; pass --overwrite to replace it")
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

        # Mode "w" first removes an old store. Until the attributes are written in one put at
        # the end, the group says it is being created: a creation stopped half way (a full
        # disk, kill -9) is then simply redone, never read as a store.
        group = zarr.open_group(str(url), mode="w", attributes={CREATING: True})
        n_chunks = math.ceil(n_rows / chunk_rows)
        for name, shape, chunks, arr_dtype, fill in (
                ("embeddings", (n_rows, dim), (chunk_rows, dim), dtype, float("nan")),
                ("labels", (n_rows,), (chunk_rows,), "int32", -1),
                ("ids", (n_rows,), (chunk_rows,), str, None),
                ("done", (n_chunks,), (1,), "bool", False)):
            group.create_array(name, shape=shape, chunks=chunks, dtype=arr_dtype,
                               fill_value=fill, dimension_names=DIMENSION_NAMES[name],
                               config=WRITE_CONFIG)
        group.attrs.put({
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

    @_writes
    def update_attrs(self, **values: Any) -> None:
        """Set group attributes (e.g. the ``failed`` list after extraction)."""
        self._require_writable()
        # One put of the whole attribute set: zarr's attrs.update writes once per key, so a
        # fault half way would leave some keys written and others not.
        self._group.attrs.put({**self.attrs, **_jsonable(values)})

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

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, kind={self.kind!r}, rows={self.n_rows}, "
                f"dim={self.dim}, dtype={self.dtype!r})")
