"""The ``settings`` record every npos output carries: what made it, fully resolved.

Stores (``settings`` group attribute), ``metrics.json``, score files and head ``config.json``
record one dict built by :func:`settings_record`: the npos version, then every parameter of
the run with defaults filled in and ``auto`` values resolved (the device actually used, the
sigma actually used), so the output alone says how to make it again::

    settings_record(config, queue=1000, seed=0, device=str(resolve_device("auto")),
                    features=store.url)
    # {"npos_version": "0.1.0", "method": "npos", "k": 400, ..., "resolved_sigma": 0.01,
    #  "queue": 1000, "seed": 0, "device": "cpu", "features": "train.zarr"}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from npos import __version__


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: mappings -> dict, sequences -> list, paths and devices
    -> str, numpy/torch scalars -> Python numbers, dataclasses -> their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return value.item()
    return str(value)  # torch.device, dtypes, enums: their usual spelling


def settings_record(config: Any = None, /, **values: Any) -> dict[str, Any]:
    """The ``settings`` dict of an output.

    Parameters
    ----------
    config : dataclass or mapping, optional
        The run's config (``SynthesisConfig``, ``HeadConfig``, ``ScoringConfig``, ...); its
        ``to_dict()`` (else its fields) come first.
    **values
        Further settings: inputs (store URLs), seed, the resolved device, ... They must not
        repeat a field of ``config``.

    Returns
    -------
    dict
        ``{"npos_version": ..., **config fields, **values}``, JSON-ready.
    """
    fields = jsonable(config) if config is not None else {}
    if not isinstance(fields, dict):
        raise TypeError(f"config must be a dataclass or a mapping; got {type(config).__name__}")
    clash = sorted(set(fields) & set(values))
    if clash:
        raise TypeError(f"settings given twice (in config and as keywords): {clash}")
    return {"npos_version": __version__, **fields, **jsonable(values)}
