"""Stage one: images -> a Zarr feature store, through a frozen open_clip image encoder.

The unit of work is a store chunk (``chunk_rows`` rows). Each chunk is split into batches at
fixed offsets (``batch_size`` rows; the last batch of a chunk may be smaller), so every run —
uninterrupted, resumed after a kill, or sharded over any number of processes — feeds the encoder
exactly the same batches and writes bit-identical values. A chunk's rows are written, then its
``done`` flag; a re-run encodes only chunks not marked done.

Pipeline: a DataLoader (``workers`` processes, pinned memory on CUDA) decodes and preprocesses
images; the main thread encodes batches (autocast on CUDA) and assembles chunks; a writer
thread with a bounded queue writes finished chunks, so store I/O overlaps with encoding.

Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group is started (gloo on CPU, nccl on
CUDA, each rank on ``cuda:LOCAL_RANK``). Rank 0 validates and creates (or reopens) the store,
writes the text embeddings and broadcasts the list of missing chunks; rank ``r`` encodes
missing chunks ``r, r+W, r+2W, ...`` of that list. After a final barrier rank 0 writes the
``failed`` and ``settings`` (every parameter that decides the values, resolved) attributes.

A re-run also repairs: rank 0 first clears the ``done`` flag of every chunk that lost a file
in any array or holds bad values (:meth:`FeatureStore.damaged_chunks`), so those chunks are
encoded again and the store ends identical to an uninterrupted run.

Failed images (see :func:`npos.extract.datasets.decode_image`) keep their row: ``valid`` is
False, ``embeddings`` (and ``tokens``) are NaN, and ``error`` holds the reason. The ``failed``
attribute lists them as ``[{"id": ..., "reason": ...}]``. With ``on_error="fail"`` the first
failure stops the run instead (chunks already written stay done). After the run, a store in
which every row failed, or more than ``max_failed`` of the rows, raises
:class:`TooManyFailedError` (the store is kept).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from npos.errors import IncompatibleStoreError, NposError, ParameterError, StoreError
from npos.extract.datasets import (ImageDataset, ImageDecodeError, ImageSource,
                                   load_image_source, read_class_names, readable_class_names)
from npos.device import resolve_device
from npos.encoder import (DEFAULT_SEED, autocast, create_encoder, encode_image_tokens,
                          image_preprocess_config, image_transform, resolve_weights)
from npos.extract.text import DEFAULT_TEMPLATES, load_templates, text_embeddings, validate_templates
from npos.log import third_party_logs
from npos.settings import settings_record
from npos.store import DEFAULT_CHUNK_ROWS, FeatureStore, store_exists
from npos.validation import check_choice, check_float, check_int

ON_ERROR = ("skip", "fail")
#: Default of ``npos extract --max-failed``: the share of rows that may fail before a run is
#: an error (the Python API sets no limit by default but still refuses an all-failed store).
DEFAULT_MAX_FAILED = 0.05
DTYPES = ("float16", "float32")
#: Upper bound on the bytes of one zarr chunk of ``tokens`` (its row chunk divides chunk_rows).
TOKEN_CHUNK_BYTES = 64 << 20
#: Process-group timeout: ranks wait at barriers for the slowest one (e.g. rank 0 embedding
#: 18 000 prompts, or a rank with more chunks left after a resume).
DIST_TIMEOUT = _dt.timedelta(hours=24)


@dataclass
class ExtractionStats:
    """What one process did in one run.

    Attributes
    ----------
    rows : int
        Rows this process encoded (0 when every chunk was already done).
    failed : int
        Of those, rows whose image could not be read.
    chunks : int
        Chunks this process wrote.
    seconds : float
        Wall time of the encoding loop (data loading, encoding and writing).
    write_seconds : float
        Time the writer thread spent writing chunks (overlaps with encoding).
    rank, world_size : int
    store_failed : int or None
        Failed rows in the whole store (rank 0, after every rank finished).
    repaired : list of int
        Done chunks found damaged and encoded again (rank 0).
    """

    rows: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    write_seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    store_failed: int | None = None
    repaired: list[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class TooManyFailedError(NposError):
    """Every row failed, or more than ``max_failed`` of them; the store is kept."""


def tally_reasons(failed: Sequence[dict[str, str]]) -> str:
    """``"7 not an image, 5 truncated image"``: failure reasons by kind, most common first
    (the kind is the reason without its details in parentheses)."""
    counts = Counter(str(f.get("reason", "")).split(" (")[0] for f in failed)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def check_failed(store: FeatureStore, failed: Sequence[dict[str, str]],
                 max_failed: float | None) -> None:
    """Raise :class:`TooManyFailedError` when every row of ``store`` failed, or more than
    ``max_failed`` (a fraction; None: no limit) of them."""
    n, k = store.n_rows, len(failed)
    if k == 0 or (k < n and (max_failed is None or k <= max_failed * n)):
        return
    if k == n:
        head = f"all {n} images failed: {tally_reasons(failed)}"
    else:
        head = (f"{k} of {n} images failed ({k / n:.1%}, more than --max-failed "
                f"{max_failed:g}): {tally_reasons(failed)}")
    raise TooManyFailedError(
        f"{head}; the store {store.url!r} is kept (list them with 'npos store info "
        f"{store.url} --failed'; fix the files and re-run with --overwrite, or accept them "
        "with a larger --max-failed)")


# ---------------------------------------------------------------------------- processes
class _Processes:
    """This process's place under torchrun (a single process without it)."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self._owns_group = False
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        if device.type == "cuda":
            if device.index is None:  # a plain "cuda" means this rank's local GPU
                self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=DIST_TIMEOUT)
            self._owns_group = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ---------------------------------------------------------------------------- writing
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


