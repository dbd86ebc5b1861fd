"""Opening and cross-checking what evaluation and batch scoring read: stores, head, train bank.

Both ``npos evaluate`` and ``npos score`` go through :func:`build_scorer`, so they refuse the
same things with the same messages: stores from different encoders or dimensions, a head made
from another encoder's features, logit scores without a classifier, train-based scores
without ``--train``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npos.device import resolve_device
from npos.errors import ParameterError
from npos.evaluate.scores import LOGIT_SCORES, TRAIN_SCORES, OODScorer, default_scores, \
    parse_scores
from npos.store import FeatureStore


def open_store(store: str | os.PathLike | FeatureStore) -> FeatureStore:
    """A :class:`FeatureStore` from a path/URL (opened read-only) or as given."""
    return store if isinstance(store, FeatureStore) else FeatureStore.open(str(store))


def check_same_encoder(reference: FeatureStore, others: Mapping[str, FeatureStore]) -> None:
    """Refuse stores whose encoder, weights, preprocessing or dim differ from ``reference``.

    ``others`` maps a description used in the message (e.g. ``"OOD store 'sun'"``) to a store.
    """
    for what, other in others.items():
        reference.check_compatible(other.fingerprint(), what=f"{what} {other.url!r}")


@dataclass
class ScoringSetup:
    """What :func:`build_scorer` resolved: the fitted scorer and where things came from."""

    scorer: OODScorer
    head_path: str | None
    train_url: str | None
    #: The store the class text embeddings came from (encoder space), else ``None``.
    text_source: str | None
    #: Class names of the classifier (head config or text source store), if known.
    class_names: list[str] | None
    #: Number of classes of the classifier, or ``None`` without one.
    n_classes: int | None

    def settings(self) -> dict[str, Any]:
        """The parameters that produced the scores (for reports and derived stores)."""
        scorer = self.scorer
        return {
            "scores": list(scorer.scores),
            "space": scorer.space.name,
            "head": self.head_path,
            "train": self.train_url,
            "text_embeddings_from": self.text_source,
            "mcm_temperature": scorer.mcm_temperature,
            "knn_k": scorer.knn.k if scorer.knn is not None else None,
            "knn_backend": scorer.knn.backend if scorer.knn is not None else None,
            **_knn_index_facts(scorer),
        }


def _knn_index_facts(scorer: OODScorer) -> dict[str, Any]:
    """The backend ``auto`` chose and, for IVF, the nprobe and the recall@K it measured."""
    index = getattr(scorer.knn, "index_", None)
    if index is None:
        return {}
    facts: dict[str, Any] = {"knn_backend_used": index.backend_}
    k = scorer.knn.k
    if k in index.recall_:
        facts.update(knn_nprobe=index.nprobe_[k], knn_recall=index.recall_[k])
    return facts


def _load_head(head, device: str):
    if head is None:
        return None, None
    if isinstance(head, (str, os.PathLike)):
        from npos.train_head import load_head

        return load_head(str(head), device=device), str(head)
    return head, "<in-memory head>"


def build_scorer(
    stores: Mapping[str, FeatureStore],
    *,
    scores: str | Sequence[str] | None = None,
    head=None,
    train: str | os.PathLike | FeatureStore | None = None,
    knn_k: int = 50,
    knn_backend: str = "auto",
    mcm_temperature: float = 1.0,
    device: str = "auto",
    batch_size: int = 65536,
) -> ScoringSetup:
    """Validate the inputs, load the head, fit the train-based scores.

    Parameters
    ----------
    stores : mapping of str to FeatureStore
        The stores that will be scored, keyed by a description for messages (``"ID store"``,
        ``"OOD store 'sun'"``); the first one is the reference: it supplies the class text
        embeddings when the train store has none.
    scores : str or sequence of str, optional
        Score names (``"mcm,knn"``); default :func:`default_scores`.
    head : path or TrainedHead, optional
        A head checkpoint directory (loaded with :func:`npos.train_head.load_head`).
    train : path or FeatureStore, optional
        Train store for ``knn`` (bank) and ``mahalanobis`` (class statistics).
    knn_k, knn_backend, mcm_temperature, device
        As in :class:`OODScorer`.
    batch_size : int
        Rows per batch when projecting the train bank.
    """
    if not stores:
        raise ParameterError("no store to score")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ParameterError(f"The 'batch_size' parameter must be an int >= 1. Got "
                             f"{batch_size!r} instead.")
    names = parse_scores(scores) if scores is not None else None
    if names is not None:
        asked_train = [s for s in names if s in TRAIN_SCORES]
        if asked_train and train is None:
            raise ParameterError(f"score(s) {', '.join(asked_train)} need a train store: pass "
                                 "--train TRAIN_STORE")
    (ref_what, reference), *rest = stores.items()
    train_store = open_store(train) if train is not None else None
    others = dict(rest)
    if train_store is not None:
        others["train store"] = train_store
    check_same_encoder(reference, others)

    device = str(resolve_device(device))
    head, head_path = _load_head(head, device)
    text, text_source, class_names, n_classes = None, None, None, None
    if head is not None:
        fingerprint = head.config.get("fingerprint") or {}
        for store in (reference, *others.values()):
            store.check_compatible(fingerprint, what=f"head {head_path!r}")
        class_names = head.config.get("class_names")
        n_classes = len(class_names) if class_names is not None else None
    else:
        # The train store defines the ID classes; fall back to the (first) scored store.
        for store in (train_store, reference):
            if store is not None and store.has("text_embeddings"):
                text = store.read_extra("text_embeddings", dtype="float32")
                text_source, class_names, n_classes = store.url, store.class_names, len(text)
                break
    if names is None:
        names = default_scores(has_classifier=head is not None or text is not None,
                               has_train=train_store is not None, has_head=head is not None)
    elif head is None and text is None and any(s in LOGIT_SCORES for s in names):
        logit_names = ", ".join(s for s in names if s in LOGIT_SCORES)
        raise ParameterError(
            f"score(s) {logit_names} need class logits, but {ref_what} {reference.url!r} "
            "has no text embeddings (nor does the train store) and no --head was given")
    scorer = OODScorer(names, head=head, text_embeddings=text, mcm_temperature=mcm_temperature,
                       knn_k=knn_k, knn_backend=knn_backend, device=device)
    scorer.fit(train_store, batch_size=batch_size)
    return ScoringSetup(scorer=scorer, head_path=head_path,
                        train_url=train_store.url if train_store is not None else None,
                        text_source=text_source, class_names=class_names, n_classes=n_classes)
