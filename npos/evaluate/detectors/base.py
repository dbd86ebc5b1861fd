"""The detector registry: every OOD score is a :class:`Detector` registered by name.

Conventions, fixed here for every detector: a score is **higher for more in-distribution**
rows, and ``score`` returns a float array of shape (N,).

A detector reads one of four *inputs*, computed by :class:`npos.evaluate.OODScorer` in the
scoring space (the encoder's, or a trained head's projection):

============  =====================================================================
input         what ``fit`` / ``score`` receive
============  =====================================================================
features      ``h`` (N, D): the embeddings, projected through the head when there is one
cosine        ``s`` (N, C): cosine similarities to the class embeddings (float64)
logits        ``l`` (N, C): classifier logits, ``l = s * logit_scale`` (float64)
ood_logit     (N,): the trained head's OOD logit
embeddings    ``z`` (N, D): the raw store embeddings (the encoder space, with or without
              a head; for detectors that compare them with text-bank embeddings)
============  =====================================================================

``cosine``/``logits`` need a classifier (class text embeddings or a head) and ``ood_logit``
needs a head; the registry derives ``needs_classifier`` and ``needs_head`` from ``input``, so
input checks and :func:`default_scores` follow the registry instead of lists of names.
Scoring inputs arrive as torch tensors on the scoring device (numpy arrays work as well when
a detector is used on its own); ``fit`` gets numpy arrays of the train rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from npos.errors import ParameterError
from npos.validation import check_choice

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from npos.evaluate.config import ScoringConfig

#: What a detector can read (see the module docstring).
INPUTS = ("features", "cosine", "logits", "ood_logit", "embeddings")
#: Inputs that exist only with a classifier (class text embeddings or a head).
CLASSIFIER_INPUTS = ("cosine", "logits")
#: Allowed detector names: they become metric keys, table rows and plot file names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

#: Entry-point group through which installed packages add detectors (loaded on first lookup).
ENTRY_POINT_GROUP = "npos.detectors"

_REGISTRY: dict[str, type[Detector]] = {}
_plugins_loaded = False

D = TypeVar("D", bound="type[Detector]")


class Detector:
    """Base class of every detector: ``fit(train inputs[, labels]) -> self``, ``score(x)``.

    Subclasses set the class attributes below, store their parameters in ``__init__``
    (keyword-only), compute fitted state (names ending in ``_``) in :meth:`fit`, and return
    ``(N,)`` scores, higher = more ID, from :meth:`score`.

    Attributes
    ----------
    name : str
        The registry name (set by :func:`register_detector`).
    input : {"features", "cosine", "logits", "ood_logit"}
        What :meth:`fit` and :meth:`score` receive.
    needs_train : bool
        :meth:`fit` needs the train rows (``--train``).
    needs_labels : bool
        :meth:`fit` needs their labels too.
    default : bool
        Computed when no ``--scores`` are named and the inputs it needs exist.
    needs_text_bank : bool
        Reads a text bank (``--text-bank``): the scorer calls :meth:`attach` with it and the
        ID class text embeddings before scoring.
    needs_classifier, needs_head : bool
        Derived from ``input``; do not set them.
    """

    name: ClassVar[str] = ""
    input: ClassVar[str] = "features"
    needs_train: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    default: ClassVar[bool] = False
    needs_text_bank: ClassVar[bool] = False
    needs_classifier: ClassVar[bool] = False
    needs_head: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_choice("input", cls.input, INPUTS, owner=cls.__name__)
        cls.needs_classifier = cls.input in CLASSIFIER_INPUTS
        cls.needs_head = cls.input == "ood_logit"
        cls.needs_train = cls.needs_train or cls.needs_labels

    @classmethod
    def from_config(cls, config: ScoringConfig, *, device: str) -> Detector:
        """The detector as :class:`OODScorer` builds it (override to read config fields)."""
        return cls()

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> Detector:
        """Learn from the train rows' input (N, ...) and labels (N,); nothing by default."""
        return self

    def attach(self, *, class_text: np.ndarray, bank: Any, device: str = "cpu") -> None:
        """Receive the ID class text embeddings (K, D) and the text bank
        (:class:`npos.textbank.TextBank`); called only when ``needs_text_bank``."""

    def score(self, x: Any) -> np.ndarray:
        """Scores of shape (N,) of the input ``x``; higher = more in-distribution."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score()")

    def facts(self) -> dict[str, Any]:
        """What fitting chose or measured, for reports (e.g. the kNN backend used)."""
        return {}


def register_detector(name: str, *, replace: bool = False) -> Callable[[D], D]:
    """Class decorator: register a :class:`Detector` subclass under ``name``.

    >>> @register_detector("maxcos")
    ... class MaxCosine(Detector):
    ...     input = "cosine"
    ...     def score(self, cosine):
    ...         return to_numpy(cosine).max(axis=1)

    Raises
    ------
    ParameterError
        A name that is taken (unless ``replace``) or not of letters, digits, ``_.+-``; a
        class that is not a :class:`Detector`.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ParameterError(f"detector name {name!r} must start with a letter or digit and "
                             "hold only letters, digits and _.+-")

    def decorate(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise ParameterError(f"detector {name!r} must be a subclass of "
                                 "npos.evaluate.Detector")
        if name in _REGISTRY and not replace and _REGISTRY[name] is not cls:
            raise ParameterError(f"detector {name!r} is already registered "
                                 f"({_REGISTRY[name].__qualname__}); pass replace=True")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_detector(name: str) -> None:
    """Remove ``name`` from the registry (for tests and plugins that clean up)."""
    get_detector(name)
    del _REGISTRY[name]


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def load_plugins() -> None:
    """Import the modules installed packages declare under the ``npos.detectors`` entry-point
    group (each registers its detectors on import); once per process."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in _entry_points():
        try:
            entry.load()
        except Exception as exc:  # a broken plugin names itself instead of a traceback
            raise ParameterError(f"detector plugin {entry.name!r} ({entry.value}) failed to "
                                 f"load: {type(exc).__name__}: {exc}") from exc


def detector_names() -> list[str]:
    """Registered names, built-ins first, in report order."""
    load_plugins()
    return list(_REGISTRY)


def get_detector(name: str) -> type[Detector]:
    """The detector class registered as ``name``; unknown names list the available ones."""
    load_plugins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ParameterError(f"unknown detector {name!r}; available: "
                             f"{', '.join(_REGISTRY)}") from None


def parse_scores(spec: str | Iterable[str]) -> list[str]:
    """Parse ``"mcm,knn"`` (or a list of names) into a de-duplicated list of registered
    detector names."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not all(isinstance(s, str) for s in names):
        raise ParameterError(f"score names must be strings; got {spec!r}")
    names = [s for s in names if s]
    load_plugins()
    if not names:
        raise ParameterError(f"no score named; choose from {', '.join(_REGISTRY)}")
    from npos.evaluate.fusion import SEPARATOR, check_fusion

    for name in names:
        if SEPARATOR in name and name not in _REGISTRY:
            check_fusion(name, _REGISTRY)  # fusions: see npos.evaluate.fusion
    unknown = [s for s in names if s not in _REGISTRY and SEPARATOR not in s]
    if unknown:
        raise ParameterError(f"unknown score(s) {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(_REGISTRY)}")
    return list(dict.fromkeys(names))


def default_scores(*, has_classifier: bool, has_train: bool, has_head: bool) -> list[str]:
    """The registered ``default`` detectors whose inputs exist — with the built-ins: ``mcm``
    when class logits exist (text embeddings or a head), ``knn`` when a train store is
    given, ``head`` with a head."""
    load_plugins()
    names = [name for name, cls in _REGISTRY.items()
             if cls.default and (has_classifier or not cls.needs_classifier)
             and (has_train or not cls.needs_train) and (has_head or not cls.needs_head)]
    if not names:
        raise ParameterError(
            "no score can be computed: the store has no text embeddings, and neither --head "
            "nor --train was given (pass --train TRAIN_STORE for knn)")
    return names


def names_where(names: Iterable[str], predicate: Callable[[type[Detector]], bool]) -> list[str]:
    """The names among ``names`` (fusions counted by their components) whose detector class
    satisfies ``predicate``."""
    from npos.evaluate.fusion import expand

    return [n for n in expand(names)[0] if predicate(get_detector(n))]


# ---------------------------------------------------------------------- array helpers
def as_tensor(x: Any, device: str | None = None, dtype: Any = None) -> torch.Tensor:
    """``x`` (numpy or torch) as a tensor on ``device`` (default: where it is) in ``dtype``
    (default float32)."""
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x).to(device=device, dtype=dtype or torch.float32)


def to_numpy(x: Any) -> np.ndarray:
    """``x`` (numpy or torch, any device) as a numpy array."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
