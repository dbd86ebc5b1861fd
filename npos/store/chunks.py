"""Which chunk files of a Zarr array exist: the store's keys, listed once and cached.

A lost chunk file reads back as the array's fill value (NaN embeddings, -1 labels, empty
ids), so it cannot be recognized by its values. Stores created by this version of npos write
every chunk, even one equal to the fill value (the group attribute :data:`MARKER`), so a done
chunk without its file is damage, found by listing the store's keys.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import zarr

#: Group attribute of stores whose every written chunk has a file (``write_empty_chunks``).
MARKER = "all_chunks_stored"
#: Array configuration used for every write: chunks equal to the fill value still get a file.
WRITE_CONFIG = {"write_empty_chunks": True}


def list_chunk_keys(arr: zarr.Array) -> set[str]:
    """Keys (relative to the array, e.g. ``"c/3/0"``) of the chunk files ``arr`` has."""
    from zarr.core.sync import sync

    store, path = arr.store_path.store, arr.store_path.path
    prefix = f"{path}/" if path else ""

    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return {key[len(prefix):] for key in sync(collect())}


def _grid(arr: zarr.Array) -> list[int]:
    return [math.ceil(s / c) if s else 0 for s, c in zip(arr.shape, arr.chunks)]


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
