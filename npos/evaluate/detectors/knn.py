"""``knn``: negative distance to the K-th nearest train feature.

Sun, Ming, Zhu, Li, "Out-of-distribution detection with deep nearest neighbors", ICML 2022.

Formula, with unit vectors ``ĥ = h / ‖h‖`` and the unit train bank ``{ĥ_i}``::

    score(h) = -‖ĥ - ĥ_(K)‖      (ĥ_(K): the K-th nearest unit train feature; K = 50)

Euclidean distance between unit vectors, in [0, 2]. The search goes through ``KnnIndex``
(exact torch or faiss, or IVF; GPU when present), or through the train store's persisted
:class:`~npos.knn.store_index.StoreIndex` (``npos index build``; ``index``), which is opened
instead of reading the train bank. This module is the evaluation stage's only import of the
kNN backends, so moving them is a one-line change here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from npos.errors import ParameterError
from npos.evaluate.detectors.base import Detector, register_detector, to_numpy
from npos.validation import check_choice, check_int, fail

if TYPE_CHECKING:  # pragma: no cover
    from npos.evaluate.config import ScoringConfig

#: Largest Euclidean distance between unit vectors.
MAX_UNIT_DISTANCE = 2.0


def knn_index_class() -> type:
    """``KnnIndex`` (imported on first use: it loads torch)."""
    from npos.knn import KnnIndex

    return KnnIndex


def knn_backends() -> tuple[str, ...]:
    """The kNN backend names (``auto`` first), registered ones included."""
    from npos.knn import backend_names

    return backend_names()


def _array(x: Any) -> Any:
    """Tensors and numpy arrays as they are (KnnIndex takes both); lists as float32 numpy."""
    return x if hasattr(x, "shape") else np.asarray(x, dtype=np.float32)


@register_detector("knn")
class KNNScore(Detector):
    """Negative distance to the K-th nearest train feature, both L2-normalized.

    A row for which an IVF search finds fewer than K neighbours in the probed lists scores
    -2 (the lowest possible score) instead of -inf.

    Parameters
    ----------
    k : int
        Which neighbour (1 = nearest). Must not exceed the bank size.
    backend : {"auto", "torch", "faiss-flat", "faiss-ivf"}
        kNN backend, as in synthesis.
    device : str, optional
        Where the index lives (``None``: the backend's choice).
    index : str, optional
        The train store's persisted index: a path, ``"none"``, or ``None`` for the store's
        default index when present (see :meth:`fit_store`).
    """

    input = "features"
    needs_train = True
    default = True

    def __init__(self, *, k: int = 50, backend: str = "auto", device: str | None = None,
                 index: str | None = None):
        check_int("k", k, 1, owner="knn")
        check_choice("backend", backend, knn_backends(), owner="knn")
        self.k = int(k)
        self.backend = backend
        self.device = device
        self.index = index

    @classmethod
    def from_config(cls, config: ScoringConfig, *, device: str) -> KNNScore:
        return cls(k=config.knn_k, backend=config.knn_backend, device=device,
                   index=config.index)

    def fit_store(self, store: Any, *, encoder_space: bool) -> bool:
        """Use ``store``'s persisted index as the bank instead of reading its rows.

        ``index`` ``None`` takes the store's default index when one exists; a path must hold
        an index of this store as it is now (else one-line refusal); ``"none"`` never uses
        one. The index holds encoder-space rows, so it serves only when the scoring features
        are the encoder's (``encoder_space``); an explicit index is refused otherwise.
        Returns True when the index is used (then :meth:`fit` is not needed).
        """
        from npos.evaluate.config import NO_INDEX
        from npos.knn import faiss_gpus
        from npos.knn.store_index import StoreIndex

        if self.index == NO_INDEX:
            return False
        if not encoder_space:
            if self.index is not None:
                raise ParameterError(
                    f"--index {self.index!r} holds encoder-space rows, but the head projects "
                    "the features knn scores; drop --index (knn then reads the projected "
                    "train rows), or use a head trained with --id-loss none")
            return False
        device = self.device if self.device and faiss_gpus() > 0 else "cpu"
        found = StoreIndex.find(self.index, store=store, device=device)
        if found is None:
            return False
        if self.k > found.n:
            fail("k", self.k, f"<= the {found.n} indexed train rows", owner="knn")
        self.store_index_ = found
        self.n_bank_, self.dim_ = found.n, found.dim
        return True

    def fit(self, bank: Any, labels: Any = None) -> KNNScore:
        """Index the train features ``bank`` of shape (n_bank, D) (normalized inside)."""
        bank = _array(bank)
        if bank.ndim != 2:
            raise ParameterError(f"knn needs train features of shape (N, D); got "
                                 f"{tuple(bank.shape)}")
        n_bank = len(bank)
        if self.k > n_bank:
            fail("k", self.k, f"<= the {n_bank} train rows", owner="knn")
        self.index_ = knn_index_class()(self.backend, device=self.device).fit(bank)
        self.n_bank_ = n_bank
        self.dim_ = int(bank.shape[1])
        return self

    def score(self, features: Any) -> np.ndarray:
        """Scores (N,) of features (N, D), numpy or torch: ``-`` the K-th-NN distance."""
        if not (hasattr(self, "index_") or hasattr(self, "store_index_")):
            raise ParameterError("KNNScore is not fitted; call fit(bank) first")
        features = _array(features)
        if features.ndim != 2 or features.shape[1] != self.dim_:
            raise ParameterError(f"knn was fitted on dim {self.dim_}; got features of shape "
                                 f"{tuple(features.shape)}")
        searcher = getattr(self, "store_index_", None) or self.index_
        distance = to_numpy(searcher.kth_distance(features, self.k)).astype(np.float64)
        # An IVF search that probed lists holding fewer than K points returns +inf; the K-th
        # distance between unit vectors is at most 2, so such rows get the lowest score, -2.
        return -np.minimum(distance, MAX_UNIT_DISTANCE)

    def facts(self) -> dict[str, Any]:
        """The backend ``auto`` chose and, for IVF, the nprobe and the recall@K it measured."""
        stored = getattr(self, "store_index_", None)
        if stored is not None:
            return {"backend_used": "store-index", "index": stored.path,
                    "codec": stored.meta["codec"], "nlist": stored.nlist,
                    "nprobe": stored.nprobe_for(self.k), "recall": stored.recall[self.k]}
        index = getattr(self, "index_", None)
        if index is None:
            return {}
        facts: dict[str, Any] = {"backend_used": index.backend_}
        if self.k in index.recall_:
            facts.update(nprobe=index.nprobe_[self.k], recall=index.recall_[self.k])
        return facts
