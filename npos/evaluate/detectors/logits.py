"""Detectors on the classifier's outputs: ``mcm``, ``msp``, ``maxlogit``, ``energy``.

With cosine logits ``s_c = cos(h, w_c)`` (N, C) and classifier logits ``l = s * scale``:

============  ==========================================  =================================
detector      formula                                     reference
============  ==========================================  =================================
``mcm``       ``max_c softmax(s / T)_c``, T = 1           Ming et al., "Delving into
                                                          out-of-distribution detection
                                                          with vision-language
                                                          representations", NeurIPS 2022
``msp``       ``max_c softmax(l)_c``                      Hendrycks & Gimpel, "A baseline
                                                          for detecting misclassified and
                                                          out-of-distribution examples",
                                                          ICLR 2017
``maxlogit``  ``max_c l_c``                               Hendrycks et al., "Scaling
                                                          out-of-distribution detection
                                                          for real-world settings", ICML
                                                          2022
``energy``    ``logsumexp_c l_c`` (negative free energy,  Liu et al., "Energy-based
              temperature 1)                              out-of-distribution detection",
                                                          NeurIPS 2020
============  ==========================================  =================================

None of them is fitted. They compute in float64: MCM probabilities with T = 1 are close to
1/C and differ in the 5th digit, and float32 rounding would create spurious ties.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from npos.evaluate.detectors.base import Detector, as_tensor, register_detector, to_numpy
from npos.validation import check_float

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from npos.evaluate.config import ScoringConfig


def mcm_score(cosine: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MCM: maximum softmax of the cosine logits over ``temperature``. (N, C) -> (N,)."""
    return (cosine / temperature).softmax(dim=1).amax(dim=1)


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability of the classifier logits. (N, C) -> (N,)."""
    return logits.softmax(dim=1).amax(dim=1)


def maxlogit_score(logits: torch.Tensor) -> torch.Tensor:
    """Largest classifier logit. (N, C) -> (N,)."""
    return logits.amax(dim=1)


def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy ``logsumexp(logits)`` (temperature 1). (N, C) -> (N,)."""
    return logits.logsumexp(dim=1)


def _double(x: Any) -> torch.Tensor:
    import torch

    return as_tensor(x, dtype=torch.float64)


@register_detector("mcm")
class MCMScore(Detector):
    """Maximum concept matching: ``max_c softmax(cos / T)_c`` (Ming et al. 2022).

    Parameters
    ----------
    temperature : float
        ``T > 0`` (``--mcm-temperature``).
    """

    input = "cosine"
    default = True

    def __init__(self, *, temperature: float = 1.0):
        check_float("temperature", temperature, 0.0, low_open=True, owner="mcm")
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, config: ScoringConfig, *, device: str) -> MCMScore:
        return cls(temperature=config.mcm_temperature)

    def score(self, cosine: Any) -> np.ndarray:
        """Scores (N,) of cosine logits (N, C)."""
        return to_numpy(mcm_score(_double(cosine), self.temperature))


@register_detector("msp")
class MSPScore(Detector):
    """Maximum softmax probability of the classifier logits (Hendrycks & Gimpel 2017)."""

    input = "logits"

    def score(self, logits: Any) -> np.ndarray:
        """Scores (N,) of classifier logits (N, C)."""
        return to_numpy(msp_score(_double(logits)))


@register_detector("maxlogit")
class MaxLogitScore(Detector):
    """Largest classifier logit (Hendrycks et al. 2022)."""

    input = "logits"

    def score(self, logits: Any) -> np.ndarray:
        """Scores (N,) of classifier logits (N, C)."""
        return to_numpy(maxlogit_score(_double(logits)))


@register_detector("energy")
class EnergyScore(Detector):
    """Negative free energy ``logsumexp_c l_c`` of the classifier logits (Liu et al. 2020)."""

    input = "logits"

    def score(self, logits: Any) -> np.ndarray:
        """Scores (N,) of classifier logits (N, C)."""
        return to_numpy(energy_score(_double(logits)))
