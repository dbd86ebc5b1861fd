"""`npos evaluate`: OOD metrics of an ID test store against OOD stores, with a report."""

from __future__ import annotations

import sys

import click

from npos.commands._scoring_options import scoring_options


@click.command("evaluate")
@click.option("--id", "id_store", required=True, metavar="TEST_STORE",
              help="In-distribution test feature store.")
@click.option("--ood", "ood", multiple=True, required=True, metavar="NAME=STORE",
              help="An OOD set: its name in the tables and its feature store. Repeatable.")
@scoring_options
@click.option("--out", required=True, type=click.Path(), metavar="REPORT_DIR",
              help="Report folder: metrics.json, report.md, plots/*.png.")
@click.option("--overwrite", is_flag=True, help="Replace an existing REPORT_DIR.")
def command(id_store, ood, head, train, scores, knn_k, knn_backend, index, mcm_temperature,
            device, batch_size, memory_budget, out, overwrite) -> None:
    """Compute OOD metrics (FPR95, AUROC, AUPR-In, AUPR-Out) of every score on every OOD set.

    Scores follow one convention: higher = more in-distribution; ID is the positive class.
    Writes REPORT_DIR/metrics.json (fractions), report.md (percentages) and PNG plots, and
    prints the summary table. All stores (and the head) must come from the same encoder.
    """
    from npos.evaluate import ScoringConfig, check_report_dir, evaluate, main_table, \
        parse_ood_specs, write_report

    ood_stores = parse_ood_specs(ood)
    config = ScoringConfig(scores=scores, knn_k=knn_k, knn_backend=knn_backend,
                           index=index, mcm_temperature=mcm_temperature, device=device,
                           batch_size=batch_size, memory_budget=memory_budget)
    check_report_dir(out, overwrite=overwrite)
    result = evaluate(id_store, ood_stores, config, head=head, train=train,
                      progress=sys.stderr.isatty())
    write_report(result, out, overwrite=overwrite)
    click.echo(main_table(result))
    acc = result.id_accuracy
    click.echo(f"ID accuracy: {100 * acc:.2f} %" if acc is not None else "ID accuracy: n/a")
    click.echo(f"report: {out}/report.md (metrics.json, plots/)")
