"""Bring-your-own embeddings: `.npy`, `.npz`, or a folder of `.npy` shards into a store.

A folder of shards is what clip-retrieval writes (``img_emb/img_emb_0.npy``, ...); shards are
taken in natural order (``_2`` before ``_10``) and read lazily (memory-mapped), so importing a
bank larger than memory is fine.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npos.errors import ParameterError, StoreError, StoreExistsError
from npos.store.feature_store import DEFAULT_CHUNK_ROWS, FeatureStore, store_exists
from npos.store.identity import UNKNOWN_MODEL


def _natural_key(name: str) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


@dataclass
class EmbeddingSource:
    """Row-concatenation of one or more 2-D arrays (memory-mapped when possible)."""

    path: str
    parts: list[np.ndarray]
    files: list[Path]

    @property
    def n_rows(self) -> int:
        return sum(p.shape[0] for p in self.parts)

    @property
    def dim(self) -> int:
        return self.parts[0].shape[1]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as one in-memory array."""
        out, offset = [], 0
        for part in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
            if lo < hi:
                out.append(np.asarray(part[lo:hi]))
            offset += part.shape[0]
        return np.concatenate(out, axis=0)

    def fingerprint(self) -> str:
        """sha256 over the shard names and sizes: identifies the source for resuming."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
        return digest.hexdigest()


def _load_array(path: Path, *, what: str, mmap: bool = True) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.keys())
                key = "embeddings" if "embeddings" in keys else (keys[0] if len(keys) == 1
                                                                 else None)
                if key is None:
                    raise ParameterError(
                        f"{str(path)!r} holds several arrays {keys}; name one 'embeddings'")
                return npz[key]
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        if isinstance(exc, ParameterError):
            raise
        raise ParameterError(f"cannot read {what} from {str(path)!r}: {exc}") from None
    raise ParameterError(f"{what} must be a .npy or .npz file; got {str(path)!r}")


def load_embedding_source(path: str | os.PathLike) -> EmbeddingSource:
    """Open embeddings from a `.npy`/`.npz` file or a folder of `.npy` shards."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npy"), key=lambda p: _natural_key(p.name))
        if not files:
            raise ParameterError(f"no .npy shards in folder {str(path)!r}")
    else:
        files = [path]
    parts = [_load_array(f, what="embeddings") for f in files]
    for f, part in zip(files, parts, strict=True):
        if part.ndim != 2 or part.shape[0] == 0:
            raise ParameterError(
                f"embeddings in {str(f)!r} must be a non-empty 2-D array (rows, dim); "
                f"got shape {part.shape}")
        if part.shape[1] != parts[0].shape[1]:
            raise ParameterError(
                f"shard {str(f)!r} has dim {part.shape[1]} but {str(files[0])!r} has "
                f"{parts[0].shape[1]}")
        if part.dtype.kind not in "fiu":
            raise ParameterError(f"embeddings in {str(f)!r} are not numeric ({part.dtype})")
    return EmbeddingSource(str(path), parts, files)


def _read_lines(path: str | os.PathLike, *, what: str) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def import_embeddings(
    embeddings: str | os.PathLike,
    out: str,
    *,
    labels: str | os.PathLike | None = None,
    ids: str | os.PathLike | None = None,
    class_names: str | os.PathLike | Sequence[str] | None = None,
    text_embeddings: str | os.PathLike | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    dtype: str = "float16",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
    progress: bool = False,
) -> FeatureStore:
    """Write embeddings computed elsewhere into a new feature store.

    Parameters
    ----------
    embeddings : path
        ``.npy``/``.npz`` file of shape (N, D), or a folder of ``.npy`` shards.
    out : str
        Store location (local path or fsspec URL).
    labels : path, optional
        ``.npy`` of N integer labels (-1 = unlabeled).
    ids : path, optional
        Text file with one id per row; default ids are the row numbers.
    class_names : path or sequence of str, optional
        One name per class; default ``"0"``, ``"1"``, ... when labels or text embeddings
        imply classes.
    text_embeddings : path, optional
        ``.npy`` of shape (C, D): zero-shot class embeddings.
    model : str, optional
        The encoder that produced the embeddings, recorded as the store's ``model``
        attribute; stores (and heads) are combined only when model and ``pretrained`` match.
        Without it the store is of unknown encoder (``model: "unknown"``): it combines only
        with other stores of unknown encoder, with a warning (:mod:`npos.store.identity`).
    pretrained : str, optional
        The encoder's weights (tag, checkpoint name or ``none``); needs ``model``.
    dtype, chunk_rows, overwrite
        As in :meth:`FeatureStore.create`. Re-running an interrupted import of the same
        files continues from the chunks already done; re-running it on a damaged store (a
        chunk file lost, bad values) imports the damaged chunks again.
    """
    if pretrained is not None and model is None:
        raise ParameterError("--pretrained needs --model: name the encoder the weights belong "
                             "to")
    source = load_embedding_source(embeddings)
    label_arr = None if labels is None else _read_labels(labels, source.n_rows)
    id_list = None if ids is None else _read_ids(ids, source.n_rows)
    text_arr = (None if text_embeddings is None
                else _read_text_embeddings(text_embeddings, source.dim))
    names = _class_names(class_names, label_arr, text_arr)
    store = _create_store(out, embeddings, source, names, model, pretrained, dtype=dtype,
                          chunk_rows=chunk_rows, overwrite=overwrite)
    if text_arr is not None:
        store.set_array("text_embeddings", text_arr)
    _write_missing(store, source, label_arr, id_list, dtype=dtype, progress=progress)
    store.close()
    return store


