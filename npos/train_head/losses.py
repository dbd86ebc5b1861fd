"""Training losses: the ID losses that shape ``h`` and the outlier loss of the OOD head.

ID losses (``--id-loss``):

* ``ce`` — cross-entropy on the cosine logits ``cos(h, w_c) / τ``.
* ``logitnorm`` — LogitNorm (Wei et al., ICML 2022): cross-entropy on
  ``f / (‖f‖ τ)`` with ``f`` the cosine vector, which stops the loss from being lowered by
  growing logit norms (the source of over-confidence).
* ``cider`` — CIDER (Ming et al., ICLR 2023): compactness (each normalized ``h`` close to its
  class prototype) + dispersion (prototypes far from each other), with prototypes kept as an
  exponential moving average of the class means of ``ĥ``.
* ``none`` — no ID loss: the projection stays the identity and only the OOD head trains.

Outlier loss: binary cross-entropy on the OOD head's logit with ID embeddings = 1 and
synthesized outliers = 0. The two sides are averaged separately and then together, so the
balance does not depend on how many outliers a step synthesized relative to the batch size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def logitnorm_loss(cosines: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """LogitNorm cross-entropy.

    Parameters
    ----------
    cosines : Tensor of shape (N, C)
        Cosine similarities ``cos(h, w_c)``.
    labels : Tensor of shape (N,)
    temperature : float
    """
    norms = cosines.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    return F.cross_entropy(cosines / (norms * temperature), labels)


def outlier_loss(id_logit: torch.Tensor, outlier_logit: torch.Tensor) -> torch.Tensor:
    """Balanced BCE: ID logits (N,) are pushed up (target 1), outlier logits (M,) down."""
    id_part = F.binary_cross_entropy_with_logits(id_logit, torch.ones_like(id_logit))
    out_part = F.binary_cross_entropy_with_logits(outlier_logit, torch.zeros_like(outlier_logit))
    return 0.5 * (id_part + out_part)


class CiderLoss(nn.Module):
    """CIDER's compactness + dispersion losses with EMA class prototypes.

    Parameters
    ----------
    prototypes : Tensor of shape (C, D)
        Initial prototypes (normalized here), e.g. the class means of the embeddings.
    temperature : float
        CIDER's temperature (0.1 in the paper).
    momentum : float
        EMA factor of the prototype update (CIDER's ``proto_m``).
    dispersion_weight : float
        Weight of the dispersion term (CIDER's ``w``, 1 by default).

    Notes
    -----
    CIDER updates the prototypes one sample at a time; here each class present in the batch
    is updated once with its batch mean, which is the same update up to the order of the
    samples and keeps the step vectorized. As in CIDER, the dispersion gradient flows into
    ``h`` through this step's update; the stored prototypes are detached.
    """

    def __init__(self, prototypes: torch.Tensor, *, temperature: float = 0.1,
                 momentum: float = 0.95, dispersion_weight: float = 1.0) -> None:
        super().__init__()
        self.prototypes: torch.Tensor
        self.register_buffer("prototypes", F.normalize(prototypes.detach().float(), dim=-1))
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.dispersion_weight = float(dispersion_weight)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, D) projected embeddings and (N,) labels -> scalar loss."""
        hn = F.normalize(h.float(), dim=-1)
        num_classes = self.prototypes.shape[0]
        sums = torch.zeros_like(self.prototypes).index_add(0, labels, hn)
        counts = torch.bincount(labels, minlength=num_classes).unsqueeze(1)
        present = counts > 0
        means = sums / counts.clamp_min(1)
        updated = torch.where(
            present, F.normalize(self.momentum * self.prototypes + (1 - self.momentum) * means,
                                 dim=-1), self.prototypes)
        self.prototypes.copy_(updated.detach())

        sim = updated @ updated.T / self.temperature
        off_diag = ~torch.eye(num_classes, dtype=torch.bool, device=sim.device)
        dispersion = torch.logsumexp(sim.masked_fill(~off_diag, float("-inf")), dim=1) \
            - torch.log(torch.tensor(num_classes - 1.0, device=sim.device))
        compactness = F.cross_entropy(hn @ self.prototypes.T / self.temperature, labels)
        return compactness + self.dispersion_weight * dispersion.mean()