def _check_finite(index: int, arrays: dict[str, np.ndarray]) -> None:
    """Refuse a chunk whose valid rows hold NaN/Inf embeddings or tokens (before writing)."""
    for name, what in (("embeddings", "embeddings"), ("tokens", "token rows")):
        if name not in arrays:
            continue
        values = arrays[name][arrays["valid"]]
        # an explicit row width: numpy cannot infer -1 for a chunk without valid rows
        finite = np.isfinite(values.reshape(len(values), math.prod(values.shape[1:]))).all(1)
        if not finite.all():
            hint = (" (float16 overflow: use --dtype float32)"
                    if name == "embeddings" and values.dtype == np.float16 else "")
            raise StoreError(f"the encoder produced {int((~finite).sum())} non-finite {what} "
                             f"in chunk {index}{hint}")


def _checked_text_embeddings(text: np.ndarray) -> np.ndarray:
    """``text`` (C, D), refused when a class's text embedding holds NaN/Inf."""
    finite = np.isfinite(text).all(axis=1)
    if not finite.all():
        raise StoreError(f"the text encoder produced non-finite embeddings for "
                         f"{int((~finite).sum())} of {len(text)} classes")
    return text


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


# ---------------------------------------------------------------------------- extractor
def _token_chunk_rows(chunk_rows: int, row_bytes: int) -> int:
    """Largest divisor of ``chunk_rows`` whose token chunk stays under TOKEN_CHUNK_BYTES."""
    limit = max(1, TOKEN_CHUNK_BYTES // max(1, row_bytes))
    return max(d for d in range(1, min(chunk_rows, limit) + 1) if chunk_rows % d == 0)


class FeatureExtractor:
    """Encode an image folder or file list into a feature store. Parameters are validated by
    :meth:`run` before anything is read or written.

    Parameters
    ----------
    model : str
        open_clip model name (``npos-tiny``, ``ViT-B-16``, ...) or ``hf-hub:org/repo``.
    pretrained : str or None
        Pretrained tag, local checkpoint file, or ``"none"`` (seeded random init); see
        :func:`npos.encoder.resolve_weights`.
    batch_size : int
        Images per forward pass (batches never span chunks).
    workers : int or None
        DataLoader worker processes (0: decode in the main process). Default:
        ``min(8, os.cpu_count())``.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (:func:`npos.device.resolve_device`).
    dtype : {"float16", "float32"}
        Storage dtype of ``embeddings`` (``tokens`` are always float16).
    tokens_layer : int or None
        Also store ``tokens``: the residual stream after this many blocks of the ViT.
    classes : path or sequence of str, optional
        Class keys in label order (folder names / list labels).
    class_names : "imagenet", path, or mapping, optional
        Class key -> readable name for the prompts (default: the keys themselves).
    templates : path or sequence of str, optional
        Prompt templates (default :data:`npos.extract.text.DEFAULT_TEMPLATES`).
    unlabeled : bool
        Treat the input as unlabeled (labels -1, no text embeddings).
    on_error : {"skip", "fail"}
    max_failed : float or None
        Largest share of failed rows (0..1) accepted (None: no limit; the CLI's default is
        :data:`DEFAULT_MAX_FAILED`). Above it, or whenever every row failed, :meth:`run`
        raises :class:`TooManyFailedError` after writing the store.
    chunk_rows : int
        Rows per store chunk: the unit of writing, resuming and sharding.
    seed : int
        Seed of random-init encoders.
    overwrite : bool
        Replace an existing store instead of resuming it.
    progress : bool or None
        Progress bar (None: when stderr is a terminal). Shown by rank 0 only.

    Attributes
    ----------
    store_ : FeatureStore
        The store written by :meth:`run`.
    stats_ : ExtractionStats
        What this process did.
    """

    def __init__(self, *, model: str, pretrained: str | None = None, batch_size: int = 64,
                 workers: int | None = None, device: str = "auto", dtype: str = "float16",
                 tokens_layer: int | None = None, classes=None, class_names=None,
                 templates=None, unlabeled: bool = False, on_error: str = "skip",
                 max_failed: float | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, seed: int = DEFAULT_SEED,
                 overwrite: bool = False, progress: bool | None = None) -> None:
        self.model = model
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.dtype = dtype
        self.tokens_layer = tokens_layer
        self.classes = classes
        self.class_names = class_names
        self.templates = templates
        self.unlabeled = unlabeled
        self.on_error = on_error
        self.max_failed = max_failed
        self.chunk_rows = chunk_rows
        self.seed = seed
        self.overwrite = overwrite
        self.progress = progress

    # -------------------------------------------------------------- validation
    def _validate_params(self) -> None:
        for name, low in (("batch_size", 1), ("chunk_rows", 1), ("seed", 0)):
            check_int(name, getattr(self, name), low, owner="extract")
        for name in ("workers", "tokens_layer"):
            check_int(name, getattr(self, name), 0, allow_none=True, owner="extract")
        check_choice("dtype", self.dtype, DTYPES, owner="extract")
        check_choice("on_error", self.on_error, ON_ERROR, owner="extract")
        check_float("max_failed", self.max_failed, 0.0, 1.0, allow_none=True, owner="extract")

    def _resolve_texts(self, source: ImageSource) -> tuple[list[str] | None, list[str] | None]:
        """Readable class names and prompt templates (both None for unlabeled input)."""
        if not source.labeled or source.classes is None:
            if self.class_names is not None:
                raise ParameterError("class names were given but the input is unlabeled")
            return None, None
        mapping = read_class_names(self.class_names) if self.class_names is not None else None
        names = readable_class_names(source.classes, mapping)
        if self.templates is None:
            templates = list(DEFAULT_TEMPLATES)
        elif isinstance(self.templates, (str, os.PathLike)):
            templates = load_templates(self.templates)
        else:
            templates = validate_templates(self.templates)
        return names, templates

    # -------------------------------------------------------------- run
    def run(self, data: str | os.PathLike, out: str) -> FeatureExtractor:
        """Encode ``data`` (image folder or file list) into the store ``out``.

        Resumes an unfinished store made by the same command (same model, weights, seed,
        preprocessing, files, labels, dtype, chunking and token layer), re-encoding damaged
        chunks too; refuses any other existing store unless ``overwrite``.

        Raises
        ------
        TooManyFailedError
            After the run (rank 0), when every row failed or more than ``max_failed``.
        """
        self._validate_params()
        procs = _Processes(resolve_device(self.device))
        try:
            self._run(data, str(out), procs)
        finally:
            procs.close()
        return self

    def _run(self, data, out: str, procs: _Processes) -> None:
        device = procs.device
        source = load_image_source(data, classes=self.classes, unlabeled=self.unlabeled)
        names, templates = self._resolve_texts(source)
        weights = resolve_weights(self.model, self.pretrained)
        clip: Any = create_encoder(weights, seed=self.seed).to(device)
        preprocess = image_preprocess_config(clip)
        with torch.inference_mode(), autocast(device, self.dtype):
            probe = torch.zeros((1, *_image_shape(preprocess)), device=device)
            if self.tokens_layer is None:
                dim, token_shape = int(clip.encode_image(probe).shape[-1]), None
            else:
                emb, tok = encode_image_tokens(clip.visual, probe, self.tokens_layer)
                dim, token_shape = int(emb.shape[-1]), tuple(int(s) for s in tok.shape[1:])
        attrs = {
            "model": self.model,
            "pretrained": weights.identity,
            "preprocess": preprocess,
            "token_layer": self.tokens_layer,
            "source": source.describe(),
            "templates": templates,
            "seed": self.seed if weights.random_init else None,
        }

        # Rank 0 validates and prepares the store; the others learn the outcome from it.
        setup: dict[str, Any]
        repaired: list[int] = []
        if procs.rank == 0:
            try:
                store = self._prepare_store(out, source, names, templates, dim, token_shape,
                                            attrs, clip)
                repaired = store.damaged_chunks()
                store.mark_undone(repaired)  # the normal resume path encodes them again
                setup = {"missing": store.missing_chunks()}
            except BaseException as exc:
                procs.broadcast({"error": f"{type(exc).__name__} on rank 0: {exc}"})
                raise
            procs.broadcast(setup)
        else:
            setup = procs.broadcast(None)
            if "error" in setup:
                raise NposError(setup["error"])
            store = FeatureStore.open(out, mode="r+")
            _check_same_run(store, attrs, source)

        mine = setup["missing"][procs.rank::procs.world_size]
        stats = ExtractionStats(rank=procs.rank, world_size=procs.world_size,
                                repaired=repaired)
        try:
            if mine:
                self._encode(store, source, clip, preprocess, dim, token_shape, mine, procs,
                             stats)
            procs.barrier()
            if procs.rank == 0:
                failed = store.failed_rows(recompute=True)
                store.update_attrs(failed=failed,
                                   settings=self._settings(data, weights, procs))
                stats.store_failed = len(failed)
        finally:
            store.close()  # the lock goes as soon as nothing more is written
        self.store_ = store
        self.stats_ = stats
        if procs.rank == 0:
            check_failed(store, failed, self.max_failed)

    def _settings(self, data, weights, procs: _Processes) -> dict[str, Any]:
        # The store's `settings` attribute: every parameter that decides its values, resolved
        # (the device type: autocast on CUDA). Workers and the number of processes are left
        # out: they never change a value, and a resumed or torchrun-sharded run must yield
        # the same store as one uninterrupted process.
        return settings_record(
            data=str(data), model=self.model, pretrained=self.pretrained,
            weights=weights.identity, batch_size=self.batch_size,
            device=procs.device.type, dtype=self.dtype,
            tokens_layer=self.tokens_layer, classes=self.classes,
            class_names=self.class_names, templates=self.templates, unlabeled=self.unlabeled,
            on_error=self.on_error, chunk_rows=self.chunk_rows, seed=self.seed)

    def _prepare_store(self, out, source, names, templates, dim, token_shape, attrs,
                       clip) -> FeatureStore:
        if store_exists(out) and not self.overwrite:
            existing = FeatureStore.open(out, kinds=("features",), what="extract (resuming)")
            # FeatureStore.create compares the identity attributes; these also decide values.
            for key in ("seed", "templates"):
                if existing.attrs.get(key) != attrs[key]:
                    raise IncompatibleStoreError(
                        f"cannot resume into {out!r}: it was made with {key}="
                        f"{existing.attrs.get(key)!r} but this run uses {key}={attrs[key]!r}; "
                        "pass --overwrite to start over")
        store = FeatureStore.create(
            out, n_rows=len(source), dim=dim, dtype=self.dtype, chunk_rows=self.chunk_rows,
            class_names=names, attrs=attrs, overwrite=self.overwrite, resume=True)
        store.add_array("valid", (), "bool", fill_value=True)
        store.add_array("error", (), np.dtypes.StringDType())
        if token_shape is not None:
            row_bytes = 2 * math.prod(token_shape)
            store.add_array("tokens", token_shape, "float16",
                            chunk_rows=_token_chunk_rows(self.chunk_rows, row_bytes),
                            dimension_names=("token", "width"))
        if names is not None and not _text_embeddings_ok(store, len(names), dim):
            text = text_embeddings(clip, _tokenizer(self.model), names, templates)
            store.set_array("text_embeddings", _checked_text_embeddings(text))
        return store

    def _encode(self, store, source, clip, preprocess, dim, token_shape, chunks, procs,
                stats) -> None:
        from tqdm.auto import tqdm

        device = procs.device
        batches: list[list[int]] = []
        for index in chunks:
            rows = store.chunk_slice(index)
            batches.extend(list(range(s, min(s + self.batch_size, rows.stop)))
                           for s in range(rows.start, rows.stop, self.batch_size))
        workers = self.workers if self.workers is not None else min(8, os.cpu_count() or 1)
        dataset = ImageDataset(source, image_transform(preprocess), _image_shape(preprocess))
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=workers,
            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
        total = sum(len(b) for b in batches)
        # tqdm: disable=None hides the bar when stderr is not a terminal; one bar (rank 0).
        disable = (None if self.progress is None else not self.progress) if procs.rank == 0 \
            else True
        bar = tqdm(total=total, unit="img", desc="extracting", disable=disable, smoothing=0.05)
        writer = _ChunkWriter(store)
        assembler = _ChunkAssembler(store, source, dim, token_shape, writer, stats, bar)
        pending: _BatchOutput | None = None
        start = time.perf_counter()
        try:
            for rows, images, reasons in loader:
                if self.on_error == "fail" and any(reasons):
                    if pending is not None:  # it may complete a chunk: keep that chunk
                        assembler.add(pending)
                    row, reason = next((r, e) for r, e in zip(rows.tolist(), reasons, strict=True)
                                       if e)
                    raise ImageDecodeError(source.path(row), reason)
                images = images.to(device, non_blocking=True)
                with torch.inference_mode(), autocast(device, store.dtype):
                    if token_shape is None:
                        emb, tok = clip.encode_image(images), None
                    else:
                        assert self.tokens_layer is not None  # token_shape is set only then
                        emb, tok = encode_image_tokens(clip.visual, images, self.tokens_layer)
                launched = _BatchOutput(int(rows[0]), reasons, emb, tok)
                # Collect the previous batch only now, so the device already has this one
                # queued while the host waits for the previous results.
                if pending is not None:
                    assembler.add(pending)
                pending = launched
            if pending is not None:
                assembler.add(pending)
        finally:
            bar.close()
            writer.close()  # chunks already queued are complete: write them even on error
            stats.seconds = time.perf_counter() - start
            stats.write_seconds = writer.seconds


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


def _image_shape(preprocess: dict[str, Any]) -> tuple[int, int, int]:
    """(3, H, W) of the images the preprocessing makes."""
    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else size
    return 3, int(height), int(width)


def _tokenizer(model: str):
    import open_clip

    with third_party_logs():  # open_clip's logging.info() would configure the root logger
        return open_clip.get_tokenizer(model)


def _text_embeddings_ok(store: FeatureStore, n_classes: int, dim: int) -> bool:
    # A run killed while writing them leaves fill values (zeros) behind: recompute then.
    if not store.has("text_embeddings") or store.lost_chunks("text_embeddings"):
        return False
    text = store.read_extra("text_embeddings", dtype="float32")
    return text.shape == (n_classes, dim) and np.allclose(np.linalg.norm(text, axis=1), 1.0,
                                                          atol=1e-3)


def _check_same_run(store: FeatureStore, attrs: dict[str, Any], source: ImageSource) -> None:
    """On ranks > 0: the store rank 0 prepared must be the one this rank would have made."""
    mine = {"model": attrs["model"], "pretrained": attrs["pretrained"],
            "seed": attrs["seed"], "token_layer": attrs["token_layer"],
            "files": len(source), "fingerprint": source.fingerprint()}
    theirs = {**{k: store.attrs.get(k) for k in ("model", "pretrained", "seed", "token_layer")},
              "files": store.attrs["source"]["files"],
              "fingerprint": store.attrs["source"]["fingerprint"]}
    for key, value in mine.items():
        if theirs[key] != value:
            raise IncompatibleStoreError(
                f"this rank sees {key}={value!r} but rank 0 made {store.url!r} with "
                f"{key}={theirs[key]!r} (do all nodes see the same files and options?)")


def extract_features(data: str | os.PathLike, out: str, **params: Any) -> FeatureStore:
    """Encode an image folder or file list into the feature store ``out``.

    ``params`` are those of :class:`FeatureExtractor` (``model`` is required). Returns the
    store; see :class:`FeatureExtractor` for the statistics of the run.
    """
    return FeatureExtractor(**params).run(data, out).store_
