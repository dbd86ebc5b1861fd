""":class:`OODScorer`: a scoring space plus the registered detectors asked for, computed
together for batches of raw store embeddings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from npos.device import resolve_device
from npos.errors import ParameterError
from npos.evaluate.config import ScoringConfig, scoring_config
from npos.evaluate.detectors import CLASSIFIER_INPUTS, Detector, as_tensor, get_detector, \
    names_where, parse_scores, to_numpy
from npos.evaluate.fusion import expand, fuse, sorted_reference
from npos.evaluate.spaces import EncoderSpace, HeadSpace

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from npos.store import FeatureStore


class OODScorer:
    """Computes several OOD scores at once for batches of raw store embeddings.

    Parameters
    ----------
    scores : str or sequence of str, optional
        Registered detector names; default ``config.scores``, else ``("mcm",)``.
    head : TrainedHead, optional
        Score in the head's projected space; otherwise in the encoder space.
    text_embeddings : array of shape (C, D), optional
        Class text embeddings for the encoder-space classifier (ignored with a head).
    config : ScoringConfig, optional
        Detector parameters and device.
    **options
        :class:`ScoringConfig` fields overriding ``config`` (``knn_k=5``, ``device="cpu"``).

    Attributes
    ----------
    config : ScoringConfig
        Resolved: the scores computed and the concrete device.
    detectors : dict of str to Detector

    Raises
    ------
    ParameterError
        Unknown names, a detector needing a classifier without one, or a head without one.
    """

    def __init__(self, scores: str | Sequence[str] | None = None, *, head: Any = None,
                 text_embeddings: Any = None, config: ScoringConfig | None = None,
                 **options: Any):
        config = scoring_config(config, **options)
        names = parse_scores(scores) if scores is not None else list(config.scores or ["mcm"])
        self.device = str(resolve_device(config.device))
        self.config = dataclasses.replace(config, scores=tuple(names), device=self.device)
        self.space = HeadSpace(head, device=self.device) if head is not None \
            else EncoderSpace(text_embeddings, device=self.device)
        need_logits = names_where(names, lambda d: d.needs_classifier)
        if need_logits and not self.space.has_classifier:
            raise ParameterError(
                f"score(s) {', '.join(need_logits)} need class logits: the store has no "
                "text embeddings and no --head was given (score with knn/mahalanobis and "
                "--train instead)")
        need_head = names_where(names, lambda d: d.needs_head)
        if need_head and head is None:
            raise ParameterError(f"the {', '.join(map(repr, need_head))} score"
                                 f"{'s need' if len(need_head) > 1 else ' needs'} a trained "
                                 "head (--head HEAD_DIR)")
        components, self.fusions = expand(names)
        self._outputs = list(names)
        self.detectors: dict[str, Detector] = {
            name: get_detector(name).from_config(self.config, device=self.device)
            for name in components}
        #: Sorted ID reference scores of the fused components (see npos.evaluate.fusion).
        self.reference_: dict[str, np.ndarray] | None = None

    @property
    def scores(self) -> list[str]:
        """The score names (detectors and fusions), in output order."""
        return list(self._outputs)

    def set_reference(self, component_scores: dict[str, np.ndarray]) -> OODScorer:
        """Reference ID scores of the components, for fusions (``{name: (n,)}``)."""
        self.reference_ = sorted_reference(component_scores)
        return self

    def outputs(self, components: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The requested scores from the components' scores (fusions rank-normalized against
        :attr:`reference_`)."""
        fused = {}
        if self.fusions:
            if self.reference_ is None:
                raise ParameterError(f"fusion(s) {', '.join(self.fusions)} need reference ID "
                                     "scores (npos score: pass --train TRAIN_STORE)")
            fused = fuse(components, self.fusions, self.reference_)
        return {name: fused[name] if name in fused else components[name]
                for name in self._outputs}

    @property
    def mcm_temperature(self) -> float:
        return self.config.mcm_temperature

    @property
    def knn(self) -> Detector | None:
        """The ``knn`` detector when asked for (its fitted ``index_`` is inspectable)."""
        return self.detectors.get("knn")

    @property
    def mahalanobis(self) -> Detector | None:
        return self.detectors.get("mahalanobis")

    @property
    def needs_train(self) -> bool:
        return any(d.needs_train for d in self.detectors.values())

    @property
    def has_classifier(self) -> bool:
        return self.space.has_classifier

    def features(self, z: Any) -> torch.Tensor:
        """Features (N, D) of raw embeddings in this scorer's space (on its device)."""
        return self._inputs(z, {"features"})["features"]

    def fit(self, train: FeatureStore | np.ndarray | None = None, labels: Any = None, *,
            batch_size: int | None = None) -> OODScorer:
        """Fit the detectors that learn from train rows (knn bank, Mahalanobis statistics).

        Parameters
        ----------
        train : FeatureStore or array of shape (N, D), optional
            Raw train embeddings (projected through the head first when there is one).
            Required when a detector ``needs_train``.
        labels : array of shape (N,), optional
            Train labels for detectors that ``needs_labels`` when ``train`` is an array (a
            store brings its own).
        batch_size : int, optional
            Rows per batch when reading a store (default ``config.batch_size``).
        """
        fitted = {n: d for n, d in self.detectors.items() if d.needs_train}
        if not fitted:
            return self
        if train is None:
            raise ParameterError(f"score(s) {', '.join(fitted)} need train embeddings "
                                 "(--train TRAIN_STORE)")
        wanted = {d.input for d in fitted.values()}
        if isinstance(train, np.ndarray) or hasattr(train, "detach"):
            inputs = self._numpy_inputs(train, wanted)
        else:
            if any(d.needs_labels for d in fitted.values()):
                labels = train.read("labels")
            parts = [self._numpy_inputs(batch["embeddings"], wanted) for batch in
                     train.iter_batches(batch_size or self.config.batch_size, dtype="float32")]
            inputs = {key: np.concatenate([p[key] for p in parts]) for key in wanted}
        for name, detector in fitted.items():
            if detector.needs_labels and labels is None:
                raise ParameterError(f"{name} needs train labels")
            detector.fit(inputs[detector.input], labels if detector.needs_labels else None)
        return self

    def score(self, z: Any) -> dict[str, np.ndarray]:
        """All requested scores of raw embeddings ``z`` (N, D): ``{name: (N,) float64}``."""
        return self.outputs(self._compute(z, predict=False)[0])

    def score_and_predict(self, z: Any, *, components: bool = False,
                          ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Scores as :meth:`score` (or, with ``components``, the component detectors' scores
        before fusion), plus the classifier's predicted classes (``None`` without one)."""
        scores, predictions = self._compute(z, predict=True)
        return (scores if components else self.outputs(scores)), predictions

    def _inputs(self, z: Any, wanted: set[str]) -> dict[str, Any]:
        """The detector inputs named in ``wanted`` (and ``features``), as tensors."""
        import torch

        logits = self.has_classifier and bool(wanted & set(CLASSIFIER_INPUTS))
        z = as_tensor(z, self.device)
        with torch.no_grad():
            space = self.space.outputs(z, logits=logits, ood="ood_logit" in wanted)
        inputs: dict[str, Any] = {"features": space.features, "embeddings": z}
        if space.cosine is not None:
            # float64 from here: softmax maxima of near-uniform MCM probabilities differ in
            # the 5th digit, and float32 rounding would create spurious ties.
            inputs["cosine"] = space.cosine.double()
            inputs["logits"] = inputs["cosine"] * space.logit_scale
        if space.ood_logit is not None:
            inputs["ood_logit"] = space.ood_logit.reshape(-1)
        return inputs

    def _numpy_inputs(self, z: Any, wanted: set[str]) -> dict[str, np.ndarray]:
        inputs = self._inputs(z, wanted)
        return {key: to_numpy(inputs[key]) for key in wanted}

    def _compute(self, z: Any, *, predict: bool):
        import torch

        wanted = {d.input for d in self.detectors.values()}
        if predict and self.has_classifier:
            wanted.add("cosine")
        inputs = self._inputs(z, wanted)
        predictions = None
        if predict and "cosine" in inputs:
            predictions = inputs["cosine"].argmax(dim=1).cpu().numpy()
        n = len(inputs["features"])
        scores: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for name, detector in self.detectors.items():
                values = np.asarray(to_numpy(detector.score(inputs[detector.input])),
                                    dtype=np.float64)
                if values.shape != (n,):
                    raise ParameterError(f"detector {name!r} returned scores of shape "
                                         f"{values.shape} for {n} rows; score() must return "
                                         "shape (N,)")
                scores[name] = values
        return scores, predictions
