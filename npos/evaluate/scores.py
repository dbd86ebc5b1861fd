"""OOD scores on cached embeddings. Convention: **higher = more in-distribution**.

Every score maps raw store embeddings ``z`` (N, D) to (N,). Scores are computed in one of two
*spaces*:

* **encoder space** (no head; the zero-shot baseline NPOS is compared against): features
  ``h = z``; cosine logits ``s_c = cos(z, t_c)`` with the store's class text embeddings
  ``t_c``; classifier logits ``l = logit_scale * s`` (CLIP's trained scale, 100);
* **head space** (a trained head): ``h = P(z)`` (:meth:`TrainedHead.project`), classifier
  logits ``l = TrainedHead.logits(z) = cos(h, w_c) / tau`` and ``s = tau * l``.

=============  ===========================================  ===============================
score          formula                                      reference
=============  ===========================================  ===============================
``mcm``        ``max_c softmax(s / T)_c``, T = 1            Ming et al. 2022 (MCM)
``msp``        ``max_c softmax(l)_c``                       Hendrycks & Gimpel 2017
``maxlogit``   ``max_c l_c``                                Hendrycks et al. 2022
``energy``     ``logsumexp_c l_c`` (negative free energy)   Liu et al. 2020
``knn``        ``-|ĥ - ĥ_(K)|``: distance from the unit     Sun et al. 2022
               vector ĥ to its K-th nearest unit train
               feature (Euclidean, K = 50)
``mahalanobis`` ``-min_c (h-μ_c)ᵀ Σ⁺ (h-μ_c)``, class means   Lee et al. 2018
               and one shared (tied) covariance of the
               labeled train features
``head``       the OOD head's logit                         Tao et al. 2023 (NPOS)
=============  ===========================================  ===============================

The small detector objects follow pytorch-ood's ``fit`` / ``score`` shape on feature arrays;
:class:`OODScorer` combines a space with the requested detectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from npos.device import resolve_device
from npos.errors import ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from npos.store import FeatureStore

#: Every score npos knows, in report order.
SCORE_NAMES = ("mcm", "msp", "maxlogit", "energy", "knn", "mahalanobis", "head")
#: Scores that need class logits (text embeddings or a head).
LOGIT_SCORES = ("mcm", "msp", "maxlogit", "energy")
#: Scores fitted on a train store.
TRAIN_SCORES = ("knn", "mahalanobis")
#: CLIP's trained logit scale (``exp(logit_scale)``, clamped at 100 in training): the encoder
#: space's classifier logits are ``100 * cos``.
CLIP_LOGIT_SCALE = 100.0
#: Largest Euclidean distance between unit vectors.
MAX_UNIT_DISTANCE = 2.0


def parse_scores(spec: str | Iterable[str]) -> list[str]:
    """Parse ``"mcm,knn"`` (or a list of names) into a validated, de-duplicated list."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [s for s in names if s]
    if not names:
        raise ParameterError(f"no score named; choose from {', '.join(SCORE_NAMES)}")
    unknown = [s for s in names if s not in SCORE_NAMES]
    if unknown:
        raise ParameterError(f"unknown score(s) {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(SCORE_NAMES)}")
    return list(dict.fromkeys(names))


def default_scores(*, has_classifier: bool, has_train: bool, has_head: bool) -> list[str]:
    """The scores computed when none are named: ``mcm`` when class logits exist (text
    embeddings or a head), ``knn`` when a train store is given, ``head`` with a head."""
    names = (["mcm"] if has_classifier else []) + (["knn"] if has_train else []) \
        + (["head"] if has_head else [])
    if not names:
        raise ParameterError(
            "no score can be computed: the store has no text embeddings, and neither --head "
            "nor --train was given (pass --train TRAIN_STORE for knn)")
    return names


def _as_tensor(x, device: str) -> torch.Tensor:
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------- logit scores
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


