"""`npos calibrate`: per-score thresholds at a chosen ID true-positive rate."""

from __future__ import annotations

import sys

import click

from npos.commands._scoring_options import scoring_options


@click.command("calibrate")
@click.option("--id", "id_store", required=True, metavar="STORE",
              help="In-distribution calibration features (e.g. a held-out split).")
@scoring_options
@click.option("--tpr", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              show_default=True, help="ID true-positive rate the thresholds keep.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              metavar="THRESHOLDS.json", help="Output thresholds file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def command(id_store, tpr, out, overwrite, head, train, **options) -> None:
    """Store the threshold of every score keeping at least --tpr of the ID rows
    (decision: is_ood = score < threshold). Use with 'npos score --threshold FILE'."""
    from npos.atomic import check_output
    from npos.evaluate import ScoringConfig
    from npos.evaluate.calibration import calibrate, write_thresholds

    check_output(out, overwrite=overwrite, what="thresholds file")
    record = calibrate(id_store, ScoringConfig(**options), tpr=tpr, head=head, train=train,
                       progress=sys.stderr.isatty())
    write_thresholds(record, out, overwrite=overwrite)
    for name, value in record["thresholds"].items():
        click.echo(f"{name}: threshold {value:.6g} (ID TPR {100 * record['id_tpr'][name]:.2f} %)")
    click.echo(f"wrote {out}")
