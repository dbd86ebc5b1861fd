"""``npos synthesize --bank all`` / ``--scope global``: NPOS over every valid row of a store,
per class or class-agnostically (:mod:`npos.synthesize.scale` has the per-bank algorithm,
the seeding and the ``torchrun`` split)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from npos.errors import ParameterError, StoreError
from npos.knn import resolve_knn_backend
from npos.knn.ivf import KnnCache
from npos.knn.store_index import IndexMismatchError
from npos.settings import settings_record
from npos.store import FeatureStore
from npos.synthesize.bank_search import IndexedBank, read_rows
from npos.synthesize.config import SynthesisConfig
from npos.synthesize.offline import QUANTILES, create_outliers_store, format_table
from npos.synthesize.scale import (GLOBAL_KEY, ONE_PROCESS, BankOutliers, Ranks, memory_bank,
                                   synthesize_bank)
from npos.validation import check_int

#: ``--index none``: never use a store index (an in-memory one per bank, as before).
NO_INDEX = "none"


@dataclass
class AllRowsSynthesis:
    """Outliers from every valid row of a store, with what is needed to summarize and write
    them (:meth:`format_summary`, :meth:`write`).

    ``labels`` are class ids (``--scope class``) or -1 (``--scope global``: labels unused);
    ``source_rows`` are the store positions of the rows the outliers were drawn around.
    """

    outliers: torch.Tensor
    labels: torch.Tensor
    knn_distance: torch.Tensor
    source_rows: np.ndarray
    config: SynthesisConfig
    bank: str
    scope: str
    count: int | None
    seed: int
    class_names: list[str] | None
    banks: dict[str, BankOutliers] = field(repr=False)
    device: str = "cpu"
    memory_budget: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def labels_used(self) -> bool:
        return self.scope == "class"

    def summary(self) -> list[dict[str, Any]]:
        """Per-bank rows (class, or one ``all`` row for ``--scope global``) as in
        :meth:`~npos.synthesize.offline.OfflineSynthesis.summary`; several classes add a
        pooled ``all`` row first."""
        def row(name, parts):
            return {"name": name, "rows": sum(int(p.bank_distance.numel()) for p in parts),
                    "bank": _q([p.bank_distance for p in parts]),
                    "boundary": _q([p.bank_distance[p.boundary] for p in parts]),
                    "outliers": _q([p.distance for p in parts]),
                    "outward": float(np.mean([p.outward for p in parts]))}

        rows = [row(name, [part]) for name, part in self.banks.items()]
        return rows if len(rows) == 1 else [row("all", list(self.banks.values())), *rows]

    def format_summary(self) -> list[str]:
        """What ``npos synthesize`` prints."""
        cfg = self.config
        what = (f"{len(self.banks)} classes" if self.scope == "class"
                else "the whole store (labels not used)")
        backends = sorted({b.backend for b in self.banks.values()})
        lines = [f"{len(self)} outliers from {what} (npos bank={self.bank} scope={self.scope}: "
                 f"k={cfg.k} select={cfg.select} "
                 + (f"pick={cfg.pick} " if self.scope == "class" else f"count={self.count} ")
                 + f"candidates={cfg.candidates} keep={cfg.keep} noise={cfg.noise_space} "
                 f"sigma={cfg.resolved_sigma:g} seed={self.seed} "
                 f"backend={','.join(backends)})",
                 f"acceptance ratio: {cfg.keep / cfg.candidates:.4g} (share of candidates kept)"]
        return lines + format_table(self.summary())

    def write(self, out: str, *, source: FeatureStore, overwrite: bool = False) -> FeatureStore:
        """Write the outliers store; ``ids`` are the source row's id + ``#`` + outlier row, and
        ``synthesis`` records ``bank``, ``scope``, ``count`` and ``labels_used``."""
        source_ids = source.read_rows("ids")
        ids = np.array([f"{source_ids[r]}#{i}" for i, r in enumerate(self.source_rows.tolist())])
        extra = {"bank": self.bank, "scope": self.scope, "count": self.count,
                 "labels_used": self.labels_used, "seed": self.seed}
        return create_outliers_store(
            out, source, embeddings=self.outliers.float().numpy(),
            labels=self.labels.numpy().astype(np.int32),
            distance=self.knn_distance.numpy(), ids=ids,
            class_names=self.class_names if self.labels_used else None,
            synthesis={**self.config.to_dict(), **extra},
            settings=settings_record(self.config, **extra, memory_budget=self.memory_budget,
                                     device=self.device, features=source.url),
            overwrite=overwrite)


def _q(parts: list[torch.Tensor]) -> list[float]:
    return np.quantile(torch.cat(parts).double().numpy(), QUANTILES).tolist()


def _bytes(n: int) -> str:
    return f"{n / 2**20:.0f}MiB" if n < 2**30 else f"{n / 2**30:.1f}GiB"


def class_groups(counts: dict[int, int], dim: int, memory_budget: int) -> list[list[int]]:
    """Classes (ascending) grouped so that each group's float32 rows fit the budget; one store
    pass reads a group. Refuses a class that alone exceeds it (naming --memory-budget)."""
    groups: list[list[int]] = [[]]
    held = 0
    for c, n in sorted(counts.items()):
        size = 4 * n * dim
        if size > memory_budget:
            raise ParameterError(
                f"--memory-budget {_bytes(memory_budget)} cannot hold class {c} ({n} rows x "
                f"{dim} float32 = {_bytes(size)}); use --memory-budget {_bytes(2 * size)}")
        if held + size > memory_budget and groups[-1]:
            groups.append([])
            held = 0
        groups[-1].append(c)
        held += size
    return [g for g in groups if g]


def check_class_bank(config: SynthesisConfig, counts: dict[int, int], names: list[str]) -> None:
    """``--bank all``: every class needs more than K rows and at least ``select``."""
    c, n = min(counts.items(), key=lambda item: item[1])
    if config.k >= n:
        raise ParameterError(
            f"--bank all needs --k below every class's row count: class {names[c]!r} has {n} "
            f"rows; use --k {max(1, n - 1)} or less (or --bank sample)")
    if config.select > n:
        raise ParameterError(
            f"--bank all needs --select at most every class's row count: class {names[c]!r} "
            f"has {n} rows; use --select {n} or less")


def check_global_bank(config: SynthesisConfig, n: int, count: int | None, dim: int,
                      memory_budget: int, *, indexed: bool = False) -> None:
    """``--scope global``: --count given, K and select below the rows, and (without a store
    index, ``indexed``) the rows fit."""
    if count is None:
        raise ParameterError("--scope global needs --count (outliers in total), e.g. "
                             "--count 1000")
    check_int("--count", count, 1, why=" (outliers in total), e.g. --count 1000")
    if config.k >= n:
        raise ParameterError(f"--k {config.k} must be below the store's {n} valid rows; use "
                             f"--k {max(1, n - 1)} or less")
    if config.select > n:
        raise ParameterError(f"--select {config.select} exceeds the store's {n} valid rows; "
                             f"use --select {n} or less")
    size = 4 * n * dim
    if size > memory_budget and not indexed:
        raise ParameterError(
            f"--memory-budget {_bytes(memory_budget)} cannot hold the {n} rows x {dim} float32 "
            f"(= {_bytes(size)}) that --scope global indexes in memory; use --memory-budget "
            f"{_bytes(2 * size)}, or build the store's index ('npos index build') so the rows "
            "are streamed")


def find_index(store: FeatureStore, index: str | None, device: torch.device) -> Any:
    """The store index synthesis uses: ``index`` a path (opened, refused in one line when it
    does not match the store), ``None`` (the default location when an index is there) or
    ``"none"`` (never). On a GPU when the engine is and faiss has one; else the CPU."""
    from npos.knn import faiss_gpus
    from npos.knn.store_index import StoreIndex

    if index == NO_INDEX:
        return None
    on = "cuda" if device.type == "cuda" and faiss_gpus() > 0 else "cpu"
    return StoreIndex.find(index, store=store, device=on)


def _global(store, config, positions, count, index, run, device, memory_budget, seed):
    check_global_bank(config, positions.size, count, store.dim, memory_budget,
                      indexed=index is not None)
    assert count is not None  # checked just above
    sources = -(-count // config.keep)
    if index is not None:
        if not np.array_equal(index.rows, positions):
            raise IndexMismatchError(f"index {index.path!r} does not hold the store's readable "
                                     f"rows; rebuild it with 'npos index build {store.url} "
                                     "--overwrite'")
        part = run(IndexedBank(store, index, positions), sources, GLOBAL_KEY)
    else:
        raw = torch.from_numpy(read_rows(store, positions)).to(device)
        part = run(memory_bank(raw, config, seed=seed, memory_budget=memory_budget,
                               key=GLOBAL_KEY), sources, GLOBAL_KEY)
    return AllRowsSynthesis(
        part.outliers[:count], torch.full((count,), -1, dtype=torch.int64),
        part.distance[:count], positions[part.source[:count].numpy()], config, "all",
        "global", count, seed, None, {"all": part}, str(device), memory_budget)


def synthesize_all_rows(store: FeatureStore, config: SynthesisConfig, *, scope: str,
                        count: int | None, seed: int, device: torch.device,
                        memory_budget: int, ranks: Ranks = ONE_PROCESS,
                        index: str | None = None) -> AllRowsSynthesis:
    """NPOS over all valid rows: per class (``scope="class"``: ``pick * keep`` outliers per
    class) or over the whole store (``scope="global"``: ``count`` outliers, labels ignored).
    ``index`` (:func:`find_index`): the store index serves ``--scope global`` and the classes
    the ``auto`` policy sends to IVF. See :func:`npos.synthesize.offline.synthesize_store` for
    the other parameters."""
    if config.method != "npos":
        raise ParameterError(f"--bank all and --scope global run --method npos only; got "
                             f"--method {config.method}")
    positions = np.flatnonzero(store.readable_rows())
    labels = store.read_rows("labels")[positions].astype(np.int64)
    cache = KnnCache()

    def run(bank, sources: int, key: int) -> BankOutliers:
        return synthesize_bank(bank, config, sources=sources, key=key, seed=seed,
                               memory_budget=memory_budget, ranks=ranks)

    if scope == "global":
        return _global(store, config, positions, count, find_index(store, index, device), run,
                       device, memory_budget, seed)
    if not (labels >= 0).any():
        raise StoreError(f"store {store.url!r} has no labelled rows: --scope class needs class "
                         "labels; use --scope global --count N for an unlabeled store")
    names = store.class_names or [f"class{c}" for c in range(int(labels.max()) + 1)]
    present = np.bincount(labels[labels >= 0], minlength=len(names))
    counts = {c: int(n) for c, n in enumerate(present) if n > 0}
    check_class_bank(config, counts, names)
    # the auto policy: classes it sends to IVF use the store index (filtered to the class)
    large = {c for c, n in counts.items() if resolve_knn_backend(config.backend, n) == "faiss-ivf"}
    store_index = (find_index(store, index, torch.device("cpu"))  # filters run on the CPU
                   if large or index not in (None, NO_INDEX) else None)
    if store_index is None:
        large = set()
    parts: dict[str, BankOutliers] = {}
    rows: dict[int, np.ndarray] = {}
    for c in sorted(large):
        mine = positions[labels == c]
        parts[names[c]] = run(IndexedBank(store, store_index, mine, among=True), config.pick, c)
        rows[c] = mine[parts[names[c]].source.numpy()]
    in_memory = {c: n for c, n in counts.items() if c not in large}
    for group in class_groups(in_memory, store.dim, memory_budget) if in_memory else []:
        in_group = np.isin(labels, group)
        raw_group = read_rows(store, positions[in_group])
        for c in group:
            mine = labels[in_group] == c
            raw = torch.from_numpy(raw_group[mine]).to(device)
            bank = memory_bank(raw, config, seed=seed, memory_budget=memory_budget,
                               cache=cache, key=c)
            parts[names[c]] = run(bank, config.pick, c)
            rows[c] = positions[in_group][mine][parts[names[c]].source.numpy()]
        del raw_group
    classes = list(counts)
    return AllRowsSynthesis(
        torch.cat([parts[names[c]].outliers for c in classes]),
        torch.tensor(classes, dtype=torch.int64).repeat_interleave(config.pick * config.keep),
        torch.cat([parts[names[c]].distance for c in classes]),
        np.concatenate([rows[c] for c in classes]), config, "all", scope, None, seed, names,
        {names[c]: parts[names[c]] for c in classes}, str(device), memory_budget)
