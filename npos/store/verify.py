"""What ``npos store verify`` checks, for every array of every store kind.

* structure: the core arrays exist, every row-aligned array has N rows and a row chunking
  that divides the store's, ``done`` has one flag per chunk, ``text_embeddings`` is (C, D);
* chunks not marked done;
* chunk files: every done chunk has its file in every array (a lost file reads back as the
  fill value, so it is found by listing the store's keys, not by looking at values);
* values (``check_values``): embeddings, tokens and outlier distances finite on valid rows,
  text embeddings finite, labels in [-1, C), ids non-empty (unless the writer gave none) and
  unique, ``error`` non-empty
  exactly where ``valid`` is False, every chunk decodable.

Each problem is one line naming the array, the chunks and the rows, plus the chunks it
touches, so that ``npos extract`` (and ``npos store import``) can redo exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npos.store.chunks import ChunkReadError

#: Float row arrays whose values must be finite on valid rows.
FINITE_ARRAYS = ("embeddings", "tokens", "knn_distance")
#: Bytes of one array read in one go while scanning values.
BLOCK_BYTES = 256 << 20


@dataclass(frozen=True)
class Problem:
    """One problem: a line for the user and the store chunks it touches (may be empty)."""

    message: str
    array: str | None = None
    chunks: tuple[int, ...] = field(default=())


def _chunk_list(chunks, limit: int = 10) -> str:
    chunks = sorted({int(c) for c in chunks})
    return ", ".join(map(str, chunks[:limit])) + (" ..." if len(chunks) > limit else "")


def _structure(store, keys: set[str]) -> list[Problem]:
    problems = []
    emb = store._group["embeddings"]
    if tuple(emb.shape) != (store.n_rows, store.dim):
        problems.append(Problem(f"embeddings has shape {tuple(emb.shape)}, attributes say "
                                f"({store.n_rows}, {store.dim})", "embeddings"))
    for name in sorted(keys - {"done", "text_embeddings"}):
        arr = store._group[name]
        if arr.shape[:1] != (store.n_rows,):
            problems.append(Problem(f"array {name!r} has {arr.shape[0] if arr.shape else 0} "
                                    f"rows, expected {store.n_rows}", name))
        elif store.chunk_rows % arr.chunks[0]:
            problems.append(Problem(f"array {name!r} is chunked by {arr.chunks[0]} rows, which "
                                    f"does not divide the store's {store.chunk_rows}", name))
    if store._group["done"].shape != (store.n_chunks,):
        problems.append(Problem(f"done has shape {store._group['done'].shape}, expected "
                                f"({store.n_chunks},)", "done"))
    if "text_embeddings" in keys:
        text_shape = tuple(store._group["text_embeddings"].shape)
        n_classes = len(store.class_names or [])
        if text_shape != (n_classes, store.dim):
            problems.append(Problem(f"text_embeddings has shape {text_shape}, expected "
                                    f"({n_classes}, {store.dim})", "text_embeddings"))
    return problems


def _lost_files(store, keys: set[str]) -> list[Problem]:
    problems = []
    for name in sorted(keys - {"done"}):
        lost = store.lost_chunks(name)
        if not lost:
            continue
        if not store.is_row_array(name):
            problems.append(Problem(f"array {name!r} lost its chunk file", name))
            continue
        where = ", ".join(f"chunk {c} (rows {store.chunk_slice(c).start}.."
                          f"{store.chunk_slice(c).stop - 1})" for c in lost[:10])
        more = " ..." if len(lost) > 10 else ""
        problems.append(Problem(f"array {name!r} lost the files of {len(lost)} done "
                                f"chunk(s): {where}{more}", name, tuple(lost)))
    return problems


class _Rows:
    """Collects bad rows of one check over the whole scan, reported as one line."""

    def __init__(self, chunk_rows: int) -> None:
        self.chunk_rows = chunk_rows
        self.count = 0
        self.first: int | None = None
        self.chunks: set[int] = set()

    def add(self, rows: np.ndarray) -> None:
        if rows.size:
            self.count += int(rows.size)
            self.first = int(rows[0]) if self.first is None else self.first
            self.chunks.update((rows // self.chunk_rows).tolist())

    def problem(self, what: str, array: str) -> list[Problem]:
        if not self.count:
            return []
        return [Problem(f"{self.count} {what} (first row {self.first}, chunks "
                        f"{_chunk_list(self.chunks)})", array, tuple(sorted(self.chunks)))]


def _read(store, name: str, start: int, stop: int, problems: list[Problem]):
    """Rows [start, stop) of ``name``, or None (and a problem naming the undecodable chunk;
    lost chunk files are reported by :func:`_lost_files` and read as fill values here)."""
    try:
        return store.read_rows(name, start, stop, check_files=False)
    except ChunkReadError as exc:
        where = f" (rows {exc.rows.start}..{exc.rows.stop - 1})" if exc.rows else ""
        problems.append(Problem(f"array {name!r} chunk {exc.chunk}{where} cannot be read: "
                                f"{exc.cause}", name, (exc.chunk,) if exc.rows else ()))
        return None


def _block_rows(store, name: str, batch_rows: int) -> int:
    arr = store._group[name]
    row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)) or 1
    rows = max(1, min(batch_rows, BLOCK_BYTES // max(1, row_bytes)))
    return max(store.chunk_rows, rows // store.chunk_rows * store.chunk_rows)


def _values(store, keys: set[str], batch_rows: int, progress: bool) -> list[Problem]:
    from tqdm.auto import tqdm

    problems: list[Problem] = []
    done_rows = np.repeat(store.done_mask(), store.chunk_rows)[: store.n_rows]
    valid = done_rows.copy()
    if "valid" in keys:
        got = _read(store, "valid", 0, store.n_rows, problems)
        valid &= got.astype(bool) if got is not None else True
    n_classes = len(store.class_names) if store.class_names is not None else None
    scans = [n for n in FINITE_ARRAYS if n in keys]
    scans += [n for n in ("labels", "ids", "error") if n in keys]
    checks = {n: _Rows(store.chunk_rows) for n in ("labels", "empty", "disagree")}
    ids: list[np.ndarray] = []
    bar = tqdm(total=store.n_rows * len(scans), desc="verifying", unit="row",
               disable=not progress)
    for name in scans:
        step = _block_rows(store, name, batch_rows)
        for start in range(0, store.n_rows, step):
            stop = min(start + step, store.n_rows)
            bar.update(stop - start)
            here = done_rows[start:stop]
            if not here.any():
                continue  # nothing written yet: only fill values
            block = _read(store, name, start, stop, problems)
            if block is None:
                continue
            if name in FINITE_ARRAYS:
                bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1) & valid[start:stop]
                if bad.any():
                    rows = np.flatnonzero(bad) + start
                    chunks = sorted({int(r) // store.chunk_rows for r in rows})
                    problems.append(Problem(
                        f"{rows.size} rows with NaN/Inf {name} in rows {start}..{stop - 1} "
                        f"(first row {rows[0]}, chunks {_chunk_list(chunks)})", name,
                        tuple(chunks)))
            elif name == "labels" and n_classes is not None:
                checks["labels"].add(np.flatnonzero(((block < -1) | (block >= n_classes))
                                                    & here) + start)
            elif name == "ids":
                checks["empty"].add(np.flatnonzero((block == "") & here) + start)
                ids.append(np.where(here, block, ""))
            elif name == "error" and "valid" in keys:
                failed = ~valid[start:stop] & here
                checks["disagree"].add(np.flatnonzero(((block != "") != failed) & here) + start)
    bar.close()
    problems += checks["labels"].problem(f"labels outside [-1, {n_classes})", "labels")
    if any((part != "").any() for part in ids):  # a store written without ids has none
        problems += checks["empty"].problem("empty ids", "ids")
    problems += _duplicates(ids, store.chunk_rows)
    problems += checks["disagree"].problem("rows where 'valid' and 'error' disagree (error "
                                           "must be set exactly on failed rows)", "error")
    if "text_embeddings" in keys and not store.lost_chunks("text_embeddings"):
        text = _read(store, "text_embeddings", 0, store._group["text_embeddings"].shape[0],
                     problems)
        if text is not None and not np.isfinite(text).all():
            problems.append(Problem(f"text_embeddings has {int((~np.isfinite(text)).sum())} "
                                    "NaN/Inf values", "text_embeddings"))
    return problems


def _duplicates(parts: list[np.ndarray], chunk_rows: int) -> list[Problem]:
    if not parts:
        return []
    ids = np.concatenate(parts).astype(object)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    same = (ordered[1:] == ordered[:-1]) & (ordered[1:] != "")
    if not same.any():
        return []
    rows = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    first = int(np.flatnonzero(same)[0])
    example, a, b = ordered[first + 1], int(order[first]), int(order[first + 1])
    chunks = sorted({int(r) // chunk_rows for r in rows})
    return [Problem(f"{int(same.sum())} duplicate ids (e.g. {example!r} in rows {min(a, b)} "
                    f"and {max(a, b)}; chunks {_chunk_list(chunks)})", "ids", tuple(chunks))]


def find_problems(store, *, check_values: bool = True, batch_rows: int = 65536,
                  progress: bool = False) -> list[Problem]:
    """Every problem of ``store`` (a :class:`~npos.store.FeatureStore`), one per line."""
    from npos.store.feature_store import CORE_ARRAYS

    keys = set(store._group.array_keys())
    missing = [Problem(f"missing array {name!r}", name) for name in CORE_ARRAYS
               if name not in keys]
    if missing:
        return missing
    problems = _structure(store, keys)
    if problems:
        return problems
    not_done = store.missing_chunks()
    if not_done:
        shown = ", ".join(map(str, not_done[:20])) + (" ..." if len(not_done) > 20 else "")
        problems.append(Problem(f"{len(not_done)}/{store.n_chunks} chunks not done: {shown}",
                                "done"))
    problems += _lost_files(store, keys)
    if check_values:
        problems += _values(store, keys, batch_rows, progress)
    return problems
