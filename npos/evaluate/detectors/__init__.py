"""The detector registry and the built-in detectors, one module per family.

>>> from npos.evaluate.detectors import get_detector, detector_names
>>> detector_names()
['mcm', 'msp', 'maxlogit', 'energy', 'knn', 'mahalanobis', 'head', 'neglabel', 'csp']

Adding a detector is one :class:`Detector` subclass and one :func:`register_detector`
line (see ``docs/extending.md``); ``npos evaluate``, ``npos score`` and the demo find it by
name. Importing this package registers the built-ins, in report order; installed packages
add theirs through the ``npos.detectors`` entry-point group, loaded on the first lookup.
"""

# The built-ins register on import, in report order: these imports are not sorted.
from npos.evaluate.detectors.base import CLASSIFIER_INPUTS, ENTRY_POINT_GROUP, INPUTS, \
    Detector, as_tensor, default_scores, detector_names, get_detector, load_plugins, \
    names_where, parse_scores, register_detector, to_numpy, unregister_detector  # noqa: I001
from npos.evaluate.detectors.logits import EnergyScore, MaxLogitScore, MCMScore, MSPScore, \
    energy_score, maxlogit_score, mcm_score, msp_score
from npos.evaluate.detectors.knn import KNNScore
from npos.evaluate.detectors.mahalanobis import MahalanobisScore
from npos.evaluate.detectors.head import HeadScore
from npos.evaluate.detectors.neglabel import CSPScore, NegLabelScore

__all__ = [
    "CLASSIFIER_INPUTS", "CSPScore", "ENTRY_POINT_GROUP", "INPUTS", "Detector", "EnergyScore",
    "HeadScore", "KNNScore", "MCMScore", "MSPScore", "MahalanobisScore", "MaxLogitScore",
    "NegLabelScore",
    "as_tensor", "default_scores", "detector_names", "energy_score", "get_detector",
    "load_plugins", "maxlogit_score", "mcm_score", "msp_score", "names_where", "parse_scores",
    "register_detector", "to_numpy", "unregister_detector",
]
