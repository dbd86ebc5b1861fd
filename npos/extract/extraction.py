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

Around the :class:`FeatureExtractor` in this module: chunk assembly and the writer thread
(:mod:`npos.extract.writer`), the torchrun process group (:mod:`npos.extract.processes`), and
run statistics and checks (:mod:`npos.extract.outcome`); their public names are re-exported
here.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch

from npos.device import resolve_device
from npos.encoder import (DEFAULT_SEED, autocast, create_encoder, encode_image_tokens,
                          image_preprocess_config, image_transform, resolve_weights)
from npos.errors import IncompatibleStoreError, NposError, ParameterError
from npos.extract.datasets import (ImageDataset, ImageDecodeError, ImageSource,
                                   load_image_source, read_class_names, readable_class_names)
# Re-exported: their historical home is this module (tests and callers import them here).
from npos.extract.outcome import _check_finite as _check_finite
from npos.extract.outcome import (ExtractionStats, TooManyFailedError, _check_same_run,
                                  _checked_text_embeddings, _text_embeddings_ok, check_failed,
                                  tally_reasons)
from npos.extract.processes import DIST_TIMEOUT, _Processes
from npos.extract.text import DEFAULT_TEMPLATES, load_templates, text_embeddings, validate_templates
from npos.extract.writer import (TOKEN_CHUNK_BYTES, _BatchOutput, _ChunkAssembler, _ChunkWriter,
                                 _token_chunk_rows)
from npos.log import third_party_logs
from npos.settings import settings_record
from npos.store import DEFAULT_CHUNK_ROWS, FeatureStore, store_exists
from npos.validation import check_choice, check_float, check_int

__all__ = ["DEFAULT_MAX_FAILED", "DIST_TIMEOUT", "DTYPES", "ON_ERROR", "TOKEN_CHUNK_BYTES",
           "ExtractionStats", "FeatureExtractor", "TooManyFailedError", "check_failed",
           "extract_features", "tally_reasons"]

ON_ERROR = ("skip", "fail")
#: Default of ``npos extract --max-failed``: the share of rows that may fail before a run is
#: an error (the Python API sets no limit by default but still refuses an all-failed store).
DEFAULT_MAX_FAILED = 0.05
DTYPES = ("float16", "float32")


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
        source = load_image_source(data, classes=self.classes, unlabeled=self.unlabeled)
        names, templates = self._resolve_texts(source)
        weights = resolve_weights(self.model, self.pretrained)
        clip: Any = create_encoder(weights, seed=self.seed).to(procs.device)
        preprocess = image_preprocess_config(clip)
        dim, token_shape = self._probe(clip, preprocess, procs.device)
        attrs = {
            "model": self.model,
            "pretrained": weights.identity,
            "preprocess": preprocess,
            "token_layer": self.tokens_layer,
            "source": source.describe(),
            "templates": templates,
            "seed": self.seed if weights.random_init else None,
        }
        store, missing, repaired = self._setup(out, source, names, templates, dim, token_shape,
                                               attrs, clip, procs)
        mine = missing[procs.rank::procs.world_size]
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

    def _probe(self, clip, preprocess: dict[str, Any],
               device: torch.device) -> tuple[int, tuple[int, ...] | None]:
        """Embedding dim and (tokens, width) of one blank image through the encoder."""
        with torch.inference_mode(), autocast(device, self.dtype):
            probe = torch.zeros((1, *_image_shape(preprocess)), device=device)
            if self.tokens_layer is None:
                return int(clip.encode_image(probe).shape[-1]), None
            emb, tok = encode_image_tokens(clip.visual, probe, self.tokens_layer)
            return int(emb.shape[-1]), tuple(int(s) for s in tok.shape[1:])

    def _setup(self, out, source, names, templates, dim, token_shape, attrs, clip,
               procs: _Processes) -> tuple[FeatureStore, list[int], list[int]]:
        """The store, its missing chunks and the damaged chunks cleared for repair.

        Rank 0 validates and prepares the store; the others learn the outcome from it.
        """
        if procs.rank != 0:
            setup = procs.broadcast(None)
            if "error" in setup:
                raise NposError(setup["error"])
            store = FeatureStore.open(out, mode="r+")
            _check_same_run(store, attrs, source)
            return store, setup["missing"], []
        try:
            store = self._prepare_store(out, source, names, templates, dim, token_shape, attrs,
                                        clip)
            repaired = store.damaged_chunks()
            store.mark_undone(repaired)  # the normal resume path encodes them again
            setup = {"missing": store.missing_chunks()}
        except BaseException as exc:
            procs.broadcast({"error": f"{type(exc).__name__} on rank 0: {exc}"})
            raise
        procs.broadcast(setup)
        return store, setup["missing"], repaired

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


def _image_shape(preprocess: dict[str, Any]) -> tuple[int, int, int]:
    """(3, H, W) of the images the preprocessing makes."""
    size = preprocess["size"]
    height, width = (size, size) if isinstance(size, int) else size
    return 3, int(height), int(width)


def _tokenizer(model: str):
    import open_clip

    with third_party_logs():  # open_clip's logging.info() would configure the root logger
        return open_clip.get_tokenizer(model)


def extract_features(data: str | os.PathLike, out: str, **params: Any) -> FeatureStore:
    """Encode an image folder or file list into the feature store ``out``.

    ``params`` are those of :class:`FeatureExtractor` (``model`` is required). Returns the
    store; see :class:`FeatureExtractor` for the statistics of the run.
    """
    return FeatureExtractor(**params).run(data, out).store_
