"""`npos extract`: images -> Zarr feature store through a frozen open_clip encoder."""

from __future__ import annotations

import click

from npos.commands._common import device_option
from npos.store import DEFAULT_CHUNK_ROWS

#: Default of --max-failed (npos.extract.extraction.DEFAULT_MAX_FAILED; not imported from
#: there so that 'npos --help' does not import torch).
DEFAULT_MAX_FAILED = 0.05


@click.command("extract")
@click.argument("data", type=click.Path())
@click.option("--out", required=True,
              help="Output store (directory or fsspec URL). An unfinished store made by the "
                   "same command is resumed.")
@click.option("--model", required=True,
              help="open_clip model name (e.g. ViT-B-16), hf-hub:org/repo, or npos-tiny "
                   "(tiny random-init ViT for tests and the offline demo).")
@click.option("--pretrained", default=None, metavar="TAG|PATH|none",
              help="Weights: a pretrained tag of the model (openai, laion2b_s34b_b88k, ...), a "
                   "local checkpoint file, or 'none' for seeded random init. Required except "
                   "for npos-tiny and hf-hub: models.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass (batches never span chunks).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes; 0 decodes in the main process.  "
                   "[default: min(8, CPU cores)]")
@device_option("Autocast on CUDA.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage dtype of the embeddings.")
@click.option("--tokens-layer", type=click.IntRange(min=0), default=None, metavar="L",
              help="Also store the ViT residual stream after L blocks (all tokens, float16) "
                   "for fine-tuning the remaining blocks.")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False),
              help="File with the class keys (folder names / list labels) in label order, one "
                   "per line.")
@click.option("--class-names", metavar="imagenet|FILE",
              help="Readable class names for the prompts: 'imagenet' (WordNet-id folders) or a "
                   "file of 'key<TAB>name' (or 'key name') lines.")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False),
              help="Prompt templates, one per line with '{}' for the class name "
                   "[default: the paper's 18].")
@click.option("--unlabeled", is_flag=True,
              help="Ignore class folders / labels (OOD sets): labels -1, no text embeddings.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip",
              show_default=True,
              help="skip: record unreadable images in the store and go on; fail: stop at the "
                   "first one.")
@click.option("--max-failed", type=click.FloatRange(0, 1), default=DEFAULT_MAX_FAILED,
              show_default=True,
              metavar="FRACTION",
              help="Largest share of images that may fail to read. Above it (or when every "
                   "image failed) the command exits 2 after the run; the store is kept.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ROWS,
              show_default=True, help="Rows per chunk: the unit of writing, resuming and "
                                      "sharding across processes.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of random-init weights (--pretrained none, npos-tiny).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store instead of resuming.")
def command(data, out, model, pretrained, batch_size, workers, device, dtype, tokens_layer,
            classes, class_names, templates, unlabeled, on_error, max_failed, chunk_rows, seed,
            overwrite) -> None:
    """Encode the images of DATA into a feature store.

    DATA is an image folder (one sub-folder per class; no sub-folders = unlabeled) or a
    .txt/.csv file list (path and optional label per line). Runs under torchrun too: every
    rank takes its share of the chunks. Re-running the same command resumes an interrupted
    run and repairs a damaged store (chunks that lost a file are encoded again).
    """
    from npos.atomic import check_writable
    from npos.extract import FeatureExtractor

    check_writable(out, "store")  # before any work: parents created, a probe written

    extractor = FeatureExtractor(
        model=model, pretrained=pretrained, batch_size=batch_size, workers=workers,
        device=device, dtype=dtype, tokens_layer=tokens_layer, classes=classes,
        class_names=class_names, templates=templates, unlabeled=unlabeled, on_error=on_error,
        max_failed=max_failed, chunk_rows=chunk_rows, seed=seed, overwrite=overwrite).run(data, out)
    stats, store = extractor.stats_, extractor.store_
    run = (f"{stats.rows} rows encoded ({stats.failed} failed) in {stats.seconds:.1f} s, "
           f"{stats.images_per_second:.1f} images/s" if stats.rows else "nothing left to encode")
    if stats.repaired:
        shown = ", ".join(map(str, stats.repaired[:10])) + (" ..." if len(stats.repaired) > 10
                                                             else "")
        run += f"; repaired {len(stats.repaired)} damaged chunk(s): {shown}"
    if stats.world_size > 1:
        run = f"rank {stats.rank}/{stats.world_size}: {run}"
    if stats.rank != 0:
        click.echo(run)
        return
    click.echo(f"{out}: {store.n_rows} rows x {store.dim} ({store.dtype}), "
               f"{stats.store_failed} failed; {run}")
