"""Click options shared by ``npos evaluate`` and ``npos score`` (same names, same defaults)."""

from __future__ import annotations

import click

from npos.commands._common import device_option
from npos.knn import KNN_BACKENDS


def scoring_options(func):
    """Decorate a command with --head, --train, --scores, --knn-k, --knn-backend,
    --mcm-temperature, --device and --batch-size."""
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
        click.option("--mcm-temperature", type=click.FloatRange(min=0, min_open=True),
                     default=1.0, show_default=True,
                     help="Temperature T of MCM: max softmax(cos / T)."),
        device_option(),
        click.option("--batch-size", type=click.IntRange(min=1), default=65536,
                     show_default=True,
                     help="Rows per batch (rounded down to whole store chunks)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
