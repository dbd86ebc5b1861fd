"""Former home of the OOD scores, kept so old imports keep working (re-exports only).

New code imports from the new homes:

* :mod:`npos.evaluate.detectors` — the detector registry and the built-in detectors
  (``mcm``, ``msp``, ``maxlogit``, ``energy``, ``knn``, ``mahalanobis``, ``head``), one
  module per family with its paper and formula;
* :mod:`npos.evaluate.spaces` — the encoder and head scoring spaces;
* :mod:`npos.evaluate.scorer` — :class:`OODScorer`;
* :mod:`npos.evaluate.config` — :class:`ScoringConfig`.
"""

from npos.evaluate.detectors import Detector, EnergyScore, HeadScore, KNNScore, \
    MahalanobisScore, MaxLogitScore, MCMScore, MSPScore, default_scores, detector_names, \
    energy_score, get_detector, maxlogit_score, mcm_score, msp_score, parse_scores, \
    register_detector
from npos.evaluate.detectors.knn import MAX_UNIT_DISTANCE
from npos.evaluate.scorer import OODScorer
from npos.evaluate.spaces import CLIP_LOGIT_SCALE, EncoderSpace, HeadSpace, SpaceOutputs, \
    head_temperature

#: The built-in detectors, in report order (the live list is ``detector_names()``).
SCORE_NAMES = ("mcm", "msp", "maxlogit", "energy", "knn", "mahalanobis", "head")
#: Built-in detectors that need class logits (``get_detector(name).needs_classifier``).
LOGIT_SCORES = tuple(n for n in SCORE_NAMES if get_detector(n).needs_classifier)
#: Built-in detectors fitted on a train store (``get_detector(name).needs_train``).
TRAIN_SCORES = tuple(n for n in SCORE_NAMES if get_detector(n).needs_train)

__all__ = [
    "CLIP_LOGIT_SCALE", "LOGIT_SCORES", "MAX_UNIT_DISTANCE", "SCORE_NAMES", "TRAIN_SCORES",
    "Detector", "EncoderSpace", "EnergyScore", "HeadScore", "HeadSpace", "KNNScore",
    "MCMScore", "MSPScore", "MahalanobisScore", "MaxLogitScore", "OODScorer", "SpaceOutputs",
    "default_scores", "detector_names", "energy_score", "get_detector", "head_temperature",
    "maxlogit_score", "mcm_score", "msp_score", "parse_scores", "register_detector",
]
