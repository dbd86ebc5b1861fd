"""`npos score`: per-row OOD scores of a store, to .csv, .parquet or .zarr."""

from __future__ import annotations

import sys

import click

from npos.commands._scoring_options import scoring_options


@click.command("score")
@click.argument("store")
@scoring_options
@click.option("--out", required=True, metavar="FILE",
              help="Output: .csv, .parquet (needs pyarrow) or .zarr (a store of kind scores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing FILE.")
@click.option("--threshold", metavar="auto|VALUE|FILE",
              help="Add an is_ood column (1 = the first score is below the threshold): auto "
                   "= the thresholds stored with --head, a number, or a file from 'npos "
                   "calibrate'.")
def command(store, head, train, out, overwrite, threshold, **options) -> None:
    """Write OOD scores (higher = more in-distribution) for every row of STORE.

    Rows keep the store's ids and order. Runs under torchrun: each rank scores batches
    rank, rank+W, ...; rank 0 writes csv/parquet, every rank writes its zarr chunks.
    """
    from npos.evaluate import ScoringConfig, score_store

    summary = score_store(store, out, ScoringConfig(**options), head=head, train=train,
                          overwrite=overwrite, progress=sys.stderr.isatty(),
                          threshold=threshold)
    if summary.rank == 0:
        click.echo(str(summary))
