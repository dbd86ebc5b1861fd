"""`npos store`: inspect, verify and import feature stores.

``info`` and ``verify`` take a store of any kind (features, outliers, scores); ``import``
writes a features store.
"""

from __future__ import annotations

import json
import sys

import click

from npos.commands._common import EXIT_CHECK_FAILED


@click.group("store")
def command() -> None:
    """Inspect, verify and import feature stores (Zarr)."""


@command.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--failed", "list_failed", is_flag=True,
              help="List the inputs that failed (id and reason) instead of the summary.")
def info(store: str, as_json: bool, list_failed: bool) -> None:
    """Summarize STORE: rows, dim, dtype, kind, model, classes, chunks done."""
    from npos.store import FeatureStore

    fs = FeatureStore.open(store)
    if list_failed:
        failed = fs.failed_rows()
        if as_json:
            click.echo(json.dumps(failed, indent=2))
            return
        for row in failed:
            click.echo(f"{row['id']}\t{row['reason']}")
        click.echo(f"{store}: {len(failed)} of {fs.n_rows} rows failed", err=True)
        return
    summary = fs.info()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if key == "arrays":
            value = ", ".join(value)
        click.echo(f"{key:>13}: {value}")


@command.command("verify")
@click.argument("store")
@click.option("--no-values", is_flag=True,
              help="Skip the NaN/Inf scan of the embeddings (structure and chunks only).")
def verify(store: str, no_values: bool) -> None:
    """Check every array of STORE. Exit 0 when it is healthy, else 1.

    Prints one line per problem, naming the array, chunks and rows: chunks not done, chunk
    files lost, NaN/Inf embeddings or tokens, labels outside the class list, empty or
    duplicate ids, 'valid' and 'error' that disagree, bad shapes.
    """
    from npos.store import FeatureStore

    fs = FeatureStore.open(store)
    problems = fs.verify(check_values=not no_values, progress=sys.stderr.isatty())
    if problems:
        for line in problems:
            click.echo(f"problem: {line}")
        click.echo(f"{store}: {len(problems)} problem(s) found; to repair: "
                   f"{fs.repair_hint().split(';')[0]}", err=True)
        sys.exit(EXIT_CHECK_FAILED)
    if not fs.checks_chunk_files:
        click.echo(f"note: {store} was written by an older npos that did not store every "
                   "chunk: lost chunk files cannot be told apart from fill values", err=True)
    click.echo(f"{store}: ok ({fs.n_rows} rows, {fs.n_chunks}/{fs.n_chunks} chunks done)")


@command.command("import")
@click.option("--embeddings", required=True, type=click.Path(),
              help="Embeddings: .npy or .npz (N, D), or a folder of .npy shards "
                   "(e.g. clip-retrieval's img_emb/).")
@click.option("--labels", type=click.Path(), help=".npy of N integer labels (-1 = unlabeled).")
@click.option("--ids", type=click.Path(), help="Text file, one id per row (default: row number).")
@click.option("--class-names", type=click.Path(), help="Text file, one class name per line.")
@click.option("--text-embeddings", type=click.Path(),
              help=".npy of shape (classes, D): zero-shot class embeddings.")
@click.option("--model", default=None,
              help="Name of the encoder that made the embeddings (e.g. ViT-B-16); stores are "
                   "only combined with stores (and heads) of the same model. Without it the "
                   "store is of unknown encoder: it combines only with other such stores, "
                   "with a warning.")
@click.option("--pretrained", default=None, metavar="TAG",
              help="The encoder's weights (e.g. openai, or none); needs --model.")
@click.option("--out", required=True, help="Output store (directory or fsspec URL).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the embeddings.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Rows per chunk.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store at --out. Without it, re-running an "
                   "interrupted import continues it, and re-running on a damaged store "
                   "repairs it.")
def import_(embeddings, labels, ids, class_names, text_embeddings, model, pretrained, out,
            dtype, chunk_rows, overwrite) -> None:
    """Import embeddings computed elsewhere into a new store."""
    from npos.store import import_embeddings

    store = import_embeddings(
        embeddings, out, labels=labels, ids=ids, class_names=class_names,
        text_embeddings=text_embeddings, model=model, pretrained=pretrained, dtype=dtype,
        chunk_rows=chunk_rows, overwrite=overwrite, progress=sys.stderr.isatty())
    info = store.info()
    click.echo(f"wrote {out}: {info['rows']} rows x {info['dim']} ({info['dtype']}), "
               f"{info['classes'] or 0} classes, {info['chunks_total']} chunks")
