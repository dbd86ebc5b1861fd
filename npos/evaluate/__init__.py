"""Evaluation and batch scoring on cached embeddings: scores, metrics, reports.

Convention: **higher score = more in-distribution**, and ID is the positive class of every
metric (see :mod:`npos.evaluate.metrics`).

* :mod:`~npos.evaluate.detectors` — the detector registry (:func:`register_detector`,
  :func:`get_detector`) and the built-ins ``mcm``, ``msp``, ``maxlogit``, ``energy``,
  ``knn``, ``mahalanobis``, ``head``; :class:`OODScorer` computes several at once.
* :class:`ScoringConfig` — the parameters of scoring, one frozen dataclass.
* :mod:`~npos.evaluate.metrics` — :func:`ood_metrics` (FPR95, AUROC, AUPR-In, AUPR-Out).
* :func:`evaluate` + :func:`write_report` — ``npos evaluate``.
* :func:`score_store` — ``npos score``.
"""

from npos.errors import OutputExistsError
from npos.evaluate.batch import ScoreSummary, read_score_settings, score_store
from npos.evaluate.config import ScoringConfig
from npos.evaluate.detectors import Detector, detector_names, get_detector, \
    register_detector, unregister_detector
from npos.evaluate.evaluation import EvaluationResult, evaluate, parse_ood_specs
from npos.evaluate.metrics import METRIC_KEYS, accuracy, average_metrics, fpr_at_tpr, \
    ood_metrics, roc_curve
from npos.evaluate.report import check_report_dir, main_table, write_report
from npos.evaluate.scores import SCORE_NAMES, KNNScore, MahalanobisScore, OODScorer, \
    energy_score, maxlogit_score, mcm_score, msp_score

__all__ = [
    "METRIC_KEYS", "SCORE_NAMES", "Detector", "EvaluationResult", "KNNScore",
    "MahalanobisScore", "OODScorer", "OutputExistsError", "ScoreSummary", "ScoringConfig",
    "accuracy", "average_metrics", "check_report_dir", "detector_names", "energy_score",
    "evaluate", "fpr_at_tpr", "get_detector", "main_table", "maxlogit_score", "mcm_score",
    "msp_score", "ood_metrics", "parse_ood_specs", "read_score_settings", "register_detector",
    "roc_curve", "score_store", "unregister_detector", "write_report",
]
