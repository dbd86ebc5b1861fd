"""Click options shared by ``npos evaluate`` and ``npos score`` (same names, same defaults)."""

from __future__ import annotations

import click

from npos.commands._common import device_option
from npos.knn import KNN_BACKENDS


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from npos.commands._common import UserError
    from npos.errors import ParameterError
    from npos.validation import parse_size

    try:
        return parse_size("--memory-budget", value)
    except ParameterError as exc:
        raise UserError(str(exc)) from None


def scoring_options(func):
    """Decorate a command with --head, --train, --scores, --knn-k, --knn-backend, --index,
    --mcm-temperature, --device, --batch-size and --memory-budget."""
    options = [
        click.option("--head", "head", type=click.Path(exists=True, file_okay=False),
                     help="Trained head folder (from train-head): score in its projected "
                          "space. Without it: the encoder space with the store's class text "
                          "embeddings (zero-shot baseline)."),
        click.option("--train", "train", metavar="TRAIN_STORE",
                     help="Train feature store: the bank for knn and the class statistics for "
                          "mahalanobis."),
        click.option("--scores", "scores", metavar="LIST",
                     help="Comma-separated detector names: mcm, msp, maxlogit, energy, knn, "
                          "mahalanobis, head, or any registered detector. Default: mcm (when "
                          "text embeddings or a head give class logits), + knn with --train, "
                          "+ head with --head."),
        click.option("--knn-k", type=click.IntRange(min=1), default=50, show_default=True,
                     help="K of the knn score (K-th nearest train neighbour)."),
        click.option("--knn-backend", type=click.Choice(KNN_BACKENDS), default="auto",
                     show_default=True, help="kNN backend for the knn score."),
        click.option("--index", "index", metavar="PATH|none",
                     help="The train store's index for knn (npos index build). Default: "
                          "TRAIN_STORE.index when it exists; 'none' never uses one. Refused "
                          "when built for another store or before the store changed."),
        click.option("--mcm-temperature", type=click.FloatRange(min=0, min_open=True),
                     default=1.0, show_default=True,
                     help="Temperature T of MCM: max softmax(cos / T)."),
        device_option(),
        click.option("--batch-size", type=click.IntRange(min=1), default=65536,
                     show_default=True,
                     help="Rows per batch (rounded down to whole store chunks)."),
        click.option("--memory-budget", default="256M", show_default=True, metavar="SIZE",
                     callback=_size,
                     help="Working memory of one scoring block (e.g. 64M, 1G): batches are "
                          "scored in row blocks that fit it."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
