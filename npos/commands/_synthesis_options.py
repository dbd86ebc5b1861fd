"""The synthesis options shared by ``npos synthesize`` and ``npos train-head``.

Usage::

    @click.command()
    @synthesis_options
    def command(..., **options):
        config = synthesis_config_from_options(options)   # SynthesisConfig
        queue = options["queue"]                           # bank / ring-buffer size per class

Defaults come from :class:`npos.synthesize.SynthesisConfig` (one source of truth); click
only checks types and simple ranges, the config validates the rest with clear messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import click

from npos.synthesize.config import BACKENDS, METHODS, NOISE_SPACES, SynthesisConfig

#: Keyword arguments (option destinations) that make a :class:`SynthesisConfig`.
CONFIG_OPTION_NAMES = tuple(f.name for f in fields(SynthesisConfig))
DEFAULT_QUEUE = 1000

_DEFAULTS = {f.name: f.default for f in fields(SynthesisConfig)}


def synthesis_options(func: Callable) -> Callable:
    """Add --method --k --select --pick --candidates --sigma --noise-space --keep --queue
    --backend to a click command (keyword arguments ``method``, ``k``, ..., ``queue``)."""
    decorators = [
        click.option("--method", type=click.Choice(METHODS), default=_DEFAULTS["method"],
                     show_default=True,
                     help="npos: boundary + rejection (the paper); vos: shared-covariance "
                          "Gaussians, least likely kept; gaussian: noise around random bank "
                          "points, no selection/rejection."),
        click.option("--k", type=click.IntRange(min=1), default=_DEFAULTS["k"],
                     show_default=True, help="K of the K-th-nearest-neighbour distance (< queue)."),
        click.option("--select", type=click.IntRange(min=1), default=_DEFAULTS["select"],
                     show_default=True,
                     help="Boundary points per class: largest K-th-NN distance (npos)."),
        click.option("--pick", type=click.IntRange(min=1), default=_DEFAULTS["pick"],
                     show_default=True, help="Points sampled around per class and call."),
        click.option("--candidates", type=click.IntRange(min=1),
                     default=_DEFAULTS["candidates"], show_default=True,
                     help="Gaussian candidates per picked point (npos; per slot for vos)."),
        click.option("--sigma", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Noise std [default: 0.01 for sphere, 0.1 for raw; the paper's "
                          "raw 0.1 on CLIP ViT-B/16 is ~0.01 in sphere terms]."),
        click.option("--noise-space", type=click.Choice(NOISE_SPACES),
                     default=_DEFAULTS["noise_space"], show_default=True,
                     help="sphere: noise on unit vectors, outliers keep the source norm; "
                          "raw: b + sigma*eps on raw embeddings (the paper's code)."),
        click.option("--keep", type=click.IntRange(min=1), default=_DEFAULTS["keep"],
                     show_default=True,
                     help="Outliers kept per picked point (largest K-th-NN distance)."),
        click.option("--queue", type=click.IntRange(min=2), default=DEFAULT_QUEUE,
                     show_default=True, help="Bank (ring-buffer) size per class."),
        click.option("--backend", type=click.Choice(BACKENDS), default=_DEFAULTS["backend"],
                     show_default=True,
                     help="kNN backend: torch (batched exact), faiss-flat, faiss-ivf, auto."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def synthesis_config_from_options(options: Mapping[str, Any]) -> SynthesisConfig:
    """The :class:`SynthesisConfig` described by a command's keyword arguments."""
    return SynthesisConfig(**{name: options[name] for name in CONFIG_OPTION_NAMES})
