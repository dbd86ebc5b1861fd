"""`train_head`: a projection, classifier and OOD head trained on a feature store.

The stage wires the shared parts to a store: it loads the labeled rows (:mod:`.data`), builds
the head and its objective (:mod:`.objective`), and hands the cached features, shuffled by
index permutation on the device, to the one trainer (:mod:`.trainer`: epochs, cosine
schedule, resume, atomic checkpoints, epoch log). The final head is written atomically when
training ends.

The names that used to live here (``HeadObjective``, ``run_epoch``, ``load_labeled``, ...)
are re-exported from their new homes, so old imports keep working; new code imports them
from :mod:`npos.train_head.objective`, :mod:`~npos.train_head.trainer`,
:mod:`~npos.train_head.data` and :mod:`~npos.train_head.state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npos.device import resolve_device
from npos.errors import IncompatibleStoreError
from npos.settings import settings_record
from npos.store.lock import WriterLock
from npos.train_head.checkpoint import FORMAT, CheckpointExistsError, write_checkpoint_dir
from npos.train_head.config import HeadConfig
from npos.train_head.data import (FeatureBatches, LabeledFeatures, accuracy, build_head,
                                  check_class_counts, head_record, load_labeled,
                                  load_one_class, load_outliers)
from npos.train_head.objective import HeadObjective, StepOutput
from npos.train_head.state import (STATE_FORMAT, load_optimizer_state, optimizer_state,
                                   save_partial, split_prefixes)
from npos.train_head.trainer import (EpochStats, Trainer, cosine_lr, make_optimizer, run_epoch,
                                     run_stamp)


@dataclass
class TrainResult:
    """What :func:`train_head` did.

    Attributes
    ----------
    out_dir : str
    history : list of dict
        Per epoch: ``epoch``, ``id_loss``, ``outlier_loss``, ``accuracy``, ``val_accuracy``,
        ``synth_steps``, ``seconds``.
    resumed_from : int
        Epochs already done when the run started (0 unless resumed).
    timings : dict
        Seconds spent in the queues, synthesis and the rest of the steps.
    """

    out_dir: str
    history: list[dict[str, Any]]
    resumed_from: int
    timings: dict[str, float]


def train_head(train_store_url: str, out_dir: str, config: HeadConfig | None = None, *,
               val: str | None = None, device: str | torch.device = "cpu",
               resume: bool = False, overwrite: bool = False, progress: bool = False,
               profile: bool = False, log: Callable[[str], None] | None = None,
               outliers: str | None = None, outliers_per_step: int | None = None) -> TrainResult:
    """Train a projection, classifier and OOD head on a labeled feature store.

    Parameters
    ----------
    train_store_url : str
        Feature store with labels (and optionally ``text_embeddings``).
    out_dir : str
        Output directory: ``model.safetensors`` + ``config.json`` (every hyperparameter, the
        encoder identity, the history, ``settings`` and ``npos_version``), written
        atomically when training ends. The resumable state of the last finished epoch is
        kept in ``<out_dir>.partial/`` meanwhile. While training, ``.<name>.lock`` beside
        it names this process; a second writer of the same head is refused.
    config : HeadConfig, optional
    val : str, optional
        A labeled store of the same encoder and classes: accuracy reported per epoch.
    device : str or torch.device
    resume : bool
        Continue from ``<out_dir>.partial/`` (same settings required); the result equals an
        uninterrupted run. Without a partial state the run starts from scratch.
    overwrite : bool
        Replace an existing head at ``out_dir``.
    progress : bool
        Show a progress bar per epoch.
    profile : bool
        Synchronize CUDA around timed sections so ``TrainResult.timings`` are exact.
    log : callable, optional
        Receives one line per epoch (e.g. ``click.echo``).
    outliers : str, optional
        An outliers store (``npos synthesize``) of the training store's encoder: the head
        trains on draws from it instead of online synthesis (no queues). With ``id_loss
        "none"`` the training store may be unlabeled: a one-class detector (every row is the
        class ``"id"``).
    outliers_per_step : int, optional
        Outliers drawn per step (default: classes x pick x keep, what online synthesis gives;
        one batch for a one-class store).

    Returns
    -------
    TrainResult
    """
    config = config or HeadConfig()
    config.validate()
    device = resolve_device(device)
    out_path = Path(out_dir)
    partial = _partial_dir(out_path)
    with WriterLock(out_path, what="head"):  # one writer of the head and its .partial state
        _check_outputs(out_path, partial, resume=resume, overwrite=overwrite)
        return _train_locked(train_store_url, out_path, partial, config, val=val,
                             device=device, resume=resume, progress=progress,
                             profile=profile, log=log, outliers=outliers,
                             outliers_per_step=outliers_per_step)


def _train_locked(train_store_url: str, out_path: Path, partial: Path, config: HeadConfig, *,
                  val: str | None, device: torch.device, resume: bool, progress: bool,
                  profile: bool, log: Callable[[str], None] | None, outliers: str | None,
                  outliers_per_step: int | None) -> TrainResult:
    """The body of :func:`train_head`, run while holding the head folder's lock."""
    from npos.store import FeatureStore

    store = FeatureStore.open(train_store_url, kinds=("features",), what="train-head")
    one_class = (outliers is not None and config.id_loss == "none"
                 and not (store.read("labels") >= 0).any())
    data = load_one_class(store) if one_class else load_labeled(store)
    check_class_counts(data, config, store.url, online=outliers is None)
    draws = (load_outliers(outliers, store, config, data, outliers_per_step, device,
                           one_class=one_class) if outliers is not None else None)
    val_data = _load_val(val, store, data)
    # What decides the head (a resumed run must match it); its config.json holds it all.
    record = head_record(config, data, train_store=store.url,
                         fingerprint=store.fingerprint(), val_store=val)
    offline = {} if draws is None else {"outliers": outliers, "one_class": one_class,
                                        "outliers_per_step": draws.per_step}
    record.update(offline)
    settings = settings_record(train_store=store.url, out_dir=str(out_path), val=val,
                               device=str(device), config=config, **offline)

    model, means = build_head(data, config)
    model.to(device)
    objective = HeadObjective(model, config, cider_prototypes=means, device=device,
                              profile=profile, offline_outliers=draws)
    trainer = Trainer(objective, partial=partial, record=record, name=str(out_path),
                      progress=progress, profile=profile, log=log)
    if resume:
        trainer.resume()

    def evaluate() -> dict[str, Any]:
        return {"val_accuracy": (accuracy(model, val_data.z, val_data.y, device)
                                 if val_data is not None else None)}

    def save(history: list[dict[str, Any]]) -> None:
        write_checkpoint_dir(out_path, model.state_dict(), {
            "format": FORMAT, **record, "history": history, **run_stamp(),
            "settings": settings})

    trainer.fit(FeatureBatches(data.z, data.y, config.batch_size, device), save=save,
                evaluate=evaluate)
    timings = {"steps": trainer.seconds, **objective.timings}
    return TrainResult(str(out_path), trainer.history, trainer.first_epoch, timings)


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def _check_outputs(out_path: Path, partial: Path, *, resume: bool, overwrite: bool) -> None:
    if out_path.exists() and not overwrite:
        raise CheckpointExistsError(
            f"{str(out_path)!r} already exists; pass --overwrite (overwrite=True) to replace it")
    if partial.exists() and not (resume or overwrite):
        raise CheckpointExistsError(
            f"an interrupted run left {str(partial)!r}; pass --resume to continue it or "
            "--overwrite to start over")


def _load_val(val: str | None, store, data: LabeledFeatures) -> LabeledFeatures | None:
    """The validation store's labeled rows, checked against the training store."""
    from npos.store import FeatureStore

    if val is None:
        return None
    val_store = FeatureStore.open(val, kinds=("features",), what="train-head --val")
    val_store.check_compatible(store.fingerprint(), what=f"training store {store.url!r}")
    val_data = load_labeled(val_store, what="validation store")
    if val_data.class_names != data.class_names:
        raise IncompatibleStoreError(f"validation store {val!r} has other classes than "
                                     f"training store {store.url!r}")
    return val_data


#: Old import paths (``from npos.train_head.training import run_epoch``) keep working.
__all__ = ["EpochStats", "HeadConfig", "HeadObjective", "LabeledFeatures", "STATE_FORMAT",
           "StepOutput", "TrainResult", "accuracy", "build_head", "check_class_counts",
           "cosine_lr", "load_labeled", "load_optimizer_state", "make_optimizer",
           "optimizer_state", "run_epoch", "save_partial", "split_prefixes", "train_head"]