# ---------------------------------------------------------------------- fitted detectors
class KNNScore:
    """Negative distance to the K-th nearest train feature, both L2-normalized.

    Sun et al., "Out-of-distribution detection with deep nearest neighbors", ICML 2022.
    The search goes through :class:`npos.synthesize.knn.KnnIndex` (exact or IVF, GPU when
    present); the distance is Euclidean between unit vectors, in [0, 2]. A row for which an
    IVF search finds fewer than K neighbours in the probed lists scores -2 (the lowest
    possible score) instead of -inf.

    Parameters
    ----------
    k : int
        Which neighbour (1 = nearest). Must not exceed the bank size.
    backend : {"auto", "torch", "faiss-flat", "faiss-ivf"}
        kNN backend, as in synthesis.
    device : str, optional
        Where the index lives (``None``: the backend's choice).
    """

    def __init__(self, *, k: int = 50, backend: str = "auto", device: str | None = None):
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ParameterError(f"The 'k' parameter of knn must be an int >= 1. Got {k!r} "
                                 "instead.")
        self.k = int(k)
        self.backend = backend
        self.device = device

    def fit(self, bank) -> KNNScore:
        """Index the train features ``bank`` of shape (n_bank, D) (normalized inside)."""
        from npos.knn import KnnIndex

        n_bank = len(bank)
        if self.k > n_bank:
            raise ParameterError(f"The 'k' parameter of knn must be <= the {n_bank} train rows. "
                                 f"Got {self.k} instead.")
        self.index_ = KnnIndex(self.backend, device=self.device).fit(bank)
        self.n_bank_ = n_bank
        self.dim_ = int(bank.shape[1])
        return self

    def score(self, features) -> np.ndarray:
        """Scores (N,) of features (N, D), numpy or torch: ``-`` the K-th-NN distance."""
        if not hasattr(self, "index_"):
            raise ParameterError("KNNScore is not fitted; call fit(bank) first")
        if features.ndim != 2 or features.shape[1] != self.dim_:
            raise ParameterError(f"knn was fitted on dim {self.dim_}; got features of shape "
                                 f"{tuple(features.shape)}")
        distance = _to_numpy(self.index_.kth_distance(features, self.k)).astype(np.float64)
        # An IVF search that probed lists holding fewer than K points returns +inf; the K-th
        # distance between unit vectors is at most 2, so such rows get the lowest score, -2.
        return -np.minimum(distance, MAX_UNIT_DISTANCE)


class MahalanobisScore:
    """Negative Mahalanobis distance to the closest class mean, one shared covariance.

    Lee et al., "A simple unified framework for detecting out-of-distribution samples and
    adversarial attacks", NeurIPS 2018. ``Σ`` is the tied (pooled within-class) covariance of
    the labeled train features; its pseudo-inverse is used, so fewer rows than dimensions
    still work. Computed in float64.
    """

    def fit(self, features, labels) -> MahalanobisScore:
        """Class means and shared precision from features (N, D) and labels (N,), -1 ignored."""
        import torch

        feats = _as_tensor(features, "cpu").double()
        labels = torch.as_tensor(np.asarray(_to_numpy(labels)), dtype=torch.int64)
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

    def score(self, features) -> np.ndarray:
        """Scores (N,) of features (N, D)."""
        if not hasattr(self, "precision_"):
            raise ParameterError("MahalanobisScore is not fitted; call fit(features, labels)")
        h = _as_tensor(features, "cpu").double()
        if h.ndim != 2 or h.shape[1] != self.means_.shape[1]:
            raise ParameterError(f"mahalanobis was fitted on dim {self.means_.shape[1]}; got "
                                 f"features of shape {tuple(h.shape)}")
        # (h-μ)ᵀP(h-μ) = hᵀPh - 2 hᵀPμ + μᵀPμ for all classes at once.
        hp = h @ self.precision_
        mp = self.means_ @ self.precision_
        dist = (hp * h).sum(1, keepdim=True) - 2 * hp @ self.means_.T \
            + (mp * self.means_).sum(1)[None, :]
        return (-dist.min(dim=1).values).numpy()


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