def _read_labels(labels: str | os.PathLike, n_rows: int) -> np.ndarray:
    """The ``labels`` file as int32 (N,), checked against the embeddings."""
    label_arr = np.asarray(_load_array(Path(labels), what="labels", mmap=False))
    if label_arr.ndim != 1 or label_arr.shape[0] != n_rows:
        raise ParameterError(f"labels must have shape ({n_rows},) to match the embeddings; "
                             f"got {label_arr.shape}")
    if label_arr.dtype.kind not in "iu":
        raise ParameterError(f"labels must be integers; got dtype {label_arr.dtype}")
    label_arr = label_arr.astype(np.int32)
    if (label_arr < -1).any():
        raise ParameterError("labels must be >= -1 (-1 = unlabeled)")
    return label_arr


def _read_ids(ids: str | os.PathLike, n_rows: int) -> list[str]:
    """One id per row from the ``ids`` text file."""
    id_list = _read_lines(ids, what="ids")
    if len(id_list) != n_rows:
        raise ParameterError(f"ids file has {len(id_list)} lines but there are {n_rows} "
                             "embeddings")
    return id_list


def _read_text_embeddings(path: str | os.PathLike, dim: int) -> np.ndarray:
    """Zero-shot class embeddings (C, D) as float32."""
    text_arr = np.asarray(_load_array(Path(path), what="text embeddings", mmap=False),
                          dtype=np.float32)
    if text_arr.ndim != 2 or text_arr.shape[1] != dim:
        raise ParameterError(f"text embeddings must have shape (classes, {dim}); "
                             f"got {text_arr.shape}")
    return text_arr


def _class_names(class_names: str | os.PathLike | Sequence[str] | None,
                 label_arr: np.ndarray | None, text_arr: np.ndarray | None) -> list[str] | None:
    """The class names given, or ``"0"``, ``"1"``, ... when labels or text embeddings imply
    classes; checked against both."""
    if isinstance(class_names, (str, os.PathLike)):
        names = _read_lines(class_names, what="class names")
    elif class_names is not None:
        names = [str(c) for c in class_names]
    else:
        names = None
    n_classes = None
    if text_arr is not None:
        n_classes = text_arr.shape[0]
    elif names is not None:
        n_classes = len(names)
    elif label_arr is not None and (label_arr >= 0).any():
        n_classes = int(label_arr.max()) + 1
    if names is None and n_classes is not None:
        names = [str(i) for i in range(n_classes)]
    if names is not None:
        if len(names) != n_classes:
            raise ParameterError(f"{len(names)} class names but {n_classes} text embeddings")
        if label_arr is not None and label_arr.max(initial=-1) >= len(names):
            raise ParameterError(f"labels go up to {int(label_arr.max())} but there are only "
                                 f"{len(names)} classes")
    return names


def _create_store(out: str, embeddings: str | os.PathLike, source: EmbeddingSource,
                  names: list[str] | None, model: str | None, pretrained: str | None, *,
                  dtype: str, chunk_rows: int, overwrite: bool) -> FeatureStore:
    """Create the store, or reopen an unfinished or damaged import of the same files with its
    damaged chunks marked undone; a complete store is refused without ``overwrite``."""
    damaged: list[int] = []
    if not overwrite and store_exists(out):
        existing = FeatureStore.open(out, kinds=("features",), what="store import")
        damaged = existing.damaged_chunks()
        if existing.is_complete and not damaged:
            raise StoreExistsError(f"{out!r} already exists; pass --overwrite to replace it")
    # An unfinished or damaged import of the same files resumes (repairs); anything else is
    # refused by create().
    store = FeatureStore.create(
        out, n_rows=source.n_rows, dim=source.dim, dtype=dtype, chunk_rows=chunk_rows,
        class_names=names,
        attrs={"model": model if model is not None else UNKNOWN_MODEL, "pretrained": pretrained,
               "preprocess": None, "token_layer": None,
               "source": {"path": str(Path(embeddings).resolve()), "files": len(source.files),
                          "fingerprint": source.fingerprint()}},
        overwrite=overwrite, resume=True)
    store.mark_undone(damaged)
    return store


def _write_missing(store: FeatureStore, source: EmbeddingSource, label_arr: np.ndarray | None,
                   id_list: list[str] | None, *, dtype: str, progress: bool) -> None:
    """Write every chunk not yet done, refusing values that overflow ``dtype``."""
    from tqdm.auto import tqdm

    missing = store.missing_chunks()
    for index in tqdm(missing, desc="importing", unit="chunk", disable=not progress):
        rows = store.chunk_slice(index)
        block = source.rows(rows.start, rows.stop).astype(dtype)
        if not np.isfinite(block).all() and np.isfinite(source.rows(rows.start,
                                                                    rows.stop)).all():
            raise StoreError(f"embeddings overflow {dtype} in rows {rows.start}..{rows.stop - 1}; "
                             "use --dtype float32")
        chunk = {"embeddings": block}
        if label_arr is not None:
            chunk["labels"] = label_arr[rows]
        chunk["ids"] = np.asarray(id_list[rows] if id_list is not None
                                  else [str(i) for i in range(rows.start, rows.stop)])
        store.write_chunk(index, **chunk)
