"""Click options shared by ``npos evaluate`` and ``npos score`` (same names, same defaults)."""

from __future__ import annotations

import click

from npos.commands._common import device_option
from npos.knn import KNN_BACKENDS


def scoring_options(func):
    """Decorate a command with --head, --train, --scores, --knn-k, --knn-backend,
    --mcm-temperature, --device, --batch-size, --text-bank and the neglabel/csp options.
    Every option but --head and --train is a :class:`~npos.evaluate.ScoringConfig` field."""
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
                          "mahalanobis, head, neglabel, csp, any registered detector, or a "
                          "fusion a+b (rank-normalized, averaged). Default: mcm (when "
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
        click.option("--text-bank", metavar="TEXT.zarr",
                     help="Text bank (from 'npos text-bank') for neglabel and csp; must come "
                          "from the stores' encoder."),
        click.option("--neg-count", type=click.IntRange(min=1), default=10000,
                     show_default=True, help="neglabel/csp: at most M negative labels."),
        click.option("--neg-groups", type=click.IntRange(min=1), default=100,
                     show_default=True, help="neglabel/csp: G random groups of negatives."),
        click.option("--neg-quantile", type=click.FloatRange(0, 1), default=0.95,
                     show_default=True,
                     help="neglabel/csp: eta, the quantile of a word's cosines to the classes."),
        click.option("--neg-fraction", type=click.FloatRange(0, 1, min_open=True),
                     default=0.15, show_default=True,
                     help="neglabel/csp: least similar fraction kept per part of speech."),
        click.option("--neg-temperature", type=click.FloatRange(min=0, min_open=True),
                     default=0.01, show_default=True, help="neglabel/csp: softmax temperature."),
        click.option("--csp-threshold", type=click.FloatRange(-1, 1), default=0.95,
                     show_default=True,
                     help="csp: exclude candidates whose largest cosine to a class exceeds it."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seed of the negatives' grouping."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
