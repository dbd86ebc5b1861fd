"""Which stores (and heads) may be combined: the encoder identity of a store, compared once.

Every stage that combines stores — train with validation, ID with OOD and train, a store with
a head — goes through :meth:`FeatureStore.check_compatible`, which calls
:func:`check_fingerprints`:

* both encoders known: ``model``, ``pretrained``, ``seed``, ``preprocess`` and ``dim`` must
  all agree, or the combination is refused in one line;
* both unknown (``npos store import`` without ``--model``): only ``dim`` and the other
  attributes are compared, and a one-line :class:`UserWarning` says the combination is taken
  on trust;
* one known, one unknown: refused — nothing says the unknown encoder is the known one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from npos.errors import IncompatibleStoreError

#: Attributes that identify the encoder and preprocessing behind a store. Two stores (or a
#: store and a checkpoint) are comparable only when these agree. ``seed`` is the seed of a
#: random-init encoder (None for trained weights).
IDENTITY_KEYS = ("model", "pretrained", "seed", "preprocess", "dim")
#: The ``model`` of a store whose encoder is not known (``store import`` without ``--model``).
UNKNOWN_MODEL = "unknown"
#: ``model`` values meaning "unknown encoder": ``"imported"`` was the default of ``store
#: import --model`` before an unnamed encoder was recorded as unknown.
UNKNOWN_MODELS = (UNKNOWN_MODEL, "imported")


def is_unknown(fingerprint: Mapping[str, Any]) -> bool:
    """True when ``fingerprint`` names no encoder (an import without ``--model``)."""
    return fingerprint.get("model") in UNKNOWN_MODELS


def check_fingerprints(mine: Mapping[str, Any], theirs: Mapping[str, Any], *, what: str,
                       url: str) -> None:
    """Refuse ``theirs`` (described by ``what``) against store ``url`` of fingerprint ``mine``.

    Raises :class:`~npos.errors.IncompatibleStoreError` in one line; warns once when both
    encoders are unknown.
    """
    unknown_mine, unknown_theirs = is_unknown(mine), is_unknown(theirs)
    if unknown_mine != unknown_theirs:
        known = theirs if unknown_mine else mine
        where = ("the store" if unknown_mine else "there")
        raise IncompatibleStoreError(
            f"{what} does not match store {url!r}: the encoder is unknown in {where} (imported "
            f"without --model) but {known.get('model')!r} in the other; name it with "
            "'npos store import ... --model NAME [--pretrained TAG] --overwrite'")
    keys = [k for k in IDENTITY_KEYS if not (unknown_mine and k == "model")]
    for key in keys:
        if mine.get(key) != theirs.get(key):
            raise IncompatibleStoreError(
                f"{what} does not match store {url!r}: {key} is {theirs.get(key)!r} there but "
                f"{mine.get(key)!r} in the store")
    if unknown_mine:
        warnings.warn(f"{what} and store {url!r} are both of unknown encoder (imported without "
                      "--model): combining them on trust", UserWarning, stacklevel=3)
