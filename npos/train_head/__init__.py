"""Head training on cached features: projection + cosine classifier + OOD head, trained with
online outlier synthesis (``npos train-head``), and the API to load and apply a head.

>>> from npos.train_head import load_head
>>> head = load_head("runs/head")                  # doctest: +SKIP
>>> head.check_store(store)                         # same encoder as the training store?
>>> h, logits, ood = head.project(z), head.logits(z), head.ood_logit(z)

Names are imported on first use, so reading :class:`HeadConfig` does not load torch.
"""

import importlib

_EXPORTS = {
    "HeadConfig": "npos.train_head.config",
    "CheckpointError": "npos.train_head.checkpoint",
    "CheckpointExistsError": "npos.train_head.checkpoint",
    "TrainedHead": "npos.train_head.checkpoint",
    "load_head": "npos.train_head.checkpoint",
    "HeadModel": "npos.train_head.model",
    "HeadObjective": "npos.train_head.objective",
    "StepOutput": "npos.train_head.objective",
    "Trainer": "npos.train_head.trainer",
    "run_epoch": "npos.train_head.trainer",
    "TrainResult": "npos.train_head.training",
    "train_head": "npos.train_head.training",
}

__all__ = ["CheckpointError", "CheckpointExistsError", "HeadConfig", "HeadModel",
           "HeadObjective", "StepOutput", "TrainResult", "TrainedHead", "Trainer", "load_head",
           "run_epoch", "train_head"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'npos.train_head' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
