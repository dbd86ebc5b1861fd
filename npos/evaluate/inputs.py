"""Opening and cross-checking what evaluation and batch scoring read: stores, head, train bank.

Both ``npos evaluate`` and ``npos score`` go through :func:`build_scorer`, so they refuse the
same things with the same messages: stores from different encoders or dimensions, a head made
from another encoder's features, logit scores without a classifier, train-based scores
without ``--train``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from npos.device import resolve_device
from npos.errors import ParameterError
from npos.evaluate.config import ScoringConfig, scoring_config
from npos.evaluate.detectors import default_scores, names_where
from npos.evaluate.scorer import OODScorer
from npos.settings import settings_record
from npos.store import FeatureStore


def open_store(store: str | os.PathLike | FeatureStore, *,
               kinds: tuple[str, ...] = ("features",), what: str = "evaluate") -> FeatureStore:
    """A :class:`FeatureStore` from a path/URL (opened read-only) or as given."""
    if not isinstance(store, FeatureStore):
        return FeatureStore.open(str(store), kinds=kinds, what=what)
    store.check_kind(kinds, what=what)
    return store


def count_skipped(store: FeatureStore) -> int:
    """Rows of a complete ``store`` that scoring skips: those whose ``valid`` is False (inputs
    that failed to load when the store was made)."""
    return int(store.n_rows - store.readable_rows().sum())


def describe_skipped(skipped: Mapping[str, int]) -> str | None:
    """One line tallying skipped invalid rows per store, or ``None`` when none was skipped.

    ``skipped`` maps a store description (``"ID store 'test.zarr'"``) to its count.
    """
    parts = [f"{n} in {what}" for what, n in skipped.items() if n]
    if not parts:
        return None
    total = sum(skipped.values())
    return (f"skipped {total} invalid row{'s' if total != 1 else ''} (inputs that failed to "
            f"load; 'npos store info STORE --failed' lists them): {', '.join(parts)}")


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

    @property
    def config(self) -> ScoringConfig:
        """The resolved config: the scores computed, the concrete device."""
        return self.scorer.config

    def detector_facts(self) -> dict[str, dict[str, Any]]:
        """What fitting chose or measured, per detector that reports anything."""
        facts = {name: d.facts() for name, d in self.scorer.detectors.items()}
        return {name: f for name, f in facts.items() if f}

    def settings(self) -> dict[str, Any]:
        """The parameters that produced the scores, flat (the ``scoring`` attribute of a
        ``.zarr`` score store; kept in its original form)."""
        config = self.config
        scores = list(config.scores or ())
        knn = "knn" in scores
        flat = {
            "scores": scores,
            "space": self.scorer.space.name,
            "head": self.head_path,
            "train": self.train_url,
            "text_embeddings_from": self.text_source,
            "mcm_temperature": config.mcm_temperature,
            "knn_k": config.knn_k if knn else None,
            "knn_backend": config.knn_backend if knn else None,
        }
        for name, facts in self.detector_facts().items():
            flat.update({f"{name}_{key}": value for key, value in facts.items()})
        return flat

    def record(self, **inputs: Any) -> dict[str, Any]:
        """The ``settings`` record of ``metrics.json`` and score files: npos version, the
        resolved :class:`ScoringConfig` (``config``, as in a head's ``config.json``), the
        input stores (``inputs`` plus ``train`` and ``head``), the space, where the class
        embeddings came from, and what fitted detectors chose (``detectors``)."""
        return settings_record(config=self.config, **inputs, train=self.train_url,
                               head=self.head_path, space=self.scorer.space.name,
                               text_embeddings_from=self.text_source,
                               detectors=self.detector_facts())


def _load_head(head: Any, device: str) -> tuple[Any, str | None]:
    if head is None:
        return None, None
    if isinstance(head, (str, os.PathLike)):
        from npos.train_head import load_head

        return load_head(str(head), device=device), str(head)
    return head, "<in-memory head>"


def _attach_text_bank(scorer: OODScorer, stores: Mapping[str, FeatureStore],
                      train_store: FeatureStore | None) -> None:
    """Give the text-bank detectors (``neglabel``, ``csp``) the bank and the ID class text
    embeddings, after checking that the bank comes from the stores' encoder."""
    wanted = [n for n, d in scorer.detectors.items() if d.needs_text_bank]
    if not wanted:
        return
    config = scorer.config
    if config.text_bank is None:
        raise ParameterError(f"score(s) {', '.join(wanted)} need a text bank: pass --text-bank "
                             "TEXT.zarr (made by 'npos text-bank')")
    from npos.textbank import TextBank, check_bank_matches

    bank = TextBank(config.text_bank)
    for what, store in stores.items():
        check_bank_matches(bank, store, what=what)
    source = next((s for s in (train_store, *stores.values())
                   if s is not None and s.has("text_embeddings")), None)
    if source is None:
        raise ParameterError(f"score(s) {', '.join(wanted)} need the ID class text embeddings, "
                             "but neither the scored stores nor the train store have any")
    class_text = source.read_extra("text_embeddings", dtype="float32")
    for name in wanted:
        scorer.detectors[name].attach(class_text=class_text, bank=bank, device=scorer.device)


def build_scorer(
    stores: Mapping[str, FeatureStore],
    config: ScoringConfig | None = None,
    *,
    head: Any = None,
    train: str | os.PathLike | FeatureStore | None = None,
    **options: Any,
) -> ScoringSetup:
    """Validate the inputs, load the head, fit the detectors that learn from train rows.

    Parameters
    ----------
    stores : mapping of str to FeatureStore
        The stores that will be scored, keyed by a description for messages (``"ID store"``,
        ``"OOD store 'sun'"``); the first one is the reference: it supplies the class text
        embeddings when the train store has none.
    config : ScoringConfig, optional
        Scores (default :func:`~npos.evaluate.detectors.default_scores`), detector
        parameters, device, and the batch size used to project the train bank.
    head : path or TrainedHead, optional
        A head checkpoint directory (loaded with :func:`npos.train_head.load_head`).
    train : path or FeatureStore, optional
        Train store for detectors that ``needs_train`` (``knn`` bank, ``mahalanobis``
        class statistics).
    **options
        :class:`ScoringConfig` fields overriding ``config`` (the former keyword arguments).
    """
    config = scoring_config(config, **options)
    if not stores:
        raise ParameterError("no store to score")
    names = list(config.scores) if config.scores is not None else None
    if names is not None:
        asked_train = names_where(names, lambda d: d.needs_train)
        if asked_train and train is None:
            raise ParameterError(f"score(s) {', '.join(asked_train)} need a train store: pass "
                                 "--train TRAIN_STORE")
    (ref_what, reference), *rest = stores.items()
    train_store = open_store(train) if train is not None else None
    others = dict(rest)
    if train_store is not None:
        others["train store"] = train_store
    check_same_encoder(reference, others)

    device = str(resolve_device(config.device))
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
        for source in (train_store, reference):
            if source is not None and source.has("text_embeddings"):
                text = source.read_extra("text_embeddings", dtype="float32")
                text_source, class_names, n_classes = source.url, source.class_names, len(text)
                break
    if names is None:
        names = default_scores(has_classifier=head is not None or text is not None,
                               has_train=train_store is not None, has_head=head is not None)
    elif head is None and text is None:
        logit_names = names_where(names, lambda d: d.needs_classifier)
        if logit_names:
            raise ParameterError(
                f"score(s) {', '.join(logit_names)} need class logits, but {ref_what} "
                f"{reference.url!r} has no text embeddings (nor does the train store) and no "
                "--head was given")
    scorer = OODScorer(names, head=head, text_embeddings=text, config=config, device=device)
    _attach_text_bank(scorer, {ref_what: reference, **others}, train_store)
    scorer.fit(train_store)
    return ScoringSetup(scorer=scorer, head_path=head_path,
                        train_url=train_store.url if train_store is not None else None,
                        text_source=text_source, class_names=class_names, n_classes=n_classes)
