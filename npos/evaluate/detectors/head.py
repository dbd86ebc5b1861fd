"""``head``: the trained OOD head's logit.

Tao, Du, Zhu, Li, "Non-parametric outlier synthesis", ICLR 2023 (NPOS).

Formula: ``score(z) = g(P(z))``, the logit of the binary ID-vs-outlier head ``g`` trained on
synthesized outliers (``TrainedHead.ood_logit``). Not fitted: the head was trained by
``npos train-head``; the scorer computes the logit in the same pass as the projection.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npos.evaluate.detectors.base import Detector, register_detector, to_numpy


@register_detector("head")
class HeadScore(Detector):
    """The OOD head's logit, as it comes (it already points up for ID)."""

    input = "ood_logit"
    default = True

    def score(self, ood_logit: Any) -> np.ndarray:
        """Scores (N,) of the head's OOD logits (N,) or (N, 1)."""
        return to_numpy(ood_logit).reshape(-1)
