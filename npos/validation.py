"""Parameter checks shared by every stage: one message template for all of them.

``The 'k' parameter of synthesize must be an int in the range [1, 1000) (k < bank size).
Got 1000 instead.`` — the owner (``of synthesize``) and the reason in parentheses are optional.
Each check raises :class:`~npos.errors.ParameterError` and returns nothing.

Inside :func:`all_violations` the checks do not raise one by one: the block raises one
error listing every parameter out of range (and, optionally, values that would fit). The
error keeps each :class:`Violation`, so the command line can say the same with its flags
(``--k 400 must be ...``) instead of Python names.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, NoReturn

from npos.errors import ParameterError

_COLLECTING: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "npos_violations", default=None)


@dataclass(frozen=True)
class Violation:
    """One parameter outside its valid range: ``name`` must be ``expected`` (``why``)."""

    name: str
    value: Any
    expected: str
    owner: str | None = None
    why: str = ""

    def message(self) -> str:
        """The template: ``The 'k' parameter of X must be ... (why). Got 1000 instead.``"""
        of = f" of {self.owner}" if self.owner else ""
        return (f"The {self.name!r} parameter{of} must be {self.expected}{self.why}. "
                f"Got {self.value!r} instead.")


def parameter_error(text: str = "", *, violations: Sequence[Violation] = (),
                    params: Sequence[str] = (), reason: str = "",
                    suggestion: Mapping[str, Any] | None = None) -> ParameterError:
    """One :class:`~npos.errors.ParameterError` for a free-text problem ``text`` (naming
    ``params``) and/or every violation, ending with values that fit: ``{reason}: try
    queue=30, k=10.``"""
    parts = ([text] if text else []) + [v.message() for v in violations]
    message = " ".join(parts)
    if suggestion:
        tried = ", ".join(f"{name}={value!r}" for name, value in suggestion.items())
        message += f" {reason[:1].upper()}{reason[1:]}: try {tried}."
    return ParameterError(message, text=text, params=tuple(params),
                          violations=tuple(violations),
                          suggestion=dict(suggestion) if suggestion else None, reason=reason)


def _fail(name: str, value: Any, expected: str, owner: str | None, why: str) -> NoReturn:
    violation = Violation(name, value, expected, owner, why)
    found = _COLLECTING.get()
    if found is not None:  # inside all_violations(): go on with the next check
        found.append(violation)
        return  # type: ignore[misc]
    raise parameter_error(violations=(violation,))


@contextmanager
def all_violations(*, reason: str = "",
                   suggest: Callable[[], Mapping[str, Any]] | None = None) -> Iterator[None]:
    """Run the checks of the block and raise one error listing every violation (with
    ``suggest()``'s values that fit, introduced by ``reason``), instead of the first."""
    found: list[Violation] = []
    token = _COLLECTING.set(found)
    try:
        yield
    except Exception:
        if not found:  # an error after a violation (e.g. comparing with a bad value) is
            raise      # explained by the violation
    finally:
        _COLLECTING.reset(token)
    if found:
        raise parameter_error(violations=found, reason=reason,
                              suggestion=suggest() if suggest else None)


def fail(name: str, value: Any, expected: str, *, owner: str | None = None,
         why: str = "") -> NoReturn:
    """Raise the template's error for a bound no check below expresses (``expected`` reads
    after "must be", e.g. ``"<= the 400 train rows"``)."""
    _fail(name, value, expected, owner, why)


def check_choice(name: str, value: Any, choices: Sequence[Any], *,
                 owner: str | None = None) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices), owner, "")


def check_int(name: str, value: Any, low: int, high: int | None = None, *,
              high_closed: bool = True, allow_none: bool = False, why: str = "",
              owner: str | None = None) -> None:
    """``value`` must be an int (not a bool) in [low, high] ([low, high) when not
    ``high_closed``; no upper bound when ``high`` is None), or None with ``allow_none``."""
    if value is None and allow_none:
        return
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if ok:
        number = int(value)
        ok = number >= low and (high is None or (number <= high if high_closed
                                                 else number < high))
    if not ok:
        upper = "inf)" if high is None else f"{high}{']' if high_closed else ')'}"
        _fail(name, value, f"an int in the range [{low}, {upper}"
              + (" or None" if allow_none else ""), owner, why)


def check_float(name: str, value: Any, low: float, high: float | None = None, *,
                low_open: bool = False, allow_none: bool = False, why: str = "",
                owner: str | None = None) -> None:
    """``value`` must be a finite real number in [low, high] ((low, high] with
    ``low_open``; no upper bound when ``high`` is None), or None with ``allow_none``."""
    if value is None and allow_none:
        return
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok:
        number = float(value)
        ok = (math.isfinite(number) and (number > low if low_open else number >= low)
              and (high is None or number <= high))
    if not ok:
        left = "(" if low_open else "["
        right = "inf)" if high is None else f"{high:g}]"
        _fail(name, value, f"a float in the range {left}{low:g}, {right}"
              + (" or None" if allow_none else ""), owner, why)


_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6,
               "MIB": 2**20, "G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12,
               "TIB": 2**40}


def parse_size(name: str, value: Any) -> int:
    """Bytes from a size such as ``512MiB``, ``2G``, ``1.5GB`` or ``1048576`` (K/M/G/T alone
    are binary units)."""
    text = str(value).strip().replace(" ", "").upper()
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    try:
        size = float(number)
    except ValueError:
        size = -1.0
    if unit not in _SIZE_UNITS or not math.isfinite(size) or size * _SIZE_UNITS[unit] < 1:
        _fail(name, value, "a size such as 512MiB, 2GiB or a number of bytes", None, "")
    return int(size * _SIZE_UNITS[unit])


def format_size(size: int) -> str:
    """``size`` bytes as a short string :func:`parse_size` reads back (rounded up)."""
    for unit in ("T", "G", "M", "K"):
        if size >= _SIZE_UNITS[unit]:
            return f"{math.ceil(size / _SIZE_UNITS[unit])}{unit}"
    return str(int(size))
