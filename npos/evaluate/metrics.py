"""OOD detection metrics — the one place where npos computes them.

Convention (used by every score and every metric in npos): a score is **higher for more
in-distribution** inputs, and **ID is the positive class**.

* ``fpr95`` — FPR at 95 % TPR: the fraction of OOD inputs scored at or above the *highest*
  threshold that still keeps at least 95 % of the ID inputs. With ``n`` ID scores that
  threshold is the ``ceil(0.95 n)``-th largest ID score; OOD scores equal to it count as false
  positives (ties are resolved against the detector).
* ``auroc`` — area under the ROC curve, ties counted as half (equal to scikit-learn's
  ``roc_auc_score``).
* ``aupr_in`` — average precision with ID positive and the score as is (equal to
  ``average_precision_score(is_id, score)``).
* ``aupr_out`` — average precision with OOD positive and the negated score (equal to
  ``average_precision_score(is_ood, -score)``).

All four are fractions in [0, 1]. Degenerate input is an error, never a silent ``nan``: an
empty ID or OOD set, or a non-finite score, raises :class:`~npos.errors.ParameterError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

import numpy as np

from npos.errors import ParameterError

#: Metric names, in report order.
METRIC_KEYS = ("fpr95", "auroc", "aupr_in", "aupr_out")
#: Which way each metric improves (for table headers).
HIGHER_IS_BETTER = {"fpr95": False, "auroc": True, "aupr_in": True, "aupr_out": True}


def _check_scores(scores, what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ParameterError(f"{what} must be a 1-D array of scores; got shape {arr.shape}")
    if arr.size == 0:
        raise ParameterError(f"{what} is empty: OOD metrics need at least one ID and one OOD "
                             "score")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ParameterError(f"{what} has {bad} non-finite value(s); metrics need finite scores")
    return arr


def _binary_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positives and negatives scored >= each distinct threshold, highest first.

    Returns ``(tps, fps)``, both of shape (n_distinct_scores,), cumulative and increasing; the
    last entries are ``pos.size`` and ``neg.size``. Tied scores form one threshold, which is
    what makes AUROC count ties as half and AP treat tied rows as one step (as scikit-learn).
    """
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_pos)[last_of_run]
    fps = last_of_run + 1 - tps
    return tps, fps


def _auroc(tps: np.ndarray, fps: np.ndarray) -> float:
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    precision = tps / (tps + fps)
    recall = np.r_[0.0, tps / tps[-1]]
    return float(np.sum(np.diff(recall) * precision))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD scored at or above the highest threshold keeping >= ``tpr`` of ID.

    Parameters
    ----------
    id_scores : array-like of shape (n_id,)
    ood_scores : array-like of shape (n_ood,)
    tpr : float in (0, 1]
        Target true-positive rate (0.95 for FPR95).
    """
    if not 0.0 < tpr <= 1.0:
        raise ParameterError(f"tpr must be in (0, 1]; got {tpr!r}")
    id_scores = _check_scores(id_scores, "id_scores")
    ood_scores = _check_scores(ood_scores, "ood_scores")
    n = id_scores.size
    # The k-th largest ID score is the highest threshold with #(ID >= t) >= tpr*n, for
    # k = ceil(tpr*n) computed exactly (in floats 0.95*20 may land just off 19).
    k = math.ceil(Fraction(repr(float(tpr))) * n)
    threshold = np.partition(id_scores, n - k)[n - k]
    return float(np.mean(ood_scores >= threshold))


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    """FPR95, AUROC, AUPR-In and AUPR-Out of one OOD set against the ID set.

    Parameters
    ----------
    id_scores : array-like of shape (n_id,)
        Scores of in-distribution inputs (higher = more ID).
    ood_scores : array-like of shape (n_ood,)
        Scores of out-of-distribution inputs.

    Returns
    -------
    dict
        ``{"fpr95": f, "auroc": f, "aupr_in": f, "aupr_out": f}``, fractions in [0, 1].
    """
    id_scores = _check_scores(id_scores, "id_scores")
    ood_scores = _check_scores(ood_scores, "ood_scores")
    tps, fps = _binary_curve(id_scores, ood_scores)
    tps_out, fps_out = _binary_curve(-ood_scores, -id_scores)
    return {
        "fpr95": fpr_at_tpr(id_scores, ood_scores, 0.95),
        "auroc": _auroc(tps, fps),
        "aupr_in": _average_precision(tps, fps),
        "aupr_out": _average_precision(tps_out, fps_out),
    }


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points ``(fpr, tpr)`` from (0, 0) to (1, 1), ID positive (for plots)."""
    tps, fps = _binary_curve(_check_scores(id_scores, "id_scores"),
                             _check_scores(ood_scores, "ood_scores"))
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def average_metrics(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over OOD sets (as the papers average)."""
    if not per_set:
        raise ParameterError("cannot average metrics over zero OOD sets")
    return {key: float(np.mean([m[key] for m in per_set.values()])) for key in METRIC_KEYS}


def accuracy(predictions, labels) -> float | None:
    """Top-1 accuracy over labeled rows (label >= 0); ``None`` when no row is labeled."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ParameterError(f"predictions {predictions.shape} and labels {labels.shape} differ "
                             "in shape")
    labeled = labels >= 0
    if not labeled.any():
        return None
    return float(np.mean(predictions[labeled] == labels[labeled]))
