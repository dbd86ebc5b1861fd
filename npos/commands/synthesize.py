"""`npos synthesize`: virtual outliers from a cached feature store, for tuning parameters."""

from __future__ import annotations

import click

from npos.commands._common import device_option
from npos.commands._synthesis_options import synthesis_config_from_options, synthesis_options


@click.command("synthesize")
@click.argument("features")
@click.option("--out", help="Output outliers store (directory or fsspec URL).")
@synthesis_options
@click.option("--bank", type=click.Choice(["sample", "all"]), default="sample",
              show_default=True,
              help="Class banks: a seeded --queue-row sample per class (the paper), or every "
                   "valid row of the class (an index per class when it is large).")
@click.option("--scope", type=click.Choice(["class", "global"]), default="class",
              show_default=True,
              help="Per class (labels needed), or class-agnostic over every valid row of the "
                   "store (unlabeled stores; labels ignored; needs --count).")
@click.option("--count", type=int, default=None,
              help="--scope global: outliers in total.")
@click.option("--index", "index", metavar="PATH|none",
              help="The store's index (npos index build) for --scope global and for --bank all "
                   "classes large enough for IVF. Default: FEATURES.index when it exists; "
                   "'none' builds an in-memory index per bank. Refused when built for another "
                   "store or before the store changed.")
@click.option("--memory-budget", default="1GiB", show_default=True,
              help="Bound on the float32 rows held at once (--bank all reads classes in groups "
                   "that fit; --scope global without a store index needs the whole store to "
                   "fit, with one it streams) and on the engine's working memory.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the class banks and all noise.")
@device_option("Torch device of the engine.")
@click.option("--stats-only", is_flag=True, help="Print the summary; write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out.")
def command(features, out, bank, scope, count, index, memory_budget, seed, device, stats_only,
            overwrite, **options) -> None:
    """Synthesize virtual outliers from the store FEATURES into --out.

    --bank sample (default): each class bank is a seeded sample of --queue rows of the class
    (classes with fewer rows are reported and skipped). --bank all: boundary points among all
    valid rows of each class, candidates rejected against the whole class. --scope global:
    class-agnostic over all valid rows (unlabeled stores), --count outliers in total. Under
    torchrun the ranks split the kNN searches of --bank all / --scope global (with --bank
    sample each rank computes the same) and rank 0 writes. Prints, per class,
    quantiles of the K-th-NN distance of bank points, boundary points and kept outliers, and
    the share of candidates that landed farther out than their source point.
    """
    from npos.atomic import check_writable
    from npos.evaluate.batching import Distributed
    from npos.store import FeatureStore
    from npos.synthesize.offline import KINDS, check_output, synthesize_store
    from npos.synthesize.scale import Ranks
    from npos.validation import parse_size

    budget = parse_size("--memory-budget", memory_budget)
    config = synthesis_config_from_options(options)
    if not stats_only:
        if not out:
            raise click.UsageError("--out is required (or pass --stats-only)")
        check_output(out, overwrite=overwrite)
        check_writable(out, "store")  # before any work: parents created, a probe written
    source = FeatureStore.open(features, kinds=KINDS, what="synthesize")
    with Distributed(device) as group:
        offline = synthesize_store(source, config, queue=options["queue"], seed=seed,
                                   device=group.device, memory_budget=budget, bank=bank,
                                   scope=scope, count=count, index=index,
                                   ranks=Ranks(group.rank, group.world))
        if group.rank != 0:  # rank 0 reports and writes
            return
        for line in offline.format_summary():
            click.echo(line)
        if stats_only:
            click.echo("--stats-only: nothing written")
            return
        store = offline.write(out, source=source, overwrite=overwrite)
        click.echo(f"wrote {out}: {store.n_rows} outliers x {store.dim}")
