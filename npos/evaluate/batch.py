"""`score`: per-row OOD scores of any store, written to ``.csv``, ``.parquet`` or ``.zarr``.

Output formats (chosen by the suffix of ``out``):

* ``.csv`` — header ``id,SCORE1,SCORE2,...``; one line per readable row of the store, in store
  order; floats written with full (round-trip) precision. The settings that produced the
  scores go to a sidecar ``FILE.csv.json`` (so the csv itself stays plain for pandas/``csv``).
* ``.parquet`` — the same columns (``id`` string, one float64 column per score); needs
  ``pyarrow`` (``pip install "npos[parquet]"``); the settings are the schema metadata key
  ``npos.settings`` (JSON).
* ``.zarr`` — a feature store of kind ``scores`` with the same rows and chunking as the input:
  ``embeddings`` (N, S) float32 holds the scores, one column per name in the group attribute
  ``score_names``; ``ids`` and ``labels`` are copied; rows that are invalid in the input are
  NaN (and ``valid`` is copied); the settings are the group attribute ``settings``. Read it
  with ``FeatureStore.open(out).read()`` or plain zarr.

The settings record (:func:`read_score_settings`) is the one of ``metrics.json``: npos
version, the resolved :class:`~npos.evaluate.ScoringConfig`, the input store URLs.

Under ``torchrun`` every rank scores batches ``rank, rank + W, ...`` (runs of whole chunks).
For ``.zarr`` each rank writes its own chunks (so the output must be on storage all ranks
see); for ``.csv``/``.parquet`` the ranks send their scores to rank 0, which writes the file
atomically (temporary sibling, then ``os.replace``). The result equals a single-process run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npos.atomic import atomic_path, check_output
from npos.errors import MissingDependencyError, OutputExistsError, ParameterError
from npos.evaluate.batching import Distributed, Shard, n_shard_batches, shard_batches
from npos.evaluate.config import ScoringConfig, scoring_config
from npos.evaluate.inputs import (ScoringSetup, build_scorer, count_skipped, describe_skipped,
                                  open_store)
from npos.log import get_logger
from npos.store import FeatureStore, store_exists

FORMATS = {".csv": "csv", ".parquet": "parquet", ".zarr": "zarr"}
#: The parquet schema metadata key holding the settings record (JSON).
PARQUET_SETTINGS_KEY = "npos.settings"


@dataclass
class ScoreSummary:
    """What a :func:`score_store` run did (the same on every rank)."""

    out: str
    format: str
    scores: list[str]
    rows: int
    seconds: float
    processes: int
    #: This process's rank (0 without torchrun); only rank 0 should print the summary.
    rank: int = 0
    #: Rows left out (csv/parquet) or NaN (zarr) because their input failed (``valid`` False).
    skipped: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"scored {self.rows} rows ({', '.join(self.scores)}) in {self.seconds:.2f} s "
                f"({self.rows_per_s:,.0f} rows/s, {self.processes} process"
                f"{'es' if self.processes > 1 else ''}) -> {self.out}")


def output_format(out: str | os.PathLike) -> str:
    """``"csv"``, ``"parquet"`` or ``"zarr"`` from the suffix of ``out``."""
    suffix = Path(str(out).rstrip("/")).suffix.lower()
    if suffix not in FORMATS:
        raise ParameterError(f"cannot tell the output format of {str(out)!r}: use a name ending "
                             f"in {', '.join(FORMATS)}")
    return FORMATS[suffix]


def _require_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            'writing .parquet needs pyarrow: pip install "npos[parquet]"') from None
    return pyarrow


def settings_sidecar(out: str | os.PathLike) -> str:
    """Where a ``.csv`` score file's settings go: ``out + ".json"``."""
    return f"{out}.json"


def read_score_settings(out: str | os.PathLike) -> dict[str, Any]:
    """The settings record a score file was written with (any of the three formats)."""
    fmt = output_format(out)
    if fmt == "csv":
        return json.loads(Path(settings_sidecar(out)).read_text(encoding="utf-8"))
    if fmt == "parquet":
        metadata = _require_pyarrow().parquet.read_schema(str(out)).metadata or {}
        return json.loads(metadata[PARQUET_SETTINGS_KEY.encode()])
    return dict(FeatureStore.open(str(out)).attrs["settings"])


def _check_out(out: str, fmt: str, overwrite: bool) -> None:
    if fmt == "zarr":
        if store_exists(out) and not overwrite:
            raise OutputExistsError(f"score store {out!r} already exists; pass --overwrite to "
                                    "replace it")
    else:
        check_output(out, overwrite=overwrite, what="score file")
        if fmt == "csv":
            check_output(settings_sidecar(out), overwrite=overwrite,
                         what="score settings file")


