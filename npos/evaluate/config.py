"""`ScoringConfig`: the parameters of ``npos evaluate`` / ``npos score``, validated in one place.

The field names are the CLI option names (``--scores``, ``--knn-k``, ...). What travels
through :func:`npos.evaluate.evaluate`, :func:`npos.evaluate.score_store`,
:func:`npos.evaluate.inputs.build_scorer` and :class:`npos.evaluate.OODScorer` is one
``ScoringConfig``; the *resolved* config (the scores actually computed, the concrete device)
is what ``metrics.json`` and score files record under ``settings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from npos.errors import ParameterError
from npos.evaluate.detectors import parse_scores
from npos.evaluate.detectors.knn import knn_backends
from npos.validation import check_choice, check_float, check_int


#: The fields of the text-bank detectors (``to_dict`` leaves them out when none is used).
TEXT_BANK_FIELDS = ("text_bank", "neg_count", "neg_groups", "neg_quantile", "neg_fraction",
                    "neg_temperature", "csp_threshold", "seed")


@dataclass(frozen=True)
class ScoringConfig:
    """Parameters of scoring (see ``docs/evaluate.md``).

    Parameters
    ----------
    scores : str or sequence of str, optional
        Registered detector names (``"mcm,knn"`` or ``("mcm", "knn")``; stored as a tuple).
        ``None``: the default detectors whose inputs exist
        (:func:`npos.evaluate.detectors.default_scores`).
    knn_k : int
        ``K`` of the ``knn`` detector (K-th nearest train neighbour), >= 1.
    knn_backend : {"auto", "torch", "faiss-flat", "faiss-ivf"}
        kNN backend of ``knn``.
    mcm_temperature : float
        ``T`` of ``mcm``, > 0.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (resolved by :func:`npos.device.resolve_device`
        when scoring starts).
    batch_size : int
        Rows per batch, rounded down to whole store chunks (at least one chunk), >= 1.
    text_bank : str, optional
        Text bank store (``npos text-bank``) of ``neglabel`` and ``csp``.
    neg_count, neg_groups, neg_quantile, neg_fraction, neg_temperature : int/float
        NegLabel's M (10,000), G (100), eta (0.95), the kept fraction per part of speech
        (0.15) and the softmax temperature (0.01); see
        :mod:`npos.evaluate.detectors.neglabel`.
    csp_threshold : float
        ``csp`` excludes candidates whose largest cosine to an ID class exceeds it.
    seed : int
        Seed of the negatives' random grouping.
    """

    scores: tuple[str, ...] | None = None
    knn_k: int = 50
    knn_backend: str = "auto"
    mcm_temperature: float = 1.0
    device: str = "auto"
    batch_size: int = 65536
    text_bank: str | None = None
    neg_count: int = 10000
    neg_groups: int = 100
    neg_quantile: float = 0.95
    neg_fraction: float = 0.15
    neg_temperature: float = 0.01
    csp_threshold: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scores is not None:
            if not isinstance(self.scores, (str, Sequence)):
                raise ParameterError("The 'scores' parameter must be a comma-separated string "
                                     f"or a list of names. Got {self.scores!r} instead.")
            object.__setattr__(self, "scores", tuple(parse_scores(self.scores)))
        if not isinstance(self.device, str):  # None means auto, a torch.device its name
            object.__setattr__(self, "device", "auto" if self.device is None
                               else str(self.device))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~npos.errors.ParameterError` for the first invalid field."""
        check_int("knn_k", self.knn_k, 1)
        check_choice("knn_backend", self.knn_backend, knn_backends())
        check_float("mcm_temperature", self.mcm_temperature, 0.0, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("neg_count", self.neg_count, 1)
        check_int("neg_groups", self.neg_groups, 1)
        check_float("neg_quantile", self.neg_quantile, 0.0, 1.0)
        check_float("neg_fraction", self.neg_fraction, 0.0, 1.0, low_open=True)
        check_float("neg_temperature", self.neg_temperature, 0.0, low_open=True)
        check_float("csp_threshold", self.csp_threshold, -1.0, 1.0)
        check_int("seed", self.seed, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``scores`` as a list or ``None``)."""
        values = dataclasses.asdict(self)
        values["scores"] = list(self.scores) if self.scores is not None else None
        if not self.uses_text_bank:  # records stay as they were before text banks existed
            for name in TEXT_BANK_FIELDS:
                del values[name]
        return values

    @property
    def uses_text_bank(self) -> bool:
        """A text bank is given or a scored detector (or fusion part) reads one."""
        from npos.evaluate.detectors import names_where

        return self.text_bank is not None or bool(
            self.scores and names_where(self.scores, lambda d: d.needs_text_bank))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScoringConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (e.g. a whole ``settings``
        record), as in ``HeadConfig.from_dict``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def scoring_config(config: ScoringConfig | None = None, **options: Any) -> ScoringConfig:
    """``config`` (default: ``ScoringConfig()``) with ``options`` (field names) replaced.

    This is how the API functions keep their former keyword arguments (``knn_k=...``,
    ``device=...``) working next to ``config=``. Options that are ``None`` are ignored.

    Raises
    ------
    ParameterError
        An option that is not a :class:`ScoringConfig` field, or an invalid value.
    """
    if config is not None and not isinstance(config, ScoringConfig):
        raise ParameterError(f"The 'config' parameter must be a ScoringConfig. Got {config!r} "
                             "instead.")
    fields = [f.name for f in dataclasses.fields(ScoringConfig)]
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise ParameterError(f"unknown scoring option(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(fields)}")
    changes = {k: v for k, v in options.items() if v is not None}
    base = config if config is not None else ScoringConfig()
    return dataclasses.replace(base, **changes) if changes else base
