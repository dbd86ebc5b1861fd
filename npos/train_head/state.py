"""The resumable state of a training run, as a checkpoint directory (no pickles).

Tensors (module weights, optimizer moments, the objective's queues and generator, the
shuffling generator) go to ``model.safetensors`` under ``PREFIX/name`` keys; everything else
(optimizer hyperparameters, step counters, the run's settings and history) to ``config.json``.
Both are written atomically by :func:`~npos.train_head.checkpoint.write_checkpoint_dir`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from npos.train_head.checkpoint import write_checkpoint_dir
from npos.train_head.objective import HeadObjective

STATE_FORMAT = "npos.head-state/1"


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors for safetensors, JSON-ready rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        meta[str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                meta[str(pid)][name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": meta}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state[int(pid)][name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def split_prefixes(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Undo :func:`save_partial`'s ``prefix/name`` flattening."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        prefix, rest = key.split("/", 1)
        out.setdefault(prefix, {})[rest] = value
    return out


def save_partial(path: Path, modules: Mapping[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, objective: HeadObjective,
                 shuffle_gen: torch.Generator, record: Mapping[str, Any], *,
                 format: str = STATE_FORMAT) -> None:
    """Write the resumable state of a run (module weights, optimizer, objective incl. its
    queues, shuffling RNG) atomically; ``record`` goes to its config.json."""
    opt_tensors, opt_meta = optimizer_state(optimizer)
    obj_tensors, obj_meta = objective.state()
    tensors = {**{f"{name}/{k}": v for name, module in modules.items()
                  for k, v in module.state_dict().items()},
               **{f"optimizer/{k}": v for k, v in opt_tensors.items()},
               **{f"objective/{k}": v for k, v in obj_tensors.items()},
               "rng/shuffle": shuffle_gen.get_state()}
    write_checkpoint_dir(path, tensors, {**record, "format": format,
                                         "optimizer_state": opt_meta,
                                         "objective_state": obj_meta})


def load_partial(tensors: Mapping[str, torch.Tensor], saved: Mapping[str, Any],
                 modules: Mapping[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 objective: HeadObjective, shuffle_gen: torch.Generator) -> None:
    """Inverse of :func:`save_partial` (given the checkpoint's tensors and config)."""
    parts = split_prefixes(tensors)
    for name, module in modules.items():
        module.load_state_dict(parts[name], strict=True)
    # An optimizer without tensor state (e.g. SGD without momentum) wrote no "optimizer/" keys.
    load_optimizer_state(optimizer, parts.get("optimizer", {}), saved["optimizer_state"])
    objective.load_state(parts["objective"], saved["objective_state"])
    shuffle_gen.set_state(parts["rng"]["shuffle"].cpu())


__all__ = ["STATE_FORMAT", "load_optimizer_state", "load_partial", "optimizer_state",
           "save_partial", "split_prefixes"]
