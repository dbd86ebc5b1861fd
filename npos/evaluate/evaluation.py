"""`evaluate`: OOD metrics of one ID test store against named OOD stores."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npos.errors import ParameterError
from npos.evaluate.batching import Shard, n_shard_batches, shard_batches
from npos.evaluate.config import ScoringConfig, scoring_config
from npos.evaluate.inputs import (ScoringSetup, build_scorer, count_skipped, describe_skipped,
                                  open_store)
from npos.evaluate.metrics import accuracy, average_metrics, ood_metrics
from npos.log import get_logger
from npos.store import FeatureStore

#: The row key of the averaged metrics in every per-score table (not allowed as an OOD name).
AVERAGE = "average"


@dataclass
class EvaluationResult:
    """Metrics and raw scores of one evaluation.

    Attributes
    ----------
    id_accuracy : float or None
        Top-1 accuracy of the classifier on labeled ID rows; ``None`` without labels or
        without a classifier whose classes match the ID store's.
    metrics : dict
        ``{score: {ood_name: {"fpr95", "auroc", "aupr_in", "aupr_out"}, ..., "average": {...}}}``.
    id_scores : dict of str to ndarray of shape (n_id,)
    ood_scores : dict of str to dict of str to ndarray of shape (n_ood,)
    settings : dict
        What produced the metrics (:meth:`ScoringSetup.record`): ``npos_version``,
        ``config`` (the resolved :class:`ScoringConfig`), the input stores ``id``, ``ood``,
        ``train``, ``head``, and ``model``, ``dim``, ``rows``, ``skipped_invalid`` (rows
        of each store left out because their input failed: ``{"id": n, ood_name: n}``),
        ``space``,
        ``text_embeddings_from``, ``detectors`` (what fitting chose, e.g. the kNN backend).
    """

    id_accuracy: float | None
    metrics: dict[str, dict[str, dict[str, float]]]
    id_scores: dict[str, np.ndarray]
    ood_scores: dict[str, dict[str, np.ndarray]]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document: ``{"id_accuracy": ..., "scores": metrics,
        "settings": settings}``."""
        return {"id_accuracy": self.id_accuracy, "scores": self.metrics,
                "settings": self.settings}


def parse_ood_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["sun=stores/sun.zarr", ...]`` -> ``{"sun": "stores/sun.zarr"}``, names validated."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url:
            raise ParameterError(f"--ood takes NAME=STORE; got {spec!r}")
        if name == AVERAGE:
            raise ParameterError(f"{AVERAGE!r} is reserved for the averaged row; rename that "
                                 "OOD set")
        if name in out:
            raise ParameterError(f"OOD set {name!r} is given twice")
        out[name] = url
    if not out:
        raise ParameterError("at least one OOD set is needed (--ood NAME=STORE)")
    return out


