"""`npos finetune`: the encoder's last blocks + a head, trained from cached tokens."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import fields

import click

from npos.commands import train_head as _train_head
from npos.log import get_logger

#: train-head's parameters that finetune does not take over: its input and output, its
#: validation store, and the flags whose help speaks of a head directory (finetune has its
#: own --overwrite/--resume for the whole output directory).
_NOT_REUSED = {"features", "out", "val", "resume", "overwrite"}


def train_head_options(func: Callable) -> Callable:
    """Add every option of ``npos train-head`` (head, objective, optimizer, schedule,
    synthesis, ``--seed``, ``--device``, ``--amp``) to a click command, with the same names,
    types, defaults and help."""
    reused = [copy.copy(p) for p in _train_head.command.params if p.name not in _NOT_REUSED]
    # click.option decorators append to __click_params__ and the list is read reversed.
    func.__click_params__ = [  # type: ignore[attr-defined]  # click's own convention
        *getattr(func, "__click_params__", []), *reversed(reused)]
    return func


@click.command("finetune")
@click.argument("train_store")
@click.option("--out", required=True, help="Output directory: tail.safetensors, tail.json, "
              "head/ and one NAME.zarr per --embed.")
@click.option("--model", required=True, help="open_clip model the tokens were extracted with "
              "(checked against the store).")
@click.option("--pretrained", default=None, help="Its weights, as given to 'npos extract': a "
              "tag, a checkpoint file, or 'none' (random init).")
@click.option("--embed", "embed", multiple=True, metavar="NAME=STORE",
              help="Re-embed this token store (same model and layer) with the tuned tail into "
              "OUT/NAME.zarr. Repeatable.")
@train_head_options
@click.option("--tail-lr-scale", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="The tail's learning rate is --lr times this.")
@click.option("--shuffle-window", type=click.IntRange(min=1), default=None,
              help="Rows shuffled together while streaming tokens [default: 8 x batch size].")
@click.option("--embed-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Rows per forward pass when re-embedding.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars with samples/s [default: when stderr is a terminal].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: training from its "
              "last finished epoch, then the store chunks not yet written.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run in OUT.")
def command(train_store: str, out: str, model: str, pretrained: str | None,
            embed: tuple[str, ...], tail_lr_scale: float, shuffle_window: int | None,
            embed_batch_size: int, progress: bool | None, resume: bool, overwrite: bool,
            device: str, **options) -> None:
    """Fine-tune the last blocks of the encoder, with a head, from the tokens in TRAIN_STORE.

    TRAIN_STORE must hold tokens (npos extract --tokens-layer L). Blocks L+1.. of the ViT,
    its final norm and projection are trained together with the projection, classifier
    and OOD head under train-head's objective (ID loss + weighted outlier loss with online
    synthesis). Writes OUT/tail.safetensors (+ tail.json), OUT/head/ (usable by 'npos
    evaluate --head') and OUT/NAME.zarr for every --embed NAME=STORE.
    """
    from npos.commands._common import UserError
    from npos.commands._synthesis_options import synthesis_config_from_options
    from npos.finetune import FinetuneConfig, finetune, parse_embed_specs
    from npos.train_head import HeadConfig

    if options.get("outliers") or options.get("outliers_per_step"):
        # Offline outliers live in the frozen embedding space, which the tail moves.
        raise UserError("finetune synthesizes online (the tail moves the embedding space): "
                        "--outliers is for 'npos train-head' only; drop it")

    names = {f.name for f in fields(HeadConfig)}
    head_config = HeadConfig(**{k: v for k, v in options.items() if k in names},
                             synthesis=synthesis_config_from_options(options))
    config = FinetuneConfig(tail_lr_scale=tail_lr_scale, window_rows=shuffle_window,
                            embed_batch_size=embed_batch_size)
    result = finetune(train_store, out, model=model, pretrained=pretrained,
                      head_config=head_config, config=config, embed=parse_embed_specs(embed),
                      device=device, overwrite=overwrite, resume=resume,
                      progress=progress, log=get_logger("npos.finetune").info)
    last = result.history[-1] if result.history else None
    click.echo(f"wrote {result.out_dir}: tail {result.tail['fingerprint']['pretrained']!r}"
               + (f", train accuracy {last['accuracy']:.4f}" if last else ""))
