"""Head checkpoints: ``model.safetensors`` + ``config.json`` in a directory, written atomically.

A checkpoint holds tensors in safetensors and everything else in JSON (no pickles). The
final head lives in ``OUT/``; while training, the resumable state of the last finished epoch
(model, optimizer, queues, random generators) lives beside it in ``OUT.partial/`` and is
removed once ``OUT/`` is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from npos.atomic import atomic_path
from npos.errors import NposError
from npos.train_head.model import HeadModel

FORMAT = "npos.head/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(NposError):
    """A head checkpoint is missing, malformed, or does not fit what the caller expects."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists where a new one would be written (pass ``overwrite``)."""


def write_checkpoint_dir(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                         config: Mapping[str, Any]) -> None:
    """Write ``model.safetensors`` + ``config.json`` to directory ``path`` atomically.

    Both files go to a temporary sibling directory first, which then replaces ``path``, so a
    reader sees either the old checkpoint or the new one, never a mixture or a torn file.
    """
    from safetensors.torch import save

    path = Path(path)
    # Serialized in memory and written by Python: an I/O error is then an OSError (ENOSPC,
    # EFBIG, ...) that npos reports against `path`; safetensors' own file writer raises an
    # opaque SafetensorError instead. Heads and resume states are small.
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    with atomic_path(path, overwrite=True, directory=True, what="checkpoint") as tmp:
        (tmp / MODEL_FILE).write_bytes(data)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_checkpoint_dir(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        what: str = "head", format: str = FORMAT,
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the tensors and the config of a checkpoint directory whose ``config.json`` has
    ``"format": format``."""
    from safetensors.torch import load_file

    path = Path(path)
    model_file, config_file = path / MODEL_FILE, path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"no {what} at {str(path)!r} (expected a directory with "
                              f"{MODEL_FILE} and {CONFIG_FILE})")
    config = read_described(
        config_file, [model_file, config_file], fmt=format, error=CheckpointError,
        missing=lambda f: f"{what} {str(path)!r} is incomplete: {f.name} is missing",
        not_ours=f"{str(path)!r} is not an npos {what}")
    return load_file(str(model_file), device=str(device)), config


def read_described(desc: Path, required: Sequence[Path], *, fmt: str, error: type[NposError],
                   missing: Callable[[Path], str], not_ours: str) -> dict[str, Any]:
    """The JSON description ``desc`` of an artefact made of the files ``required``: every file
    present (else ``missing(file)``), valid JSON, and ``"format": fmt`` (else ``not_ours``);
    each failure is one ``error``."""
    for f in required:
        if not f.is_file():
            raise error(missing(f))
    try:
        config = json.loads(desc.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{str(desc)!r} is not valid JSON: {exc}") from None
    if config.get("format") != fmt:
        raise error(f"{not_ours} (format={config.get('format')!r}, expected {fmt!r})")
    return config


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`HeadModel` keyword arguments a head config describes."""
    return {"projection": config["projection"], "head": config["head"],
            "temperature": config["temperature"],
            "train_classifier": config["classifier_trainable"],
            "head_hidden": config["head_hidden"], "rbf_centres": config["rbf_centres"]}


class TrainedHead(HeadModel):
    """A trained head loaded from disk: see :func:`load_head`.

    Parameters
    ----------
    config : dict
        The checkpoint's ``config.json``.
    path : str
        Where it was loaded from (named in error messages).

    Attributes
    ----------
    config : dict
        Every hyperparameter, the seed, ``class_names``, ``fingerprint`` (the training
        store's encoder identity), ``dim``, ``num_classes`` and the training history.
    """

    def __init__(self, config: Mapping[str, Any], path: str = "") -> None:
        super().__init__(torch.zeros(config["num_classes"], config["dim"]),
                         **architecture(config))
        self.config = dict(config)
        self.path = str(path)

    def check_store(self, store) -> None:
        """Raise :class:`~npos.errors.IncompatibleStoreError` unless ``store`` (a
        :class:`~npos.store.FeatureStore`) was made by the encoder this head was trained on."""
        store.check_compatible(self.config["fingerprint"], what=f"head {self.path!r}")

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @torch.no_grad()
    def score(self, z: torch.Tensor, *, batch_size: int = 65536) -> dict[str, torch.Tensor]:
        """Projected embeddings and both outputs for a batch of embeddings.

        Parameters
        ----------
        z : Tensor of shape (N, D)
            Embeddings (any float dtype, any device; moved to the head's device).

        Returns
        -------
        dict with ``"h"`` (N, D), ``"logits"`` (N, C) and ``"ood_logit"`` (N,), float32 on
        the head's device.
        """
        device = next(self.parameters()).device
        out: dict[str, list[torch.Tensor]] = {"h": [], "logits": [], "ood_logit": []}
        for start in range(0, z.shape[0], batch_size):
            h = self.project(z[start:start + batch_size].to(device, torch.float32))
            out["h"].append(h)
            out["logits"].append(self.classifier(h))
            out["ood_logit"].append(self.head(h))
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}


def load_head(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> TrainedHead:
    """Load a head written by ``npos train-head`` (or :func:`~npos.train_head.train_head`).

    Parameters
    ----------
    path : str or path
        The head directory (``model.safetensors`` + ``config.json``).
    device : str or torch.device

    Returns
    -------
    TrainedHead
        In eval mode, on ``device``; ``.project(z)``, ``.logits(z)``, ``.ood_logit(z)``.
    """
    tensors, config = read_checkpoint_dir(path, device=device)
    model = TrainedHead(config, str(path))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise CheckpointError(f"{str(path)!r} does not match its config.json: "
                              f"{lines[-1]}") from None
    return model.to(device).eval()