def score_rows(setup: ScoringSetup, store: FeatureStore, *, batch_size: int,
                progress: bool = False, desc: str = "scoring", components: bool = False,
                ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """All readable rows of ``store`` through the scorer (one process).

    Returns ``(scores, predictions, labels)``: ``{name: (n,)}`` (with ``components``: the
    component detectors' scores, before fusion), predicted classes (n,) or ``None``, and the
    rows' labels (n,).
    """
    from tqdm.auto import tqdm

    parts: list[dict[str, np.ndarray]] = []
    preds: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in tqdm(shard_batches(store, batch_size, ("embeddings", "labels")),
                      total=n_shard_batches(store, batch_size, Shard()), desc=desc,
                      unit="batch", disable=not progress):
        if not len(batch["row"]):
            continue
        scores, predictions = setup.scorer.score_and_predict(batch["embeddings"],
                                                             components=components)
        parts.append(scores)
        labels.append(batch["labels"])
        if predictions is not None:
            preds.append(predictions)
    if not parts:
        raise ParameterError(f"store {store.url!r} has no readable rows to score")
    names = setup.scorer.detectors if components else setup.scorer.scores
    scores = {name: np.concatenate([p[name] for p in parts]) for name in names}
    return scores, (np.concatenate(preds) if preds else None), np.concatenate(labels)


def _classifier_matches(setup: ScoringSetup, id_store: FeatureStore) -> bool:
    """Accuracy is meaningful only when the classifier's classes are the ID store's labels."""
    if setup.n_classes is None:
        return False
    id_names = id_store.class_names
    if setup.class_names is not None and id_names is not None:
        return list(setup.class_names) == list(id_names)
    return id_names is None or len(id_names) == setup.n_classes


def evaluate(
    id_store: str | os.PathLike | FeatureStore,
    ood_stores: Mapping[str, str | os.PathLike | FeatureStore],
    config: ScoringConfig | None = None,
    *,
    head: Any = None,
    train: str | os.PathLike | FeatureStore | None = None,
    progress: bool = False,
    threshold: str | float | None = None,
    **options: Any,
) -> EvaluationResult:
    """Score an ID test store and each OOD store; compute metrics per score and OOD set.

    Parameters
    ----------
    id_store : path or FeatureStore
        In-distribution test features.
    ood_stores : mapping of str to path or FeatureStore
        OOD set name -> store. Names become table rows; ``"average"`` is reserved.
    config : ScoringConfig, optional
        Scores (e.g. ``"mcm,knn"``; default: ``mcm`` when class logits exist — text
        embeddings or a head —, ``knn`` when ``train`` is given, ``head`` when a head is
        given), detector parameters, device and batch size (rows, rounded to chunks).
    head : path or TrainedHead, optional
        Trained head: scores are computed in its projected space.
    train : path or FeatureStore, optional
        Train store: the bank of ``knn`` and the class statistics of ``mahalanobis``.
    progress : bool
        Show progress bars.
    threshold : str or float, optional
        ``"auto"`` / a number / a thresholds file: ``settings["threshold"]`` then holds the
        first score's threshold, the ID TPR and each OOD set's FPR at it.
    **options
        :class:`ScoringConfig` fields overriding ``config`` — the former keyword arguments
        ``scores``, ``knn_k``, ``knn_backend``, ``mcm_temperature``, ``device``,
        ``batch_size`` keep working.

    Returns
    -------
    EvaluationResult
        ``settings`` is the record written to ``metrics.json`` (see :meth:`to_json`).
    """
    config = scoring_config(config, **options)
    if not ood_stores:
        raise ParameterError("at least one OOD set is needed (--ood NAME=STORE)")
    if AVERAGE in ood_stores:
        raise ParameterError(f"{AVERAGE!r} is reserved for the averaged row; rename that OOD set")
    id_fs = open_store(id_store)
    ood_fs = {name: open_store(s) for name, s in ood_stores.items()}
    setup = build_scorer({"ID store": id_fs, **{f"OOD store {n!r}": s for n, s in ood_fs.items()}},
                         config, head=head, train=train)
    batch_size = setup.config.batch_size

    # Fusions are rank-normalized against the ID test scores (npos.evaluate.fusion).
    id_scores, predictions, labels = score_rows(setup, id_fs, batch_size=batch_size,
                                                 progress=progress, desc="ID", components=True)
    id_scores = setup.scorer.set_reference(id_scores).outputs(id_scores)
    id_accuracy = None
    if predictions is not None and _classifier_matches(setup, id_fs):
        id_accuracy = accuracy(predictions, labels)
    ood_scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in setup.scorer.scores}
    for ood_name, fs in ood_fs.items():
        scored, _, _ = score_rows(setup, fs, batch_size=batch_size, progress=progress,
                                   desc=ood_name)
        for name, values in scored.items():
            ood_scores[name][ood_name] = values

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for name in setup.scorer.scores:
        per_set = {ood_name: ood_metrics(id_scores[name], values)
                   for ood_name, values in ood_scores[name].items()}
        metrics[name] = {**per_set, AVERAGE: average_metrics(per_set)}
    rows = {"id": int(len(labels)),
            **{n: int(len(v)) for n, v in next(iter(ood_scores.values())).items()}}
    skipped = {"id": count_skipped(id_fs), **{n: count_skipped(fs) for n, fs in ood_fs.items()}}
    message = describe_skipped({f"ID store {id_fs.url!r}": skipped["id"],
                                **{f"OOD store {n!r}": skipped[n] for n in ood_fs}})
    if message:
        get_logger(__name__).warning(message)
    settings = setup.record(id=id_fs.url, ood={n: fs.url for n, fs in ood_fs.items()},
                            model=id_fs.attrs.get("model"), dim=id_fs.dim, rows=rows,
                            skipped_invalid=skipped)
    if threshold is not None:
        settings["threshold"] = _at_threshold(threshold, setup, head, id_scores, ood_scores)
    return EvaluationResult(id_accuracy=id_accuracy, metrics=metrics, id_scores=id_scores,
                            ood_scores=ood_scores, settings=settings)


def _at_threshold(threshold: str | float, setup: ScoringSetup, head: Any,
                  id_scores: dict[str, np.ndarray],
                  ood_scores: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """ID TPR and OOD FPRs of the first score's decision ``score >= threshold`` (= ID)."""
    from npos.evaluate.calibration import resolve_threshold

    name = setup.scorer.scores[0]
    value = resolve_threshold(threshold, name, head=head)
    return {"score": name, "value": value,
            "id_tpr": float(np.mean(id_scores[name] >= value)),
            "fpr": {o: float(np.mean(v >= value)) for o, v in ood_scores[name].items()}}
