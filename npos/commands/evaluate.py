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
@click.option("--threshold", metavar="auto|VALUE|FILE",
              help="Also report the ID TPR and each OOD set's FPR at this threshold of the "
                   "first score (auto = the thresholds stored with --head).")
def command(id_store, ood, head, train, out, overwrite, threshold, **options) -> None:
    """Compute OOD metrics (FPR95, AUROC, AUPR-In, AUPR-Out) of every score on every OOD set.

    Scores follow one convention: higher = more in-distribution; ID is the positive class.
    Writes REPORT_DIR/metrics.json (fractions), report.md (percentages) and PNG plots, and
    prints the summary table. All stores (and the head) must come from the same encoder.
    """
    from npos.evaluate import ScoringConfig, check_report_dir, evaluate, main_table, \
        parse_ood_specs, write_report

    ood_stores = parse_ood_specs(ood)
    config = ScoringConfig(**options)
    check_report_dir(out, overwrite=overwrite)
    result = evaluate(id_store, ood_stores, config, head=head, train=train,
                      progress=sys.stderr.isatty(), threshold=threshold)
    write_report(result, out, overwrite=overwrite)
    click.echo(main_table(result))
    if "threshold" in result.settings:
        t = result.settings["threshold"]
        fprs = ", ".join(f"{k} {100 * v:.2f} %" for k, v in t["fpr"].items())
        click.echo(f"at threshold {t['value']:.6g} of {t['score']}: ID TPR "
                   f"{100 * t['id_tpr']:.2f} %, FPR {fprs}")
    acc = result.id_accuracy
    click.echo(f"ID accuracy: {100 * acc:.2f} %" if acc is not None else "ID accuracy: n/a")
    click.echo(f"report: {out}/report.md (metrics.json, plots/)")
