"""`npos sweep`: a grid of synthesis and head settings, trained and evaluated from the cache."""

from __future__ import annotations

import copy
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from npos.commands import train_head
from npos.errors import OutputExistsError, ParameterError
from npos.log import get_logger

#: train-head options the sweep does not take (it sets them per task, or has its own).
_OWN = ("out", "outliers", "val", "tpr", "resume", "overwrite", "config")


class GridType(click.ParamType):
    """``--grid`` text, or a ``[sweep.grid]`` table from ``--config`` (kept as a mapping)."""

    name = "grid"
    accepts_table = True  # npos.config_file: a TOML table is a valid value

    def convert(self, value: Any, param, ctx) -> Any:
        if isinstance(value, (str, Mapping)):
            return value
        self.fail(f"expected KEY=V1,V2 ... text or a table; got {value!r}", param, ctx)


def _train_head_options(func):
    """Every train-head option (same names, types, defaults) as a fixed setting."""
    for param in reversed(train_head.command.params):
        if isinstance(param, click.Option) and param.name not in _OWN:
            func.__click_params__ = [*getattr(func, "__click_params__", []), copy.copy(param)]
    return func


@click.command("sweep")
@click.argument("features")
@click.option("--grid", "grid_spec", type=GridType(), required=True,
              help='Values per train-head option: "sigma=0.005,0.01 k=50,200 '
                   'method=npos,gaussian ood-weight=0,0.1" (or [sweep.grid] in --config).')
@click.option("--out", required=True, help="Sweep folder (results, report, plots, points/).")
@click.option("--val-id", help="Labeled ID test store (same encoder and classes).")
@click.option("--val-ood", multiple=True, metavar="NAME=STORE",
              help="OOD store (repeatable); with --val-id.")
@click.option("--holdout-classes", type=click.IntRange(min=1),
              help="Instead of --val-id/--val-ood: hold out N seeded classes of FEATURES as "
                   "near-OOD (a proxy) and 20% of the others' rows as ID test.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per point (seeds --seed, --seed + 1, ...): mean ± std.")
@click.option("--scores", default="head", show_default=True,
              help="Detectors of each point's head (comma-separated).")
@click.option("--baselines", default="knn,mcm", show_default=True,
              help="Frozen-embedding detectors evaluated once (mcm only with text "
                   "embeddings); empty for none.")
@click.option("--sort-by", default="head/average/auroc", show_default=True,
              help="Table order: SCORE/SET/METRIC (METRIC auroc or fpr95) or id_accuracy.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Points in parallel processes (torch threads per job: cores // jobs).")
@click.option("--max-points", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--resume", is_flag=True, help="Continue in an existing --out, skipping "
              "finished points.")
@click.option("--overwrite", is_flag=True, help="Delete an existing sweep at --out first.")
@_train_head_options
def command(features: str, grid_spec, out: str, val_id: str | None, val_ood: tuple[str, ...],
            holdout_classes: int | None, seeds: int, scores: str, baselines: str,
            sort_by: str, jobs: int, max_points: int, resume: bool, overwrite: bool,
            **options) -> None:
    """Train and evaluate a head for every point of --grid (x --seeds) on FEATURES.

    With --id-loss none the embedding space is frozen: outliers are synthesized offline per
    point (then 'train-head --outliers'); otherwise online, inside training. Writes
    OUT/results.csv, results.json, report.md, plots/ and boundary.png.
    """
    from npos.sweep import grid as grid_mod
    from npos.sweep import run

    device = options.pop("device")
    base_seed = options.pop("seed")
    grid = grid_mod.build_grid(grid_spec, train_head.command, options, max_points=max_points)
    for point in grid.points:  # every point valid before any work (k < queue, ...)
        run.head_config(point, base_seed).validate()
    _check_scores(scores, baselines, sort_by)
    split = _split(features, val_id, val_ood, holdout_classes, base_seed, out, resume,
                   overwrite)
    plan = run.SweepPlan(split, grid.points, run.seeds_of(base_seed, seeds), Path(out),
                         scores=scores, baselines=baselines, device=device, jobs=jobs,
                         swept=grid.swept)
    log = get_logger("npos.sweep").info
    run.write_json(Path(out) / "sweep.json", run.describe(plan))
    log(f"{len(grid.points)} points x {seeds} seeds = {len(plan.tasks())} runs")
    records, base = run.run_sweep(plan, progress=sys.stderr.isatty(), log=log)
    rows = run.write_outputs(plan, records, base, sort_by=sort_by)
    from npos.sweep.report import verdict

    click.echo(f"wrote {out}/report.md ({len(rows)} rows)")
    click.echo(verdict(rows, sort_by))


def _check_scores(scores: str, baselines: str, sort_by: str) -> None:
    """Detector names (the registry's) and --sort-by, before any training."""
    from npos.evaluate.detectors import parse_scores

    parse_scores(scores)
    if baselines.strip():
        if "head" in parse_scores(baselines):
            raise ParameterError("--baselines score the frozen embeddings: 'head' needs a "
                                 "trained head (it is in --scores)")
    if sort_by == "id_accuracy":
        return
    parts = sort_by.split("/")
    names = [s.strip() for s in f"{scores},{baselines}".split(",") if s.strip()]
    if len(parts) != 3 or parts[2] not in ("auroc", "fpr95") or parts[0] not in names:
        raise ParameterError(f"--sort-by {sort_by!r}: expected SCORE/SET/auroc|fpr95 with "
                             f"SCORE one of {', '.join(names)} (or id_accuracy)")


def _split(features, val_id, val_ood, holdout, seed, out, resume, overwrite):
    """The data (held-out split written into OUT when asked) after the OUT checks."""
    from npos.evaluate.evaluation import parse_ood_specs
    from npos.store import FeatureStore
    from npos.sweep.holdout import Split, check_holdout, holdout_split

    if holdout is not None and (val_id or val_ood):
        raise ParameterError("--holdout-classes replaces --val-id/--val-ood; give one or the "
                             "other")
    if holdout is None and not (val_id and val_ood):
        raise ParameterError("give --val-id STORE and --val-ood NAME=STORE, or "
                             "--holdout-classes N")
    ood = parse_ood_specs(val_ood) if holdout is None else {}
    if holdout is not None:
        check_holdout(FeatureStore.open(features), holdout)
    path = Path(out)
    if path.exists() and not resume:
        if not overwrite:
            raise OutputExistsError(f"sweep folder {out!r} already exists; pass --resume to "
                                    "continue it or --overwrite to start over")
        if not (path / "sweep.json").exists():
            raise ParameterError(f"--overwrite: {out!r} is not a sweep folder (no sweep.json); "
                                 "not deleting it")
        shutil.rmtree(path)
    if holdout is not None:
        return holdout_split(features, holdout, seed=seed, out_dir=out)
    return Split(features, val_id, ood)
