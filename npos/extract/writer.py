"""Assembling and writing chunks during extraction: batch outputs are copied to the host,
collected into chunk buffers, and complete chunks are written by a background thread with a
bounded queue, so store I/O overlaps with encoding (see :mod:`npos.extract.extraction`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from npos.extract.datasets import ImageSource
from npos.extract.outcome import _check_finite
from npos.store import FeatureStore

#: Upper bound on the bytes of one zarr chunk of ``tokens`` (its row chunk divides chunk_rows).
TOKEN_CHUNK_BYTES = 64 << 20


class _ChunkWriter:
    """Writes finished chunks on a background thread; a bounded queue applies back-pressure."""

    def __init__(self, store: FeatureStore, *, maxsize: int = 2) -> None:
        self._store = store
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._work, name="npos-store-writer",
                                        daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            index, arrays = item
            try:
                start = time.perf_counter()
                _check_finite(index, arrays)
                self._store.write_chunk(index, **arrays)
                self.seconds += time.perf_counter() - start
            except BaseException as exc:  # noqa: BLE001 - re-raised in the producer
                self.error = exc

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        while True:
            self._raise_error()
            try:
                self._queue.put((index, arrays), timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, stop the thread, and re-raise its error if it had one."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()


class _ChunkBuffer:
    """Rows of one chunk being assembled from its batches."""

    def __init__(self, index: int, rows: slice, source: ImageSource, dim: int, dtype: str,
                 token_shape: tuple[int, int] | None) -> None:
        n = rows.stop - rows.start
        self.index, self.start, self.filled, self.size = index, rows.start, 0, n
        self.arrays: dict[str, np.ndarray] = {
            "embeddings": np.empty((n, dim), dtype=dtype),
            "labels": source.labels[rows],
            "ids": np.array(source.ids[rows], dtype=np.dtypes.StringDType()),
            "valid": np.ones(n, dtype=bool),
            "error": np.full(n, "", dtype=np.dtypes.StringDType()),
        }
        if token_shape is not None:
            self.arrays["tokens"] = np.empty((n, *token_shape), dtype=np.float16)

    def add(self, offset: int, embeddings: np.ndarray, tokens: np.ndarray | None,
            reasons: Sequence[str]) -> None:
        rows = slice(offset - self.start, offset - self.start + len(embeddings))
        self.arrays["embeddings"][rows] = embeddings
        if tokens is not None:
            self.arrays["tokens"][rows] = tokens
        for i, reason in enumerate(reasons):
            if reason:
                row = rows.start + i
                self.arrays["valid"][row] = False
                self.arrays["error"][row] = reason
                self.arrays["embeddings"][row] = np.nan
                if tokens is not None:
                    self.arrays["tokens"][row] = np.nan
        self.filled += len(embeddings)

    @property
    def complete(self) -> bool:
        return self.filled == self.size


class _BatchOutput:
    """A batch's results on their way to the host (asynchronous copies on CUDA)."""

    def __init__(self, first: int, reasons: Sequence[str], emb: torch.Tensor,
                 tok: torch.Tensor | None) -> None:
        self.first, self.reasons = first, list(reasons)
        cuda = emb.device.type == "cuda"
        self.emb = emb.float().to("cpu", non_blocking=cuda)
        self.tok = None if tok is None else tok.to(torch.float16).to("cpu", non_blocking=cuda)
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def host(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._event is not None:
            self._event.synchronize()
        return self.emb.numpy(), None if self.tok is None else self.tok.numpy()


class _ChunkAssembler:
    """Collects batch outputs into chunk buffers and hands complete chunks to the writer."""

    def __init__(self, store, source, dim, token_shape, writer, stats, bar) -> None:
        self.store, self.source, self.dim, self.token_shape = store, source, dim, token_shape
        self.writer, self.stats, self.bar = writer, stats, bar
        self.buffer: _ChunkBuffer | None = None

    def add(self, out: _BatchOutput) -> None:
        emb, tok = out.host()
        if self.buffer is None:
            index = out.first // self.store.chunk_rows
            self.buffer = _ChunkBuffer(index, self.store.chunk_slice(index), self.source,
                                       self.dim, self.store.dtype, self.token_shape)
        self.buffer.add(out.first, emb, tok, out.reasons)
        self.stats.rows += len(out.reasons)
        self.stats.failed += sum(1 for r in out.reasons if r)
        if self.buffer.complete:
            self.writer.put(self.buffer.index, self.buffer.arrays)
            self.stats.chunks += 1
            self.buffer = None
        self.bar.update(len(out.reasons))


def _token_chunk_rows(chunk_rows: int, row_bytes: int) -> int:
    """Largest divisor of ``chunk_rows`` whose token chunk stays under TOKEN_CHUNK_BYTES."""
    limit = max(1, TOKEN_CHUNK_BYTES // max(1, row_bytes))
    return max(d for d in range(1, min(chunk_rows, limit) + 1) if chunk_rows % d == 0)
