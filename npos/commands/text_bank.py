"""`npos text-bank`: embed a word list once per encoder (``npos text-bank --model ...``), or
import one's own (``npos text-bank import ...``), into a store of kind ``text-bank``."""

from __future__ import annotations

import sys

import click

from npos.commands._common import UserError, device_option
from npos.textbank.corpus import SUPERCLASSES


@click.group("text-bank", invoke_without_command=True)
@click.option("--model", help="open_clip model name, as given to extract.")
@click.option("--pretrained", help="Pretrained tag, checkpoint file, or 'none' (seeded random "
                                   "init), as given to extract.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of a random-init encoder (as given to extract).")
@click.option("--corpus", default="wordnet", show_default=True, metavar="wordnet|FILE",
              help="Word list: the shipped WordNet 3.0 nouns and adjectives, or a file with "
                   "one word per line (optionally word<TAB>pos<TAB>lexname).")
@click.option("--templates", "templates_file", type=click.Path(exists=True, dir_okay=False),
              help="Prompt templates file, one per line with '{}' (default: extract's 18).")
@click.option("--superclasses", default=",".join(SUPERCLASSES), show_default=True,
              metavar="WORD,WORD,...",
              help="csp: each adjective also gets a conjugated row, the mean embedding of "
                   "'<adjective> <superclass>' over these words; '' for none.")
@click.option("--out", help="Output text bank (directory or fsspec URL).")
@device_option()
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Prompts per text-encoder forward pass.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bank (without it a "
                                                "re-run resumes an interrupted one).")
@click.pass_context
def command(ctx, model, pretrained, seed, corpus, templates_file, superclasses, out, device,
            batch_size, overwrite) -> None:
    """Embed a word list with prompt templates into TEXT.zarr, once per encoder.

    Chunked and resumable (re-run the same command after an interruption); one process.
    The bank's model, weights and seed must match the image stores it scores.
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [flag for flag, value in (("--model", model), ("--pretrained", pretrained),
                                        ("--out", out)) if value is None]
    if missing:
        raise UserError(f"npos text-bank needs {', '.join(missing)}")
    from npos.extract.text import load_templates
    from npos.textbank import build_text_bank

    templates = load_templates(templates_file) if templates_file else None
    fs = build_text_bank(out, model=model, pretrained=pretrained, corpus=corpus,
                         templates=templates, seed=seed, device=device,
                         superclasses=[w for w in superclasses.split(",") if w.strip()],
                         batch_size=batch_size, overwrite=overwrite,
                         progress=sys.stderr.isatty())
    click.echo(f"wrote {out}: {fs.n_rows} words x {fs.dim} ({model}, {corpus})")


@command.command("import")
@click.option("--embeddings", required=True, type=click.Path(exists=True, dir_okay=False),
              help=".npy of shape (N, D): one text embedding per word.")
@click.option("--words", required=True, type=click.Path(exists=True, dir_okay=False),
              help="N lines: word, or word<TAB>pos (n/a)<TAB>lexname.")
@click.option("--pos", type=click.Choice(["n", "a", "c"]),
              help="Part of speech of the words that give none (n noun, a adjective, "
                   "c conjugated); default: none.")
@click.option("--model", default="imported", show_default=True,
              help="Encoder name; must equal the image stores' model.")
@click.option("--pretrained", default=None, help="Weights identity; must equal the image "
                                                 "stores' pretrained attribute.")
@click.option("--out", required=True, help="Output text bank.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bank.")
def import_(embeddings, words, pos, model, pretrained, out, overwrite) -> None:
    """Import text embeddings computed elsewhere as a text bank."""
    from npos.textbank import import_text_bank

    fs = import_text_bank(embeddings, words, out, pos=pos, model=model,
                          pretrained=pretrained, overwrite=overwrite)
    click.echo(f"wrote {out}: {fs.n_rows} words x {fs.dim} ({model})")
