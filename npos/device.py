"""One place that turns a user's ``--device`` into a :class:`torch.device`.

Every API and command accepts the same spellings: ``auto`` (the first CUDA GPU when one is
visible, else the CPU), ``cpu``, ``cuda`` and ``cuda:N``. Anything else, or a CUDA device that
is not there, is a :class:`~npos.errors.ParameterError` naming ``--device``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def cpu_matmul_precision(*, bf16: bool) -> Iterator[None]:
    """Within the block, float32 CPU matrix products run with bfloat16 inputs and float32
    accumulation and output (``bf16=True``; oneDNN does so where the CPU has native bfloat16,
    AMX or AVX512-BF16, and stays float32 elsewhere) or in full float32 (``bf16=False``).
    The previous setting is restored on exit. The CPU side of ``--amp``.

    Unlike CUDA autocast, results stay float32 tensors and only the product inputs are
    rounded (8 significant bits): a cosine of unit vectors in 512-d is off by ~2e-4 (5e-4 at
    most, measured), against ~0.004 when the output is bfloat16 as well. The RBF head's two
    products, which bound a CPU training step, run several times faster.
    """
    import torch

    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):  # older torch: float32
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16" if bf16 else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before
