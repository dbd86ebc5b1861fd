"""``mahalanobis``: negative Mahalanobis distance to the closest class mean.

Lee, Lee, Lee, Shin, "A simple unified framework for detecting out-of-distribution samples
and adversarial attacks", NeurIPS 2018.

Formula, with class means ``μ_c`` of the labeled train features and their tied (pooled
within-class) covariance ``Σ``::

    score(h) = -min_c (h - μ_c)ᵀ Σ⁺ (h - μ_c)

``Σ⁺`` is the pseudo-inverse, so fewer rows than dimensions still work. Computed in float64;
unlabeled train rows (label -1) are ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npos.errors import ParameterError
from npos.evaluate.detectors.base import Detector, as_tensor, register_detector, to_numpy


@register_detector("mahalanobis")
class MahalanobisScore(Detector):
    """Negative Mahalanobis distance to the closest class mean, one shared covariance."""

    input = "features"
    needs_labels = True

    def fit(self, features: Any, labels: Any = None) -> MahalanobisScore:
        """Class means and shared precision from features (N, D) and labels (N,), -1 ignored."""
        import torch

        if labels is None:
            raise ParameterError("mahalanobis needs train labels")
        feats = as_tensor(np.asarray(to_numpy(features)), "cpu", torch.float64)
        if feats.ndim != 2:
            raise ParameterError(f"mahalanobis needs train features of shape (N, D); got "
                                 f"{tuple(feats.shape)}")
        labels = torch.as_tensor(np.asarray(to_numpy(labels)), dtype=torch.int64)
        if labels.shape != feats.shape[:1]:
            raise ParameterError(f"labels {tuple(labels.shape)} do not match features "
                                 f"{tuple(feats.shape)}")
        keep = labels >= 0
        if not bool(keep.any()):
            raise ParameterError("mahalanobis needs labeled train rows (labels >= 0); the train "
                                 "store has none")
        feats, labels = feats[keep], labels[keep]
        self.classes_, inverse = torch.unique(labels, return_inverse=True)
        counts = torch.bincount(inverse).double()
        sums = torch.zeros(len(self.classes_), feats.shape[1], dtype=torch.float64)
        sums.index_add_(0, inverse, feats)
        self.means_ = sums / counts[:, None]
        centered = feats - self.means_[inverse]
        self.covariance_ = centered.T @ centered / feats.shape[0]
        self.precision_ = torch.linalg.pinv(self.covariance_, hermitian=True)
        return self

    def score(self, features: Any) -> np.ndarray:
        """Scores (N,) of features (N, D)."""
        import torch

        if not hasattr(self, "precision_"):
            raise ParameterError("MahalanobisScore is not fitted; call fit(features, labels)")
        h = as_tensor(np.asarray(to_numpy(features)), "cpu", torch.float64)
        if h.ndim != 2 or h.shape[1] != self.means_.shape[1]:
            raise ParameterError(f"mahalanobis was fitted on dim {self.means_.shape[1]}; got "
                                 f"features of shape {tuple(h.shape)}")
        # (h-μ)ᵀP(h-μ) = hᵀPh - 2 hᵀPμ + μᵀPμ for all classes at once.
        hp = h @ self.precision_
        mp = self.means_ @ self.precision_
        dist = (hp * h).sum(1, keepdim=True) - 2 * hp @ self.means_.T \
            + (mp * self.means_).sum(1)[None, :]
        return (-dist.min(dim=1).values).numpy()
