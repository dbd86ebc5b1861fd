"""Offline synthesis over a cached feature store: class banks, a tuning summary, an outliers
store. This is what ``npos synthesize`` runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from npos.device import resolve_device
from npos.errors import ParameterError, StoreError, StoreExistsError
from npos.knn.kth import DEFAULT_MEMORY_BUDGET
from npos.settings import settings_record
from npos.store import IDENTITY_KEYS, FeatureStore, store_exists
from npos.synthesize.config import BANKS, SCOPES, SynthesisConfig
from npos.synthesize.engine import SynthesisResult, SynthesisStats, synthesize
from npos.synthesize.scale import ONE_PROCESS, Ranks
from npos.validation import check_choice, check_int, parameter_error

if TYPE_CHECKING:
    from npos.synthesize.all_rows import AllRowsSynthesis

#: Attributes copied from the source store so that the outliers store has its fingerprint.
#: The source's identity (so fingerprints match) and token layer travel to the outliers store.
CARRIED_ATTRS = (*IDENTITY_KEYS, "token_layer")
QUANTILES = (0.1, 0.5, 0.9)
#: Store kinds synthesis takes as its bank (an outliers store is never training data).
KINDS = ("features",)


@dataclass
class ClassBanks:
    """Per-class banks drawn from a flat, labelled bank.

    Attributes
    ----------
    banks : Tensor of shape (R, Q, D)
        float32 banks of the R classes with at least Q rows, ascending class id.
    classes : Tensor of shape (R,)
        Their class ids.
    rows : Tensor of shape (R, Q)
        Position of every bank point in the flat input.
    counts : dict[int, int]
        Rows per class id, for every labelled class.
    skipped : dict[int, int]
        Classes with fewer than Q rows, and their row counts.
    """

    banks: torch.Tensor
    classes: torch.Tensor
    rows: torch.Tensor
    counts: dict[int, int]
    skipped: dict[int, int]


def class_banks(embeddings: torch.Tensor, labels: torch.Tensor, queue: int, *,
                generator: torch.Generator, num_classes: int | None = None) -> ClassBanks:
    """Stack a bank of ``queue`` rows per class from a flat bank with labels.

    A class with more than ``queue`` rows gets a seeded random sample (the first ``queue``
    entries of ``torch.randperm(n_c, generator=generator)``, drawn class by class in
    ascending order, kept in input order); one with exactly ``queue`` rows gets them all;
    one with fewer is skipped and reported. Rows labelled -1 are ignored.

    Parameters
    ----------
    embeddings : Tensor of shape (N, D)
    labels : Tensor of shape (N,)
    queue : int
        Q, the bank size per class.
    generator : torch.Generator
    num_classes : int, optional
        C; default ``labels.max() + 1``.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ParameterError(
            f"embeddings (N, D) and labels (N,) must agree; got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}")
    labels = labels.to("cpu", torch.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    starts = torch.searchsorted(labels[order], torch.arange(num_classes))
    chosen, classes, skipped = [], [], {}
    for c in range(num_classes):
        n = int(counts[c])
        if n < queue:
            skipped[c] = n
            continue
        members = order[int(starts[c]):int(starts[c]) + n]
        if n > queue:
            pick = torch.randperm(n, generator=generator, device=generator.device)[:queue]
            members = members[pick.cpu().sort().values]
        chosen.append(members)
        classes.append(c)
    dim = embeddings.shape[1]
    if not chosen:
        return ClassBanks(torch.empty((0, queue, dim)), torch.empty(0, dtype=torch.int64),
                          torch.empty((0, queue), dtype=torch.int64),
                          {c: int(n) for c, n in enumerate(counts)}, skipped)
    rows = torch.stack(chosen)
    return ClassBanks(embeddings[rows.to(embeddings.device)].float(),
                      torch.tensor(classes, dtype=torch.int64), rows,
                      {c: int(n) for c, n in enumerate(counts)}, skipped)


@dataclass
class OfflineSynthesis:
    """Outliers synthesized from a store, with what is needed to summarize and write them.

    ``result.labels`` and ``result.stats.classes`` hold real class ids (not bank positions).
    """

    result: SynthesisResult
    banks: ClassBanks
    config: SynthesisConfig
    queue: int
    seed: int
    class_names: list[str]
    source_ids: np.ndarray = field(repr=False)
    device: str = "cpu"

    def summary(self) -> list[dict[str, Any]]:
        """Per-class rows for tuning: quantiles (:data:`QUANTILES`) of the K-th-NN distance of
        bank points, boundary points (``npos``) and kept outliers, and the outward ratio: the
        share of candidates farther from their bank than the point they were drawn around
        (``npos``, ``gaussian``). The first row, class ``None``, pools all classes."""
        stats = self.result.stats
        assert stats is not None  # synthesize_store asks the engine for them
        n_ready = stats.classes.numel()
        q = torch.tensor(QUANTILES)
        kept = self.result.knn_distance.view(n_ready, -1)
        boundary = (stats.bank_distance.gather(1, stats.boundary)
                    if stats.boundary is not None else None)
        outward = None
        if stats.sources is not None:
            source_d = stats.bank_distance.gather(1, stats.sources).unsqueeze(-1)
            outward = (stats.candidate_distance > source_d).flatten(1).float()

        def row(c, sl):
            return {
                "class": c,
                "name": "all" if c is None else self.class_names[c],
                "rows": (sum(self.banks.counts[int(x)] for x in stats.classes) if c is None
                         else self.banks.counts[c]),
                "bank": torch.quantile(stats.bank_distance[sl].flatten(), q).tolist(),
                "boundary": (torch.quantile(boundary[sl].flatten(), q).tolist()
                             if boundary is not None else None),
                "outliers": torch.quantile(kept[sl].flatten(), q).tolist(),
                "outward": float(outward[sl].mean()) if outward is not None else None,
            }

        rows = [row(None, slice(None))]
        rows += [row(int(c), slice(i, i + 1)) for i, c in enumerate(stats.classes)]
        return rows

    @property
    def acceptance(self) -> float:
        """Share of the candidates kept: keep / candidates (``npos``, ``vos``) or 1
        (``gaussian``, which keeps every draw)."""
        if self.config.method == "gaussian":
            return 1.0
        return self.config.keep / self.config.candidates

    def format_summary(self) -> list[str]:
        """The summary as text lines (what ``npos synthesize`` prints)."""
        cfg = self.config
        used = {"npos": ("k", "select", "pick", "candidates", "keep"),
                "vos": ("k", "pick", "candidates", "keep"),
                "gaussian": ("k", "pick", "keep")}[cfg.method]
        params = " ".join(f"{name}={getattr(cfg, name)}" for name in used)
        noise = f"noise={cfg.noise_space}"
        if cfg.method != "vos":
            noise += f" sigma={cfg.resolved_sigma:g}"
        lines = [
            f"{len(self.result)} outliers from {self.banks.classes.numel()} classes "
            f"({cfg.method}: {params} {noise} queue={self.queue} seed={self.seed})",
        ]
        if self.banks.skipped:
            listed = ", ".join(f"{self.class_names[c]} ({n})"
                               for c, n in list(self.banks.skipped.items())[:20])
            more = " ..." if len(self.banks.skipped) > 20 else ""
            lines.append(f"skipped {len(self.banks.skipped)} classes with fewer than "
                         f"{self.queue} rows: {listed}{more}")
        lines.append(f"acceptance ratio: {self.acceptance:.4g} (share of candidates kept)")
        return lines + format_table(self.summary())

    def write(self, out: str, *, source: FeatureStore, overwrite: bool = False) -> FeatureStore:
        """Write the outliers store (:func:`write_outliers`)."""
        return write_outliers(self, out, source=source, overwrite=overwrite)


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """The summary table: per row (``name``, ``rows``, quantiles of ``bank``, ``boundary`` and
    ``outliers`` distances, ``outward``), under a header."""
    lines = ["K-th-NN distance, quantiles " + "/".join(f"{int(x * 100)}%" for x in QUANTILES)]
    width = max(5, *(len(r["name"]) for r in rows))
    lines.append(f"{'class':<{width}} {'rows':>7}  {'bank':^20}  {'boundary':^20}  "
                 f"{'outliers':^20}  outward")

    def fmt(values):
        return " ".join(f"{v:6.3f}" for v in values) if values is not None else f"{'-':^20}"

    for r in rows:
        outward = f"{r['outward']:7.3f}" if r["outward"] is not None else f"{'-':>7}"
        lines.append(f"{r['name']:<{width}} {r['rows']:>7}  {fmt(r['bank'])}  "
                     f"{fmt(r['boundary'])}  {fmt(r['outliers'])}  {outward}")
    return lines


def synthesize_store(store: FeatureStore | str, config: SynthesisConfig, *, queue: int = 1000,
                     seed: int = 0, device=None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                     bank: str = "sample", scope: str = "class", count: int | None = None,
                     ranks: Ranks | None = None,
                     index: str | None = None) -> OfflineSynthesis | AllRowsSynthesis:
    """Synthesize outliers from a features store.

    ``bank="sample"``, ``scope="class"`` (the paper): one
    ``torch.Generator(device).manual_seed(seed)`` first draws the class banks
    (:func:`class_banks`, ``queue`` rows per class), then the synthesis noise
    (:func:`~npos.synthesize.synthesize`). Same store, parameters, seed and device type =>
    same outliers.

    ``bank="all"`` (every valid row of each class) or ``scope="global"`` (every valid row,
    labels ignored, ``count`` outliers in total): :mod:`npos.synthesize.all_rows`, returning
    an :class:`~npos.synthesize.all_rows.AllRowsSynthesis`. ``memory_budget`` then also
    bounds the float32 rows held at once (classes are read in groups that fit), and
    ``ranks`` (a :class:`~npos.synthesize.scale.Ranks`) splits the work of a ``torchrun`` job.
    ``index``: the store's persisted index (``npos index build``) those use: a path, ``None``
    (``STORE.index`` when it exists) or ``"none"`` (never; an in-memory index per bank).

    Raises
    ------
    ParameterError
        Invalid parameters (checked before reading the store), or no class with at least
        ``queue`` rows.
    StoreError
        The store has no labelled rows, is not a features store (synthesis takes
        :data:`KINDS`), or lost a chunk file.
    """
    check_choice("--bank", bank, BANKS)
    check_choice("--scope", scope, SCOPES)
    if count is not None and scope != "global":
        raise ParameterError("--count sets the total of --scope global; with --scope class "
                             "each class gives --pick x --keep outliers")
    if bank == "sample" and scope == "class":
        if index not in (None, "none"):
            raise ParameterError(f"--index {index} serves --bank all and --scope global; "
                                 "--bank sample searches its --queue-row banks in memory "
                                 "(drop --index, or pass --bank all)")
        check_int("queue", queue, 2)
        config.validate(bank_size=queue, bank_name="queue")
    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(store)
    store.check_kind(KINDS, what="synthesize")
    device = resolve_device(device)
    if bank == "all" or scope == "global":
        from npos.synthesize.all_rows import synthesize_all_rows  # it imports this module

        return synthesize_all_rows(store, config, scope=scope, count=count, seed=seed,
                                   device=device, memory_budget=memory_budget,
                                   ranks=ranks or ONE_PROCESS, index=index)
    labels = torch.from_numpy(store.read("labels").astype(np.int64))
    if not (labels >= 0).any():
        raise StoreError(f"store {store.url!r} has no labelled rows: --scope class needs class "
                         "labels; use --scope global --count N for an unlabeled store")
    names = store.class_names or [f"class{c}" for c in range(int(labels.max()) + 1)]
    embeddings = store.read("embeddings", dtype="float32", as_torch=True)
    generator = torch.Generator(device).manual_seed(seed)
    banks = class_banks(embeddings, labels, queue, generator=generator, num_classes=len(names))
    if banks.classes.numel() == 0:
        largest = max(banks.counts.values(), default=0)
        raise parameter_error(
            f"no class of {store.url!r} has at least --queue={queue} rows (the largest has "
            f"{largest}).", params=("queue",), reason=f"the largest class has {largest} rows",
            suggestion={"queue": largest, **config.fitting(largest)} if largest >= 2 else None)
    result = synthesize(banks.banks.to(device), config, generator=generator,
                        memory_budget=memory_budget, return_stats=True)
    # positions in the stacked banks -> class ids; everything back on the CPU
    stats = result.stats
    assert stats is not None and result.source_index is not None  # return_stats=True
    result = SynthesisResult(
        result.outliers.cpu(), banks.classes[result.labels.cpu()], result.knn_distance.cpu(),
        result.source_index.cpu(),
        SynthesisStats(banks.classes, stats.bank_distance.cpu(), _cpu(stats.boundary),
                       _cpu(stats.sources), stats.candidate_distance.cpu()))
    return OfflineSynthesis(result, banks, config, queue, seed, names, store.read("ids"),
                            str(device))


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def check_output(out: str, *, overwrite: bool) -> None:
    """Refuse an existing output before any work (``overwrite`` allows replacing it)."""
    if store_exists(out) and not overwrite:
        raise StoreExistsError(f"{out!r} already exists; pass --overwrite to replace it")


def write_outliers(offline: OfflineSynthesis, out: str, *, source: FeatureStore,
                   overwrite: bool = False, chunk_rows: int = 4096) -> FeatureStore:
    """Write an outliers store: ``embeddings`` (M, D) float32, ``labels`` (source class),
    ``knn_distance``, ``ids`` (the source row's id + ``#`` + outlier row; ``vos/<class>#row``
    for ``vos``). Attributes: the source store's model/pretrained/preprocess/token_layer (same
    fingerprint), ``synthesis`` (all parameters, queue, seed), ``source`` (the store) and
    ``settings`` (:func:`npos.settings.settings_record`: the npos version, every parameter, the
    device used, the input store)."""
    res = offline.result
    assert res.source_index is not None  # offline results always carry their sources
    m, dim = res.outliers.shape
    bank_pos = torch.searchsorted(offline.banks.classes, res.labels)
    src_rows = torch.where(
        res.source_index >= 0,
        offline.banks.rows[bank_pos, res.source_index.clamp_min(0)], -1).numpy()
    ids = np.array([
        f"{offline.source_ids[r]}#{i}" if r >= 0 else f"vos/{offline.class_names[c]}#{i}"
        for i, (r, c) in enumerate(zip(src_rows.tolist(), res.labels.tolist(), strict=True))])
    return create_outliers_store(
        out, source, embeddings=res.outliers.float().numpy(), labels=res.labels.numpy(),
        distance=res.knn_distance.numpy(), ids=ids, class_names=offline.class_names,
        synthesis={**offline.config.to_dict(), "queue": offline.queue, "seed": offline.seed},
        settings=settings_record(offline.config, queue=offline.queue, seed=offline.seed,
                                 device=offline.device, features=source.url),
        overwrite=overwrite, chunk_rows=chunk_rows)


def create_outliers_store(out: str, source: FeatureStore, *, embeddings: np.ndarray,
                          labels: np.ndarray, distance: np.ndarray, ids: np.ndarray,
                          class_names: list[str] | None, synthesis: dict[str, Any],
                          settings: dict[str, Any], overwrite: bool = False,
                          chunk_rows: int = 4096) -> FeatureStore:
    """An outliers store of ``embeddings`` (M, D) float32 with ``labels``, ``knn_distance``
    and ``ids``; attributes: the source's fingerprint (:data:`CARRIED_ATTRS`), ``synthesis``,
    ``source`` and ``settings``."""
    m, dim = embeddings.shape
    attrs = {key: source.attrs[key] for key in CARRIED_ATTRS if key in source.attrs}
    attrs["synthesis"] = synthesis
    attrs["source"] = {"store": source.url, "n_rows": source.n_rows,
                       "created": source.attrs.get("created")}
    attrs["settings"] = settings
    store = FeatureStore.create(out, n_rows=m, dim=dim, dtype="float32",
                                chunk_rows=min(chunk_rows, m), kind="outliers",
                                class_names=class_names, attrs=attrs, overwrite=overwrite)
    with store:  # the lock goes when the store is written
        store.add_array("knn_distance", (), "float32")
        store.write_all(embeddings=embeddings, labels=labels, knn_distance=distance, ids=ids)
    return store

