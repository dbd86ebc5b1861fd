"""Writing a :class:`~npos.store.FeatureStore`: optional arrays, chunks (rows first, then
the ``done`` flag), whole non-row arrays, and repair (a mixin of the store class)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from npos.atomic import writing
from npos.errors import IncompatibleStoreError, ParameterError, StoreError
from npos.store.chunks import WRITE_CONFIG, ChunkFiles
from npos.store.schema import _dimension_names, _group_array, _is_string


def _writes(method):
    """An OS error while the method writes the store names the store (see
    :func:`npos.atomic.writing`), never a chunk's temporary file."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with writing(self.url, "store"):
            return method(self, *args, **kwargs)
    return wrapper


class StoreWriting(ChunkFiles):
    """The writing methods of :class:`~npos.store.FeatureStore` (a mixin: it uses the
    store's group, array cache, chunk geometry and chunk-file checks)."""

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"store {self.url!r} is open read-only")

    @_writes
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

    @_writes
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

    @_writes
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

    @_writes
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
