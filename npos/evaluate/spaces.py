"""Scoring spaces: what a batch of raw store embeddings ``z`` (N, D) becomes before detectors
read it.

* **encoder space** (no head; the zero-shot baseline NPOS is compared against): features
  ``h = z``; cosine logits ``s_c = cos(z, t_c)`` with the store's class text embeddings
  ``t_c``; classifier logits ``l = logit_scale * s`` (CLIP's trained scale, 100);
* **head space** (a trained head): ``h = P(z)`` (:meth:`TrainedHead.project`), classifier
  logits ``l = TrainedHead.logits(z) = cos(h, w_c) / tau`` and ``s = tau * l``, and the OOD
  head's logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from npos.errors import ParameterError
from npos.evaluate.detectors.base import as_tensor

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: CLIP's trained logit scale (``exp(logit_scale)``, clamped at 100 in training): the encoder
#: space's classifier logits are ``100 * cos``.
CLIP_LOGIT_SCALE = 100.0


@dataclass
class SpaceOutputs:
    """What a space computes for a batch: features ``h`` (N, D) and, when asked for, cosine
    logits (N, C) with the factor turning them into classifier logits, and the OOD logit."""

    features: torch.Tensor
    cosine: torch.Tensor | None = None
    logit_scale: float | None = None
    ood_logit: torch.Tensor | None = None


class EncoderSpace:
    """The encoder's own space: a zero-shot classifier from class text embeddings.

    Parameters
    ----------
    text_embeddings : array of shape (C, D), optional
        Class text embeddings (normalized inside). Without them no logit score exists.
    logit_scale : float
        Classifier logits are ``logit_scale * cos`` (CLIP's trained scale, 100).
    device : str
    """

    name = "encoder"

    def __init__(self, text_embeddings: Any = None, *, logit_scale: float = CLIP_LOGIT_SCALE,
                 device: str = "cpu"):
        import torch.nn.functional as F

        self.device = device
        self.logit_scale = float(logit_scale)
        self._text = None if text_embeddings is None else \
            F.normalize(as_tensor(text_embeddings, device), dim=1)

    @property
    def has_classifier(self) -> bool:
        return self._text is not None

    #: The features are the raw embeddings (a store index of them serves ``knn``).
    encoder_features = True

    def bytes_per_row(self, dim: int) -> int:
        """Estimated working bytes per scored row (for row blocks): the float32 features and
        their unit copy, and float32 + float64 cosines/logits/softmax per class."""
        classes = 0 if self._text is None else len(self._text)
        return 12 * dim + 40 * classes

    def outputs(self, z: torch.Tensor, *, logits: bool = False,
                ood: bool = False) -> SpaceOutputs:
        import torch.nn.functional as F

        if ood:
            raise ParameterError("the 'head' score needs a trained head (--head)")
        if not logits:
            return SpaceOutputs(z)
        if self._text is None:
            raise ParameterError("class logits need class text embeddings (none in the store) "
                                 "or a trained head (--head)")
        return SpaceOutputs(z, F.normalize(z, dim=1) @ self._text.T, self.logit_scale)


class HeadSpace:
    """A trained head's projected space (:class:`npos.train_head.TrainedHead`)."""

    name = "head"
    has_classifier = True

    def __init__(self, head: Any, *, device: str = "cpu"):
        self.head = head.to(device).eval()
        self.device = device
        self.temperature = head_temperature(head)

    @property
    def encoder_features(self) -> bool:
        """True when the head's projection is exactly the identity (a head trained with
        ``--id-loss none``): its features are the raw embeddings."""
        if not hasattr(self, "_identity"):
            import torch

            dim = int(self.head.config.get("dim") or getattr(self.head, "dim", 0) or 0)
            z = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                self._identity = dim > 0 and torch.equal(
                    self.head.project(z.to(self.device)).float().cpu(), z)
        return self._identity

    def bytes_per_row(self, dim: int) -> int:
        """Estimated working bytes per scored row: features (z, h, unit h), the logits and
        their float64 copies per class, and the OOD head's per-unit temporaries (RBF: three
        float32 distance rows per centre)."""
        classes = int(self.head.config.get("num_classes") or
                      len(self.head.config.get("class_names") or ()))
        ood = getattr(self.head, "head", None)
        centres = getattr(ood, "centres", None)
        units = centres.shape[0] if centres is not None else \
            getattr(getattr(ood, "fc1", None), "out_features", 0)
        return 16 * dim + 40 * classes + 12 * int(units)

    def outputs(self, z: torch.Tensor, *, logits: bool = False,
                ood: bool = False) -> SpaceOutputs:
        if not (logits or ood):
            return SpaceOutputs(self.head.project(z))
        # One pass through the projection for h, the logits and the OOD logit together.
        out = self.head.score(z, batch_size=max(1, len(z)))
        return SpaceOutputs(out["h"], out["logits"] * self.temperature, 1.0 / self.temperature,
                            out["ood_logit"])


def head_temperature(head: Any) -> float:
    """The temperature ``tau`` of a head's cosine logits (from its config)."""
    value = getattr(head, "config", {}).get("temperature")
    if value is None or float(value) <= 0:
        raise ParameterError(f"the head's config has no positive 'temperature' ({value!r})")
    return float(value)
