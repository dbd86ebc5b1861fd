"""What fine-tuning adds to a head run's settings (:class:`FinetuneConfig`), what it returns
(:class:`FinetuneResult`), and its output names (``--embed NAME=STORE`` checked here).

Kept free of torch so the command line can read it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from npos.errors import ParameterError
from npos.validation import check_float, check_int

HEAD_DIR = "head"
PARTIAL_DIR = "train.partial"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class FinetuneConfig:
    """What fine-tuning adds to the head's parameters (:class:`HeadConfig`).

    Parameters
    ----------
    tail_lr_scale : float
        The tail's learning rate is ``head.lr * tail_lr_scale`` (the paper: 1, i.e. the
        encoder at ``lr`` and the OOD head at ``lr * head_lr_scale``).
    window_rows : int or None
        Rows shuffled together when streaming tokens (see :class:`TokenStream`); default
        ``8 * batch_size``.
    embed_batch_size : int
        Rows per forward pass when re-embedding stores.
    """

    tail_lr_scale: float = 1.0
    window_rows: int | None = None
    embed_batch_size: int = 256

    def validate(self) -> None:
        """Raise :class:`ParameterError` for the first invalid parameter."""
        check_float("tail_lr_scale", self.tail_lr_scale, 0.0, low_open=True, owner="finetune")
        check_int("window_rows", self.window_rows, 1, allow_none=True, owner="finetune")
        check_int("embed_batch_size", self.embed_batch_size, 1, owner="finetune")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes
    ----------
    out_dir : str
    tail : dict
        The tail's description (``tail.json``).
    head_dir : str
    stores : dict
        ``--embed`` name -> URL of the re-embedded store.
    history : list of dict
        Per epoch: ``epoch``, ``id_loss``, ``outlier_loss``, ``accuracy``, ``synth_steps``,
        ``seconds``, ``samples_per_s``.
    resumed_from : int
        Epochs already done when the run started (0 unless resumed; ``epochs`` when only the
        re-embedding was left).
    """

    out_dir: str
    tail: dict[str, Any]
    head_dir: str
    stores: dict[str, str]
    history: list[dict[str, Any]]
    resumed_from: int


def parse_embed_specs(specs: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
    """``["NAME=STORE", ...]`` (or a mapping) -> ``{NAME: STORE}``, names checked."""
    pairs = list(specs.items()) if isinstance(specs, Mapping) else []
    if not isinstance(specs, Mapping):
        for spec in specs:
            name, sep, url = str(spec).partition("=")
            if not sep or not name or not url:
                raise ParameterError(f"--embed takes NAME=STORE; got {spec!r}")
            pairs.append((name, url))
    out: dict[str, str] = {}
    for name, url in pairs:
        if not _NAME.match(name) or name in (HEAD_DIR, PARTIAL_DIR):
            raise ParameterError(
                f"--embed name {name!r} must be letters, digits, '_', '-' or '.' (not "
                f"{HEAD_DIR!r}); it becomes OUT/{name}.zarr")
        if name in out:
            raise ParameterError(f"--embed name {name!r} is given twice")
        out[name] = str(url)
    return out


__all__ = ["FinetuneConfig", "FinetuneResult", "HEAD_DIR", "PARTIAL_DIR", "parse_embed_specs"]
