"""Score fusion: ``--scores head+neglabel`` (any ``a+b[+c...]`` of registered detectors).

Rule. Each component detector ``d`` is rank-normalized against its scores on a *reference*
set of ID rows, ``R_d`` (n_d values), with the mid-rank empirical CDF::

    F_d(s) = (#{r in R_d : r < s} + #{r in R_d : r <= s}) / (2 n_d)      in [0, 1]

and the fused score is the mean of ``F_d(s_d)`` over the components (higher = more ID, as
every score). The reference is

* ``npos evaluate``: the ID test store's scores (each component's ID scores become ~uniform,
  so no detector dominates by its scale);
* ``npos score``: the ``--train`` store's scores (required for a fusion).

Rank normalization makes detectors with different scales (a head logit, a probability)
comparable without parameters; ties get the mid rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from npos.errors import ParameterError

SEPARATOR = "+"


def fusion_parts(name: str) -> list[str]:
    """``"head+neglabel"`` -> ``["head", "neglabel"]``; a plain name -> ``[name]``."""
    return [p.strip() for p in name.split(SEPARATOR)] if SEPARATOR in name else [name]


def check_fusion(name: str, registered: Iterable[str]) -> None:
    """Refuse a fusion with fewer than two distinct registered parts."""
    parts, known = fusion_parts(name), set(registered)
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise ParameterError(f"fusion {name!r}: unknown score(s) {', '.join(map(repr, unknown))}"
                             f"; choose from {', '.join(known)}")
    if len(set(parts)) != len(parts) or len(parts) < 2:
        raise ParameterError(f"fusion {name!r} needs two or more different scores (a+b)")


def expand(names: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The component detectors to compute (in order, de-duplicated) and the fusions."""
    components: list[str] = []
    fusions: dict[str, list[str]] = {}
    for name in names:
        parts = fusion_parts(name)
        if len(parts) > 1:
            fusions[name] = parts
        components.extend(p for p in parts if p not in components)
    return components, fusions


def rank_normalize(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mid-rank empirical CDF of ``reference`` (sorted ascending) at ``values``."""
    if not len(reference):
        raise ParameterError("score fusion needs reference scores (no reference rows)")
    below = np.searchsorted(reference, values, side="left")
    at_or_below = np.searchsorted(reference, values, side="right")
    return (below + at_or_below) / (2.0 * len(reference))


def fuse(scores: Mapping[str, np.ndarray], fusions: Mapping[str, list[str]],
         reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each fusion's scores: the mean rank-normalized component score (see the module
    docstring). ``reference`` maps components to their sorted reference scores."""
    return {name: np.mean([rank_normalize(scores[p], reference[p]) for p in parts], axis=0)
            for name, parts in fusions.items()}


def sorted_reference(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference scores as :func:`fuse` takes them (sorted, non-finite values dropped)."""
    return {k: np.sort(v[np.isfinite(v)]) for k, v in scores.items()}
