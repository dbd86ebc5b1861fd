"""`npos train-head`: projection + cosine classifier + OOD head with online synthesis."""

from __future__ import annotations

import sys
from dataclasses import fields

import click

from npos.commands._common import device_option
from npos.commands._synthesis_options import synthesis_config_from_options, synthesis_options
from npos.log import get_logger


def _default(name: str):
    # HeadConfig is the one source of truth for defaults, read without importing torch.
    from npos.train_head.config import HeadConfig

    return {f.name: f.default for f in fields(HeadConfig)}[name]


@click.command("train-head")
@click.argument("features")
@click.option("--out", required=True, help="Output head directory (model.safetensors + "
              "config.json).")
@click.option("--epochs", type=click.IntRange(min=1), default=_default("epochs"),
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=_default("batch_size"),
              show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_default("lr"),
              show_default=True, help="Learning rate of projection and classifier (cosine "
              "schedule to 0).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=_default("optimizer"),
              show_default=True, help="SGD (with --momentum) or AdamW; both with "
              "--weight-decay.")
@click.option("--momentum", type=click.FloatRange(0, 1), default=_default("momentum"),
              show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_default("weight_decay"),
              show_default=True)
@click.option("--head-lr-scale", type=click.FloatRange(min=0, min_open=True),
              default=_default("head_lr_scale"), show_default=True,
              help="The OOD head's learning rate is --lr times this.")
@click.option("--projection", type=click.Choice(["linear", "mlp"]),
              default=_default("projection"), show_default=True,
              help="D->D map, identity at init: linear, or a residual MLP.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              default=_default("temperature"), show_default=True,
              help="Cosine-logit temperature (also LogitNorm's and CIDER's).")
@click.option("--train-text", is_flag=True, default=_default("train_text"),
              help="Tune the store's class text embeddings (fixed by default).")
@click.option("--id-loss", type=click.Choice(["ce", "logitnorm", "cider", "none"]),
              default=_default("id_loss"), show_default=True,
              help="ID loss; none keeps the projection at identity and trains only the head.")
@click.option("--head", type=click.Choice(["mlp", "rbf"]), default=_default("head"),
              show_default=True, help="OOD head: the paper's ReLU MLP or the distance-shaped "
              "RBF head.")
@click.option("--head-hidden", type=click.IntRange(min=1), default=_default("head_hidden"),
              show_default=True, help="Hidden width of the mlp head.")
@click.option("--rbf-centres", type=click.IntRange(min=1), default=_default("rbf_centres"),
              show_default=True, help="Learnable centres per class of the rbf head.")
@click.option("--detach-head/--no-detach-head", default=_default("detach_head"),
              show_default=True, help="Whether the head's loss stays out of the projection.")
@click.option("--ood-weight", type=click.FloatRange(min=0), default=_default("ood_weight"),
              show_default=True, help="Weight of the outlier loss; 0 disables synthesis.")
@click.option("--start-epoch", type=click.IntRange(min=0), default=_default("start_epoch"),
              show_default=True, help="First epoch (0-based) that synthesizes outliers.")
@click.option("--synth-every", type=click.IntRange(min=1), default=_default("synth_every"),
              show_default=True, help="Synthesize every N steps (in between: reuse).")
@synthesis_options
@click.option("--outliers", help="Outliers store of the same encoder ('npos synthesize'): "
              "train on draws from it instead of online synthesis (no queues). With --id-loss "
              "none FEATURES may be unlabeled: a one-class detector.")
@click.option("--outliers-per-step", type=click.IntRange(min=1), default=None,
              help="Outliers drawn per step with --outliers [default: classes x --pick x "
                   "--keep, as online synthesis; one batch for a one-class store].")
@click.option("--val", help="Labeled store (same encoder and classes): accuracy per epoch, "
                            "and the thresholds of the head's scores at --tpr "
                            "(OUT/thresholds.json, for 'npos score --threshold auto').")
@click.option("--tpr", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              show_default=True, help="ID true-positive rate of the stored thresholds.")
@click.option("--seed", type=click.IntRange(min=0), default=_default("seed"), show_default=True)
@device_option()
@click.option("--amp/--no-amp", default=_default("amp"), show_default=True,
              help="bfloat16 autocast on CUDA; on CPUs with native bfloat16, bfloat16 "
              "inputs (float32 results) for the training step's matrix products.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last "
              "finished epoch (OUT.partial/).")
@click.option("--overwrite", is_flag=True, help="Replace an existing head at --out.")
def command(features: str, out: str, outliers: str | None, outliers_per_step: int | None,
            val: str | None, tpr: float, device: str, resume: bool, overwrite: bool,
            **options) -> None:
    """Train a projection, classifier and OOD head on the labeled store FEATURES.

    Outliers are synthesized online from per-class queues of projected embeddings (the
    synthesis options are those of 'npos synthesize'), or drawn from a pre-synthesized
    --outliers store. Writes OUT/model.safetensors and OUT/config.json.
    """
    from npos.atomic import check_writable
    from npos.train_head import HeadConfig, train_head

    check_writable(out, "head")  # before any work: parents created, a probe written

    synthesis = synthesis_config_from_options(options)
    names = {f.name for f in fields(HeadConfig)}
    config = HeadConfig(**{k: v for k, v in options.items() if k in names},
                        synthesis=synthesis)
    result = train_head(features, out, config, val=val, device=device, resume=resume,
                        overwrite=overwrite, progress=sys.stderr.isatty(),
                        log=get_logger("npos.train_head").info, outliers=outliers,
                        outliers_per_step=outliers_per_step)
    last = result.history[-1]
    click.echo(f"wrote {out}: {config.epochs} epochs, train accuracy {last['accuracy']:.4f}"
               + (f", val accuracy {last['val_accuracy']:.4f}"
                  if last["val_accuracy"] is not None else ""))
    if val is not None:
        from npos.evaluate.calibration import HEAD_THRESHOLDS, calibrate_head

        calibrate_head(out, val, tpr=tpr, device=device)
        click.echo(f"wrote {out}/{HEAD_THRESHOLDS} (thresholds at ID TPR {tpr:g} on {val})")
