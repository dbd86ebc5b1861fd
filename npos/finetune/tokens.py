"""Reading cached tokens: checks that a store holds the right tokens, a shuffled stream of
labeled token batches for training, and an in-order stream of chunks for re-embedding.

Token caches are large (ImageNet-100 after block 10 of ViT-B/16: 126 689 rows x 197 x 768
float16, about 38 GB), so nothing here loads a whole ``tokens`` array. Reads follow the
array's zarr chunks (the extraction caps them at 64 MB), and a background thread reads ahead
while the caller computes, so decompression overlaps with training.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from npos.errors import IncompatibleStoreError, ParameterError, StoreError

T = TypeVar("T")
#: Store attributes that must agree between the training store and every store re-embedded
#: with its tail: they decide what the cached tokens are.
TOKEN_IDENTITY_KEYS = ("model", "pretrained", "seed", "preprocess", "token_layer")
_END = object()


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate over ``items`` produced on a background thread, up to ``depth`` items ahead.

    Exceptions of the producer are re-raised in the consumer; closing the returned iterator
    early stops the producer.
    """
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put((_END, exc))

    thread = threading.Thread(target=work, name="npos-token-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = box.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class TokenSpec:
    """What a store's tokens are: where they were cut and their shape.

    Attributes
    ----------
    layer : int
        ``token_layer``: the residual stream after this many blocks.
    shape : tuple of int
        Row shape (T, W).
    identity : dict
        The store's :data:`TOKEN_IDENTITY_KEYS` attributes.
    """

    layer: int
    shape: tuple[int, int]
    identity: dict[str, Any]


def token_spec(store, *, what: str = "store") -> TokenSpec:
    """The tokens of ``store`` (a :class:`~npos.store.FeatureStore`), or a clear error when it
    has none."""
    layer = store.attrs.get("token_layer")
    if not store.has("tokens") or layer is None:
        raise StoreError(
            f"{what} {store.url!r} has no tokens; extract it with --tokens-layer L "
            "(e.g. 'npos extract ... --tokens-layer 10' for ViT-B/16) to fine-tune from it")
    shape = tuple(int(s) for s in store.array("tokens").shape[1:])
    if len(shape) != 2:
        raise StoreError(f"{what} {store.url!r} has tokens of row shape {shape}; expected (T, W)")
    identity = {key: store.attrs.get(key) for key in TOKEN_IDENTITY_KEYS}
    return TokenSpec(int(layer), shape, identity)


def check_same_tokens(spec: TokenSpec, other: TokenSpec, *, what: str, reference: str) -> None:
    """Raise :class:`IncompatibleStoreError` unless two stores cache the same tokens (same
    encoder, weights, seed, preprocessing and layer, same row shape)."""
    for key in TOKEN_IDENTITY_KEYS:
        mine, theirs = spec.identity.get(key), other.identity.get(key)
        if mine != theirs:
            raise IncompatibleStoreError(
                f"{what} holds tokens of another encoder or layer than {reference}: its "
                f"{key} is {theirs!r} there but {mine!r} in {reference}")
    if spec.shape != other.shape:
        raise IncompatibleStoreError(f"{what} has tokens of shape {other.shape}, but "
                                     f"{reference} has {spec.shape}")


def _usable_rows(store, *, labeled: bool) -> np.ndarray:
    mask = store.readable_rows(complete=True)
    if labeled:
        mask &= np.asarray(store.array("labels")[:]) >= 0
    return mask


class TokenStream:
    """Labeled token batches of a store in a seeded shuffled order, read chunk by chunk.

    Shuffling works at two levels so memory stays bounded: the order of the token array's
    zarr chunks ("blocks") is permuted every epoch; consecutive blocks of that order form
    windows of about ``window_rows`` rows, whose rows are permuted again before being cut
    into batches. Rows left over at the end of a window open the next one's first batch, so
    every batch but an epoch's last has ``batch_size`` rows. Every usable row (done chunk,
    ``valid``, label >= 0) appears exactly once per epoch.

    Parameters
    ----------
    store : FeatureStore
        A complete store with ``tokens`` and labels.
    batch_size : int
    window_rows : int, optional
        Rows shuffled together (rounded up to whole blocks); memory for the stream is about
        one window plus ``prefetch`` batches of float16 tokens. Default ``8 * batch_size``.
        Larger windows mix classes better (stores of image folders are sorted by class).
    prefetch : int
        Batches prepared ahead on a background thread.
    pin_memory : bool
        Put batches in page-locked memory (faster, asynchronous copies to a CUDA device).

    Attributes
    ----------
    n_rows : int
        Usable rows per epoch.
    block_rows : int
        Rows per zarr chunk of ``tokens``.
    """

    def __init__(self, store, *, batch_size: int, window_rows: int | None = None,
                 prefetch: int = 2, pin_memory: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ParameterError(f"batch_size must be an int >= 1; got {batch_size!r}")
        window_rows = 8 * batch_size if window_rows is None else window_rows
        if isinstance(window_rows, bool) or not isinstance(window_rows, int) or window_rows < 1:
            raise ParameterError(f"window_rows must be an int >= 1; got {window_rows!r}")
        token_spec(store)
        self.store = store
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self._tokens = store.array("tokens")
        self.block_rows = int(self._tokens.chunks[0])
        usable = _usable_rows(store, labeled=True)
        self._labels = np.asarray(store.array("labels")[:]).astype(np.int64)
        starts = range(0, store.n_rows, self.block_rows)
        self._blocks = [(s, np.flatnonzero(usable[s:s + self.block_rows])) for s in starts]
        self._blocks = [(s, rows) for s, rows in self._blocks if rows.size]
        self.n_rows = int(usable.sum())
        self.blocks_per_window = max(1, math.ceil(window_rows / self.block_rows))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def _windows(self, order: Sequence[int]) -> list[list[int]]:
        return [list(order[i:i + self.blocks_per_window])
                for i in range(0, len(order), self.blocks_per_window)]

    def _read_window(self, blocks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        tokens, labels = [], []
        for b in blocks:
            start, rows = self._blocks[b]
            block = np.asarray(self._tokens[start:start + self.block_rows])
            tokens.append(block[rows] if rows.size < block.shape[0] else block)
            labels.append(self._labels[start + rows])
        return np.concatenate(tokens), np.concatenate(labels)

    def _produce(self, windows: list[list[int]],
                 perms: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        carry_tokens: list[np.ndarray] = []
        carry_labels: list[np.ndarray] = []
        carried = 0
        for blocks, perm in zip(windows, perms, strict=True):
            tokens, labels = self._read_window(blocks)
            pos = 0
            while pos < perm.size:
                take = perm[pos:pos + self.batch_size - carried]
                pos += take.size
                carry_tokens.append(tokens[take])
                carry_labels.append(labels[take])
                carried += take.size
                if carried == self.batch_size:
                    yield self._batch(carry_tokens, carry_labels)
                    carry_tokens, carry_labels, carried = [], [], 0
        if carried:
            yield self._batch(carry_tokens, carry_labels)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the usable rows.

        The block order and every window's permutation are drawn from ``generator`` up
        front, on the calling thread (so the order is reproducible); reading, permuting and
        cutting batches then happen on a background thread, ``prefetch`` batches ahead.

        Parameters
        ----------
        generator : torch.Generator
            CPU generator.

        Yields
        ------
        tokens : Tensor of shape (B, T, W), float16, CPU (pinned with ``pin_memory``)
        labels : Tensor of shape (B,), int64, CPU
        """
        order = torch.randperm(len(self._blocks), generator=generator).tolist()
        windows = self._windows(order)
        perms = [torch.randperm(sum(self._blocks[b][1].size for b in blocks),
                                generator=generator).numpy() for blocks in windows]
        return prefetched(self._produce(windows, perms), self.prefetch)

    def _batch(self, tokens: list[np.ndarray], labels: list[np.ndarray]):
        t = tokens[0] if len(tokens) == 1 else np.concatenate(tokens)
        y = labels[0] if len(labels) == 1 else np.concatenate(labels)
        batch = torch.from_numpy(np.ascontiguousarray(t))
        return (batch.pin_memory() if self.pin_memory else batch), torch.from_numpy(y)


def iter_token_blocks(store, chunks: Sequence[int], *,
                      prefetch: int = 2) -> Iterator[tuple[int, slice, np.ndarray]]:
    """Yield ``(chunk index, rows, tokens of those rows)`` for every zarr block of ``tokens``
    in the given store chunks, in order, read ahead on a background thread (re-embedding a
    store chunk by chunk without holding a whole chunk of tokens).

    Rows that are not valid keep whatever the store holds there (NaN for failed images);
    callers mask them.
    """
    tokens = store.array("tokens")
    block_rows = int(tokens.chunks[0])

    def read() -> Iterator[tuple[int, slice, np.ndarray]]:
        for index in chunks:
            chunk = store.chunk_slice(index)
            for start in range(chunk.start, chunk.stop, block_rows):
                rows = slice(start, min(start + block_rows, chunk.stop))
                yield index, rows, np.asarray(tokens[rows])

    return prefetched(read(), prefetch)