# ---------------------------------------------------------------------- spaces
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

    def __init__(self, text_embeddings=None, *, logit_scale: float = CLIP_LOGIT_SCALE,
                 device: str = "cpu"):
        import torch.nn.functional as F

        self.device = device
        self.logit_scale = float(logit_scale)
        self._text = None if text_embeddings is None else \
            F.normalize(_as_tensor(text_embeddings, device), dim=1)

    @property
    def has_classifier(self) -> bool:
        return self._text is not None

    def outputs(self, z: torch.Tensor, *, logits: bool = False,
                ood: bool = False) -> SpaceOutputs:
        import torch.nn.functional as F

        if ood:
            raise ParameterError("the 'head' score needs a trained head (--head)")
        if not logits:
            return SpaceOutputs(z)
        return SpaceOutputs(z, F.normalize(z, dim=1) @ self._text.T, self.logit_scale)


class HeadSpace:
    """A trained head's projected space (:class:`npos.train_head.TrainedHead`)."""

    name = "head"
    has_classifier = True

    def __init__(self, head, *, device: str = "cpu"):
        self.head = head.to(device).eval()
        self.device = device
        self.temperature = head_temperature(head)

    def outputs(self, z: torch.Tensor, *, logits: bool = False,
                ood: bool = False) -> SpaceOutputs:
        if not (logits or ood):
            return SpaceOutputs(self.head.project(z))
        # One pass through the projection for h, the logits and the OOD logit together.
        out = self.head.score(z, batch_size=max(1, len(z)))
        return SpaceOutputs(out["h"], out["logits"] * self.temperature, 1.0 / self.temperature,
                            out["ood_logit"])


def head_temperature(head) -> float:
    """The temperature ``tau`` of a head's cosine logits (from its config)."""
    value = head.config.get("temperature")
    if value is None or float(value) <= 0:
        raise ParameterError(f"the head's config has no positive 'temperature' ({value!r})")
    return float(value)


