"""`npos synthesize`: virtual outliers from a cached feature store, for tuning parameters."""

from __future__ import annotations

import click

from npos.commands._common import device_option, output
from npos.commands._synthesis_options import synthesis_config_from_options, synthesis_options


@click.command("synthesize")
@click.argument("features")
@click.option("--out", help="Output outliers store (directory or fsspec URL).")
@synthesis_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the class banks and all noise.")
@device_option("Torch device of the engine.")
@click.option("--stats-only", is_flag=True, help="Print the summary; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
def command(features, out, seed, device, stats_only, overwrite, **options) -> None:
    """Synthesize virtual outliers from the labelled store FEATURES into --out.

    Each class bank is a seeded sample of --queue rows of the class (classes with fewer rows
    are reported and skipped). Prints, per class, quantiles of the K-th-NN distance of bank
    points, boundary points and kept outliers, and the share of candidates that landed
    farther out than their source point.
    """
    from npos.store import FeatureStore
    from npos.synthesize.offline import KINDS, check_output, synthesize_store, write_outliers

    config = synthesis_config_from_options(options)
    if not stats_only:
        if not out:
            raise click.UsageError("--out is required (or pass --stats-only)")
        check_output(out, overwrite=overwrite)
    with output(None if stats_only else out, "store"):
        source = FeatureStore.open(features, kinds=KINDS, what="synthesize")
        offline = synthesize_store(source, config, queue=options["queue"], seed=seed,
                                   device=device)
        for line in offline.format_summary():
            click.echo(line)
        if stats_only:
            click.echo("--stats-only: nothing written")
            return
        store = write_outliers(offline, out, source=source, overwrite=overwrite)
    click.echo(f"wrote {out}: {store.n_rows} outliers x {store.dim}")
