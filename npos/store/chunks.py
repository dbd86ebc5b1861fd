"""Which chunk files of a Zarr array exist: the store's keys, listed once and cached.

A lost chunk file reads back as the array's fill value (NaN embeddings, -1 labels, empty
ids), so it cannot be recognized by its values. Stores created by this version of npos write
every chunk, even one equal to the fill value (the group attribute :data:`MARKER`), so a done
chunk without its file is damage, found by listing the store's keys.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from npos.errors import StoreError

#: Group attribute of stores whose every written chunk has a file (``write_empty_chunks``).
MARKER = "all_chunks_stored"
#: Array configuration used for every write: chunks equal to the fill value still get a file.
#: (Typed Any: zarr types it as its ``ArrayConfigParams`` TypedDict, not a plain dict.)
WRITE_CONFIG: Any = {"write_empty_chunks": True}


def list_chunk_keys(arr: zarr.Array) -> set[str]:
    """Keys (relative to the array, e.g. ``"c/3/0"``) of the chunk files ``arr`` has."""
    from zarr.core.sync import sync

    store, path = arr.store_path.store, arr.store_path.path
    prefix = f"{path}/" if path else ""

    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return {key[len(prefix):] for key in sync(collect())}


def _grid(arr: zarr.Array) -> list[int]:
    return [math.ceil(s / c) if s else 0 for s, c in zip(arr.shape, arr.chunks, strict=True)]


def chunk_keys(arr: zarr.Array, rows: Iterable[int] | None = None) -> list[tuple[int, str]]:
    """``(first row chunk, key)`` of every chunk of ``arr``, or of the chunks holding the
    given row-chunk indices (along axis 0) only."""
    grid = _grid(arr)
    if not grid or 0 in grid:
        return []
    first = range(grid[0]) if rows is None else [r for r in rows if 0 <= r < grid[0]]
    out = []
    for r in first:
        for rest in itertools.product(*(range(g) for g in grid[1:])):
            out.append((r, arr.metadata.encode_chunk_key((r, *rest))))
    return out


def row_chunks_of(arr: zarr.Array, store_chunk: int, chunk_rows: int) -> range:
    """Indices (along axis 0) of the chunks of a row-aligned ``arr`` inside one store chunk
    of ``chunk_rows`` rows (an array's row chunking divides the store's)."""
    per = max(1, chunk_rows // arr.chunks[0])
    return range(store_chunk * per, (store_chunk + 1) * per)


class ChunkFiles:
    """The chunk-file checks of :class:`~npos.store.FeatureStore` (a mixin: it uses the
    store's ``_array``, ``done_mask``, ``chunk_slice`` and its caches ``_keys``/``_checked``)."""

    # What the mixins (this one and its subclasses StoreReading and StoreWriting) use of
    # FeatureStore, for the type checker only.
    if TYPE_CHECKING:
        url: str
        writable: bool
        _group: zarr.Group
        _arrays: dict[str, zarr.Array]
        _keys: dict[str, set[str]]
        _checked: set[str]
        _row_names: list[str] | None

        @property
        def attrs(self) -> dict[str, Any]: ...
        @property
        def kind(self) -> str: ...
        @property
        def n_rows(self) -> int: ...
        @property
        def dim(self) -> int: ...
        @property
        def dtype(self) -> str: ...
        @property
        def n_chunks(self) -> int: ...
        @property
        def chunk_rows(self) -> int: ...
        @property
        def class_names(self) -> list[str] | None: ...
        def has(self, name: str) -> bool: ...
        def array(self, name: str) -> zarr.Array: ...
        def _array(self, name: str) -> zarr.Array: ...
        def chunk_slice(self, index: int) -> slice: ...
        def done_mask(self) -> np.ndarray: ...

    @property
    def checks_chunk_files(self) -> bool:
        """True when every written chunk has a file (stores made by this npos version); in
        older stores an absent file may just mean a chunk equal to the fill value."""
        return bool(self._group.attrs.get(MARKER))

    def is_row_array(self, name: str) -> bool:
        """True for arrays aligned with the store's rows (first dimension ``row``)."""
        arr = self._array(name)
        dims = getattr(arr.metadata, "dimension_names", None)  # Zarr v2 metadata has none
        if dims is not None:
            return dims[0] == "row"
        return name not in ("done", "text_embeddings") and arr.shape[:1] == (self.n_rows,)

    def lost_chunks(self, name: str, chunks: Sequence[int] | None = None) -> list[int]:
        """Done store chunks (all, or those of ``chunks``) whose file is missing in array
        ``name``. For a whole array (``text_embeddings``) ``[0]`` when any file is missing.
        ``done`` itself is never reported: a lost flag reads as "not done" and is redone."""
        if name == "done" or not self.checks_chunk_files:
            return []
        arr = self._array(name)
        if self.is_row_array(name):
            done = self.done_mask()
            wanted = [int(c) for c in (range(self.n_chunks) if chunks is None else chunks)
                      if done[c]]
            expected = {c: [k for _, k in chunk_keys(arr, row_chunks_of(arr, c, self.chunk_rows))]
                        for c in wanted}
        else:
            expected = {0: [k for _, k in chunk_keys(arr)]}
        if name not in self._keys:
            self._keys[name] = list_chunk_keys(arr)
        lost = [c for c, keys in expected.items() if any(k not in self._keys[name] for k in keys)]
        if lost:  # the cached listing may predate recent writes: list again before judging
            self._keys[name] = list_chunk_keys(arr)
            lost = [c for c in lost if any(k not in self._keys[name] for k in expected[c])]
        return lost

    def repair_hint(self) -> str:
        """How to repair this store, for messages."""
        attrs = self.attrs
        source = attrs.get("source") or {}
        if self.kind == "features" and "finetune" in attrs:
            how = "re-create it with the 'npos finetune' command that wrote it"
        elif self.kind == "features" and "root" in source:
            how = f"re-run 'npos extract ... --out {self.url}' (re-run to repair)"
        elif self.kind == "features" and "path" in source:
            how = f"re-run 'npos store import ... --out {self.url}' (re-run to repair)"
        else:
            how = {"outliers": "re-create it ('npos synthesize ... --overwrite')",
                   "scores": "re-create it ('npos score ... --overwrite')"}.get(
                       self.kind, "re-create it with --overwrite")
        return f"{how}; 'npos store verify {self.url}' lists all damage"

    def require_chunks(self, name: str, chunks: Sequence[int] | None = None) -> None:
        """Raise :class:`~npos.errors.StoreError` when a done chunk (of ``chunks``, default
        all) lost its file in array ``name``, naming store, array, chunk and the repair."""
        if name in self._checked and chunks is None:
            return
        lost = self.lost_chunks(name, chunks)
        if lost:
            where = f"chunk {lost[0]}"
            if self.is_row_array(name):
                rows = self.chunk_slice(lost[0])
                where += f" (rows {rows.start}..{rows.stop - 1})"
            more = f" and {len(lost) - 1} more chunk(s)" if len(lost) > 1 else ""
            raise StoreError(f"store {self.url!r} is damaged: array {name!r} lost the file of "
                             f"{where}{more}; {self.repair_hint()}")
        if chunks is None:
            self._checked.add(name)

    def read_rows(self, name: str, start: int | None = None, stop: int | None = None, *,
                  check_files: bool = True) -> np.ndarray:
        """Rows [start, stop) of array ``name`` (the whole array by default), refusing lost
        chunk files (:meth:`require_chunks`, unless not ``check_files``) and chunks that
        cannot be decoded: those raise :class:`ChunkReadError` naming the array, the chunk
        and how to repair."""
        if check_files:
            self.require_chunks(name)
        arr = self._array(name)
        try:
            return np.asarray(arr[start:stop] if start is not None else arr[...])
        except Exception as exc:  # any decoding failure is damage
            chunk, rows, cause = self._undecodable(name, start, stop, exc)
            where = f"chunk {chunk}" + (f" (rows {rows.start}..{rows.stop - 1})" if rows else "")
            raise ChunkReadError(
                f"store {self.url!r} is damaged: array {name!r} {where} cannot be read "
                f"({cause}); {self.repair_hint()}", name, chunk, rows, cause) from exc

    def _undecodable(self, name: str, start: int | None, stop: int | None,
                     exc: BaseException) -> tuple[int, slice | None, str]:
        """The first store chunk of rows [start, stop) that fails to decode, its rows, and
        why (one line)."""
        def why(e: BaseException) -> str:
            return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"

        if not self.is_row_array(name):
            return 0, None, why(exc)
        arr, start = self._array(name), start or 0
        last = (min(stop if stop is not None else self.n_rows, self.n_rows) - 1)
        for c in range(start // self.chunk_rows, last // self.chunk_rows + 1):
            rows = self.chunk_slice(c)
            try:
                arr[rows]
            except Exception as e:  # noqa: BLE001
                return c, rows, why(e)
        return start // self.chunk_rows, self.chunk_slice(start // self.chunk_rows), why(exc)


class ChunkReadError(StoreError):
    """A chunk of a store array cannot be decoded: ``array``, ``chunk``, its ``rows`` (None
    for a whole array) and the ``cause`` name it."""

    def __init__(self, message: str, array: str, chunk: int, rows: slice | None,
                 cause: str) -> None:
        super().__init__(message)
        self.array, self.chunk, self.rows, self.cause = array, chunk, rows, cause
