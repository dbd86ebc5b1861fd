"""One place that turns a user's ``--device`` into a :class:`torch.device`.

Every API and command accepts the same spellings: ``auto`` (the first CUDA GPU when one is
visible, else the CPU), ``cpu``, ``cuda`` and ``cuda:N``. Anything else, or a CUDA device that
is not there, is a :class:`~npos.errors.ParameterError` naming ``--device``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Union

from npos.errors import ParameterError

if TYPE_CHECKING:
    import torch

DeviceLike = Union[str, "torch.device", None]

_SPELLINGS = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """The concrete device for ``device`` (``None`` means ``auto``).

    Raises
    ------
    ParameterError
        An unknown spelling, ``cuda`` without a visible GPU, or ``cuda:N`` with N at least
        the number of visible GPUs.
    """
    import torch

    if isinstance(device, torch.device):
        spec = str(device)
    elif device is None:
        spec = "auto"
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise ParameterError(f"--device must be one of {_SPELLINGS}; got {device!r}")
    match = _PATTERN.match(spec)
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise ParameterError(f"--device must be one of {_SPELLINGS}; got {device!r}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ParameterError(f"--device {spec} was requested but no CUDA GPU is visible "
                             f"(use --device cpu or auto)")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ParameterError(f"--device {spec}: only {torch.cuda.device_count()} CUDA GPU(s) "
                             f"are visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(spec)
