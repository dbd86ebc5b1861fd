"""`npos demo`: the whole pipeline on a small built-in dataset of real handwritten digits."""

from __future__ import annotations

import time

import click

from npos.commands._common import device_option
from npos.log import get_logger


@click.command("demo")
@click.option("--out", default="npos-demo", show_default=True, type=click.Path(),
              help="Folder for the images, feature stores, heads and reports. Re-running "
                   "reuses the cached features and writes its heads and reports to a new "
                   "OUT/run-N folder.")
@click.option("--model", default="npos-tiny", show_default=True,
              help="open_clip model name (npos-tiny: tiny random-init ViT, runs offline).")
@click.option("--pretrained", default="none", show_default=True,
              help="Weights: a pretrained tag (e.g. openai), an hf-hub: id, a local "
                   "checkpoint file, or none for a seeded random init.")
@device_option()
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed for the data split, the random-init encoder and training.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1),
              help="Head training epochs.")
@click.option("--overwrite", is_flag=True,
              help="Replace the heads, reports and summary.md in OUT instead of writing a new "
                   "OUT/run-N folder (the cached features are reused either way).")
def command(out: str, model: str, pretrained: str, device: str, seed: int, epochs: int,
            overwrite: bool) -> None:
    """Run extract -> train-head -> evaluate on scikit-learn's handwritten digits.

    \b
    ID:        digits 0-5 (train/test split)
    near-OOD:  digits 6-9
    far-OOD:   noise images
    Compares the zero-shot encoder (MCM, KNN), a head trained with NPOS synthesis, and the
    same head trained without synthesis (--ood-weight 0). Reports go to OUT/reports/ (a
    re-run: OUT/run-N/reports/, or OUT/reports/ again with --overwrite).
    """
    from npos.demo import demo_run_folder, prepare_demo_folder, run_demo, summary_table

    prepare_demo_folder(out)
    run_dir = demo_run_folder(out, overwrite=overwrite)
    if pretrained.lower() == "none":
        get_logger("npos.demo").warning(
            f"the encoder {model!r} is randomly initialized (--pretrained none): the pipeline "
            "runs end to end, but its features are not CLIP's, so the numbers say nothing "
            "about NPOS on real embeddings.")
    start = time.perf_counter()
    results = run_demo(out, model=model, pretrained=pretrained, seed=seed, device=device,
                       epochs=epochs, overwrite=overwrite, run_dir=run_dir)
    table = summary_table(results)
    click.echo("")
    click.echo(table)
    click.echo(f"\nreports: {run_dir}/reports/<variant>/ (metrics.json, report.md, plots/); "
               f"summary: {run_dir}/summary.md; {time.perf_counter() - start:.0f} s")
