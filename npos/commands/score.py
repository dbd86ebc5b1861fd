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
def command(store, head, train, scores, knn_k, knn_backend, index, mcm_temperature, device,
            batch_size, memory_budget, out, overwrite) -> None:
    """Write OOD scores (higher = more in-distribution) for every row of STORE.

    Rows keep the store's ids and order. Runs under torchrun: each rank scores batches
    rank, rank+W, ...; rank 0 writes csv/parquet, every rank writes its zarr chunks.
    """
    from npos.evaluate import ScoringConfig, score_store

    config = ScoringConfig(scores=scores, knn_k=knn_k, knn_backend=knn_backend,
                           index=index, mcm_temperature=mcm_temperature, device=device,
                           batch_size=batch_size, memory_budget=memory_budget)
    summary = score_store(store, out, config, head=head, train=train, overwrite=overwrite,
                          progress=sys.stderr.isatty())
    if summary.rank == 0:
        click.echo(str(summary))
