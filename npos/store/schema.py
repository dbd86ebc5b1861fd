"""The store schema: its name, kinds, core arrays, dimension names, and the group-level
helpers that open, probe and guard a store location (used by :mod:`npos.store.feature_store`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import zarr

from npos.errors import StoreError, StoreExistsError, StoreNotFoundError

SCHEMA = "npos.features/1"
#: The only attribute of a store while :meth:`FeatureStore.create` writes it.
CREATING = "npos_creating"
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
    """True when a Zarr group (of any kind) exists at ``url``; a store whose creation
    stopped before it was set up (:data:`CREATING`) does not count: it is created again."""
    try:
        group = _open_group(url, "r")
    except StoreNotFoundError:
        return False
    return dict(group.attrs).get(CREATING) is not True


def _unfinished(url: str) -> bool:
    """A group whose creation by npos stopped before its attributes were written."""
    try:
        return dict(_open_group(url, "r").attrs).get(CREATING) is True
    except StoreNotFoundError:
        return False


def _refuse_foreign_path(url: str) -> None:
    """Creating a store empties its location: never do that to something that is not an
    npos store (a file, a non-empty folder, another Zarr group), ``overwrite`` or not."""
    if _unfinished(url):
        return
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