def score_store(
    store: str | os.PathLike | FeatureStore,
    out: str | os.PathLike,
    config: ScoringConfig | None = None,
    *,
    head: Any = None,
    train: str | os.PathLike | FeatureStore | None = None,
    overwrite: bool = False,
    progress: bool = False,
    threshold: str | float | None = None,
    **options: Any,
) -> ScoreSummary:
    """Score every readable row of ``store`` and write the scores to ``out``.

    Parameters
    ----------
    store : path or FeatureStore
        Any complete feature store (labels are not needed).
    out : path
        ``.csv``, ``.parquet`` or ``.zarr`` (see the module docstring).
    config : ScoringConfig, optional
        As in :func:`npos.evaluate.evaluate`; ``batch_size`` is rows per batch, rounded down
        to whole store chunks (at least one chunk).
    head, train
        As in :func:`npos.evaluate.evaluate`. Class text embeddings come from ``train`` when
        it has them, else from ``store``.
    overwrite : bool
        Replace an existing ``out``.
    progress : bool
        Progress bar (on rank 0).
    threshold : str or float, optional
        ``"auto"`` (the head's ``thresholds.json``), a number or a thresholds file: adds a
        column ``is_ood`` (1 = OOD: the first score is below the threshold; NaN where the
        score is) after the scores (:mod:`npos.evaluate.calibration`).
    **options
        :class:`ScoringConfig` fields overriding ``config`` (the former keyword arguments).

    Returns
    -------
    ScoreSummary
    """
    from npos.device import resolve_device

    config = scoring_config(config, **options)
    out = str(out)
    fmt = output_format(out)
    if fmt == "parquet":
        _require_pyarrow()
    dist = Distributed(str(resolve_device(config.device)))
    # Only rank 0 writes a csv/parquet file (its folder may exist on rank 0's node only);
    # a zarr output is written by every rank, so every rank checks it.
    if fmt == "zarr" or dist.shard.is_main:
        _check_out(out, fmt, overwrite)
    fs = open_store(store, kinds=("features", "outliers"), what="score")
    with dist:
        setup = build_scorer({"store": fs}, config, head=head, train=train, device=dist.device)
        _fusion_reference(setup, train)
        names = list(setup.scorer.scores)
        cut = None
        if threshold is not None:
            from npos.evaluate.calibration import resolve_threshold

            cut = resolve_threshold(threshold, names[0], head=head)
            names.append("is_ood")
        batch_size = setup.config.batch_size
        skipped = count_skipped(fs)
        settings = setup.record(store=fs.url, skipped_invalid=skipped)
        message = describe_skipped({f"store {fs.url!r}": skipped})
        if message and dist.shard.is_main:
            get_logger(__name__).warning(message)
        if cut is not None:
            settings["threshold"] = {"score": names[0], "value": cut}
        dist.barrier()  # every rank has validated `out` before rank 0 creates it
        start = time.perf_counter()
        target = None
        if fmt == "zarr":
            if dist.shard.is_main:
                target = _create_score_store(fs, out, names, setup, settings, overwrite)
            dist.barrier()
            if target is None:
                target = FeatureStore.open(out, mode="r+")
        parts = _score_shard(setup.scorer, fs, batch_size, dist.shard, target, progress, cut)
        gathered = dist.gather_to_main(parts) if fmt != "zarr" else None
        if dist.shard.is_main and gathered is not None:
            _write_table(fs, out, fmt, names, gathered, batch_size, overwrite, settings)
        dist.barrier()
        seconds = time.perf_counter() - start
    rows = int(fs.readable_rows().sum())
    return ScoreSummary(out=out, format=fmt, scores=names, rows=rows, seconds=seconds,
                        processes=dist.world, rank=dist.rank, skipped=skipped)


def _fusion_reference(setup: ScoringSetup, train: Any) -> None:
    """Fusions in ``npos score`` are rank-normalized against the train store's scores."""
    if not setup.scorer.fusions:
        return
    if train is None:
        raise ParameterError(f"fusion(s) {', '.join(setup.scorer.fusions)} need reference ID "
                             "scores: pass --train TRAIN_STORE")
    from npos.evaluate.evaluation import score_rows

    reference, _, _ = score_rows(setup, open_store(train), batch_size=setup.config.batch_size,
                                 components=True)
    setup.scorer.set_reference(reference)