# ---------------------------------------------------------------------- combined
class OODScorer:
    """Computes several OOD scores at once for batches of raw store embeddings.

    Parameters
    ----------
    scores : sequence of str
        Names from :data:`SCORE_NAMES`.
    head : TrainedHead, optional
        Score in the head's projected space; otherwise in the encoder space.
    text_embeddings : array of shape (C, D), optional
        Class text embeddings for the encoder-space classifier (ignored with a head).
    mcm_temperature : float
        ``T`` of the MCM score.
    knn_k : int
        ``K`` of the knn score.
    knn_backend : str
        Backend of :class:`npos.synthesize.knn.KnnIndex`.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.

    Raises
    ------
    ParameterError
        For unknown names, a logit score without a classifier, ``head`` without a head.
    """

    def __init__(self, scores: Sequence[str] = ("mcm",), *, head=None, text_embeddings=None,
                 mcm_temperature: float = 1.0, knn_k: int = 50, knn_backend: str = "auto",
                 device: str = "auto"):
        self.scores = parse_scores(scores)
        if not (isinstance(mcm_temperature, (int, float)) and mcm_temperature > 0):
            raise ParameterError("The 'mcm_temperature' parameter must be a float > 0. Got "
                                 f"{mcm_temperature!r} instead.")
        self.mcm_temperature = float(mcm_temperature)
        self.device = str(resolve_device(device))
        self.space = HeadSpace(head, device=self.device) if head is not None \
            else EncoderSpace(text_embeddings, device=self.device)
        needs_logits = [s for s in self.scores if s in LOGIT_SCORES]
        if needs_logits and not self.space.has_classifier:
            raise ParameterError(
                f"score(s) {', '.join(needs_logits)} need class logits: the store has no "
                "text embeddings and no --head was given (score with knn/mahalanobis and "
                "--train instead)")
        if "head" in self.scores and head is None:
            raise ParameterError("the 'head' score needs a trained head (--head HEAD_DIR)")
        self.knn = KNNScore(k=knn_k, backend=knn_backend, device=self.device) \
            if "knn" in self.scores else None
        self.mahalanobis = MahalanobisScore() if "mahalanobis" in self.scores else None

    @property
    def needs_train(self) -> bool:
        return any(s in TRAIN_SCORES for s in self.scores)

    @property
    def has_classifier(self) -> bool:
        return self.space.has_classifier

    def features(self, z) -> torch.Tensor:
        """Features (N, D) of raw embeddings in this scorer's space (on its device)."""
        import torch

        with torch.no_grad():
            return self.space.outputs(_as_tensor(z, self.device)).features

    def fit(self, train: FeatureStore | np.ndarray | None = None, labels=None, *,
            batch_size: int = 65536) -> OODScorer:
        """Fit the train-based scores (knn bank, Mahalanobis statistics).

        Parameters
        ----------
        train : FeatureStore or array of shape (N, D), optional
            Raw train embeddings (projected through the head first when there is one).
            Required when a score in :data:`TRAIN_SCORES` was asked for.
        labels : array of shape (N,), optional
            Train labels for ``mahalanobis`` when ``train`` is an array (a store brings its
            own).
        """
        if not self.needs_train:
            return self
        if train is None:
            asked = ", ".join(s for s in self.scores if s in TRAIN_SCORES)
            raise ParameterError(f"score(s) {asked} need train embeddings (--train TRAIN_STORE)")
        if isinstance(train, np.ndarray) or hasattr(train, "detach"):
            feats = self.features(train).cpu().numpy()
        else:
            labels = train.read("labels") if self.mahalanobis is not None else None
            feats = np.concatenate([
                self.features(batch["embeddings"]).cpu().numpy()
                for batch in train.iter_batches(batch_size, dtype="float32")])
        if self.knn is not None:
            self.knn.fit(feats)
        if self.mahalanobis is not None:
            if labels is None:
                raise ParameterError("mahalanobis needs train labels")
            self.mahalanobis.fit(feats, labels)
        return self

    def score(self, z) -> dict[str, np.ndarray]:
        """All requested scores of raw embeddings ``z`` (N, D): ``{name: (N,) float64}``."""
        return self._compute(z, predict=False)[0]

    def score_and_predict(self, z) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Scores as :meth:`score`, plus the classifier's predicted classes (``None``
        without a classifier)."""
        return self._compute(z, predict=True)

    def _compute(self, z, *, predict: bool):
        import torch

        out: dict[str, Any] = {}
        predictions = None
        want_logits = self.has_classifier and (
            predict or any(s in LOGIT_SCORES for s in self.scores))
        with torch.no_grad():
            space = self.space.outputs(_as_tensor(z, self.device), logits=want_logits,
                                       ood="head" in self.scores)
            if space.cosine is not None:
                # float64 from here: softmax maxima of near-uniform MCM probabilities differ
                # in the 5th digit, and float32 rounding would create spurious ties.
                cosine = space.cosine.double()
                logits = cosine * space.logit_scale
                predictions = cosine.argmax(dim=1).cpu().numpy()
                fns = {"mcm": lambda: mcm_score(cosine, self.mcm_temperature),
                       "msp": lambda: msp_score(logits),
                       "maxlogit": lambda: maxlogit_score(logits),
                       "energy": lambda: energy_score(logits)}
                for name in self.scores:
                    if name in fns:
                        out[name] = fns[name]()
            if space.ood_logit is not None:
                out["head"] = space.ood_logit.reshape(-1)
            if self.knn is not None:
                out["knn"] = self.knn.score(space.features)
            if self.mahalanobis is not None:
                out["mahalanobis"] = self.mahalanobis.score(space.features)
        scores = {name: np.asarray(_to_numpy(out[name]), dtype=np.float64)
                  for name in self.scores}
        return scores, predictions