def _score_shard(scorer, fs: FeatureStore, batch_size: int, shard: Shard,
                 target: FeatureStore | None, progress: bool, cut: float | None = None):
    """Score this shard's batches; write zarr chunks directly or return ``(rows, matrix)``."""
    from tqdm.auto import tqdm

    rows_out: list[np.ndarray] = []
    mats: list[np.ndarray] = []
    bar = tqdm(shard_batches(fs, batch_size, ("embeddings",), shard=shard),
               total=n_shard_batches(fs, batch_size, shard), desc="scoring", unit="batch",
               disable=not (progress and shard.is_main))
    for batch in bar:
        rows = batch["row"]
        if len(rows):
            scored = scorer.score(batch["embeddings"])
            matrix = np.stack([scored[name] for name in scorer.scores], axis=1)
            if cut is not None:
                from npos.evaluate.calibration import is_ood

                matrix = np.column_stack([matrix, is_ood(matrix[:, 0], cut)])
        else:
            matrix = np.zeros((0, len(scorer.scores) + (cut is not None)))
        if target is None:
            rows_out.append(rows)
            mats.append(matrix)
        else:
            _write_chunks(fs, target, batch["chunks"], rows, matrix)
    if target is not None:
        return None
    return (np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64),
            np.concatenate(mats) if mats else np.zeros((0, len(scorer.scores) + (cut is not None))))


def _create_score_store(fs: FeatureStore, out: str, names: list[str], setup: ScoringSetup,
                        settings: dict[str, Any], overwrite: bool) -> FeatureStore:
    target = FeatureStore.create(
        out, n_rows=fs.n_rows, dim=len(names), dtype="float32", chunk_rows=fs.chunk_rows,
        kind="scores", class_names=fs.class_names, overwrite=overwrite,
        attrs={"score_names": names, "scoring": setup.settings(), "settings": settings,
               "source_store": {"url": fs.url, "fingerprint": fs.fingerprint()}})
    if fs.has("valid"):
        target.add_array("valid", (), "bool", fill_value=True)
    return target


def _write_chunks(fs: FeatureStore, target: FeatureStore, chunks: range, rows: np.ndarray,
                  matrix: np.ndarray) -> None:
    for index in chunks:
        sl = fs.chunk_slice(index)
        block = np.full((sl.stop - sl.start, matrix.shape[1]), np.nan, dtype=np.float32)
        inside = (rows >= sl.start) & (rows < sl.stop)
        block[rows[inside] - sl.start] = matrix[inside]
        arrays = {"embeddings": block, "ids": np.asarray(fs.array("ids")[sl]),
                  "labels": np.asarray(fs.array("labels")[sl])}
        if fs.has("valid"):
            arrays["valid"] = np.asarray(fs.array("valid")[sl])
        target.write_chunk(index, **arrays)


def _write_table(fs: FeatureStore, out: str, fmt: str, names: list[str], gathered,
                 batch_size: int, overwrite: bool, settings: dict[str, Any]) -> None:
    """Rank 0: put every rank's scores in store order and write ``out`` atomically (a csv's
    settings go to its sidecar ``out + ".json"`` first, a parquet's into its schema)."""
    full = np.full((fs.n_rows, len(names)), np.nan)
    for rows, matrix in gathered:
        full[rows] = matrix
    if fmt == "csv":
        with atomic_path(settings_sidecar(out), overwrite=overwrite, directory=False,
                         what="score settings file") as tmp:
            tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    with atomic_path(out, overwrite=overwrite, directory=False, what="score file") as tmp:
        writer = _CsvWriter(tmp, names) if fmt == "csv" else \
            _ParquetWriter(tmp, names, settings)
        try:
            for batch in shard_batches(fs, batch_size, ("ids",)):
                if len(batch["row"]):
                    writer.write(batch["ids"], full[batch["row"]])
        finally:
            writer.close()


class _CsvWriter:
    def __init__(self, path: Path, names: list[str]):
        import csv

        self._file = open(path, "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(["id", *names])

    def write(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        self._csv.writerows([i, *row] for i, row in zip(ids.tolist(), matrix.tolist()))

    def close(self) -> None:
        self._file.close()


class _ParquetWriter:
    def __init__(self, path: Path, names: list[str], settings: dict[str, Any]):
        pa = _require_pyarrow()
        import pyarrow.parquet as pq

        self._pa = pa
        self._names = names
        self._schema = pa.schema([("id", pa.string()), *((n, pa.float64()) for n in names)],
                                 metadata={PARQUET_SETTINGS_KEY: json.dumps(settings)})
        self._writer = pq.ParquetWriter(str(path), self._schema)

    def write(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        columns = [self._pa.array(ids.tolist(), type=self._pa.string()),
                   *(self._pa.array(matrix[:, j]) for j in range(len(self._names)))]
        self._writer.write_table(self._pa.Table.from_arrays(columns, schema=self._schema))

    def close(self) -> None:
        self._writer.close()
