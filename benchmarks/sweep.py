"""Time of ``npos sweep`` on an ImageNet-100-shaped cache, against the per-step online path.

The cache is generated (:func:`benchmarks.feature_world.make_feature_world`): 100 classes x
1260 rows, D=512 (126,000 train rows, CLIP ViT-B/16 on ImageNet-100), a test split and two
OOD sets. The sweep is a 12-point grid (``sigma`` x ``method`` x ``ood-weight``, plus the
ablation row) x 3 seeds with ``--id-loss none``, 5 epochs and offline outliers, at the
default (paper) synthesis sizes, run through the real command. Then the same points are
timed through the per-step online path (the same objective without ``--outliers``: queues
full, synthesis every step) for ``--online-points`` points over ``--online-steps`` steps, and
extrapolated to the grid (per run: seconds per step x steps per epoch x epochs).

Usage::

    python -m benchmarks.sweep                     # full shape (goal: <= 15 min on 2 cores)
    python -m benchmarks.sweep --jobs 1            # one run at a time, all cores each
    python -m benchmarks.sweep --classes 20        # a quick check on a busy box
    python -m benchmarks.sweep --outliers-per-step 256   # one ID batch of outliers per step
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

GRID = "sigma=0.005,0.01,0.03 method=npos,gaussian ood-weight=0.05,0.1"


def make_cache(root: Path, classes: int, rows: int, dim: int) -> dict[str, str]:
    from benchmarks.feature_world import make_feature_world, write_world

    world = make_feature_world(n_classes=classes, n_heldout=max(2, classes // 10), dim=dim,
                               subspace=64, n_train=rows, n_test=50, seed=0)
    return write_world(world, root, chunk_rows=8192)


def run_sweep(urls: dict[str, str], out: Path, *, epochs: int, seeds: int, jobs: int,
              extra: list[str]) -> float:
    from npos.cli import cli

    args = ["sweep", urls["train"], "--val-id", urls["test"],
            "--val-ood", f"held-out={urls['ood/held-out']}",
            "--val-ood", f"off-manifold={urls['ood/off-manifold']}",
            "--grid", GRID, "--id-loss", "none", "--epochs", str(epochs), "--seeds", str(seeds),
            "--jobs", str(jobs), "--device", "cpu", "--out", str(out), *extra]
    start = time.perf_counter()
    cli.main(args, standalone_mode=False)
    return time.perf_counter() - start


def time_online(urls: dict[str, str], out: Path, *, points: int,
                steps: int) -> list[float]:
    """Seconds per step of the same points trained with per-step online synthesis (queues
    full, synthesis on every step: the steady state from the second epoch on), timed over
    ``steps`` steps by :func:`benchmarks.train_head.time_mode` on the sweep's training rows.
    A whole online epoch at the full shape is ~10 minutes on 2 cores, so it is extrapolated."""
    import torch

    from benchmarks.train_head import time_mode
    from npos.store import FeatureStore
    from npos.sweep.run import head_config

    store = FeatureStore.open(urls["train"])
    z = store.read("embeddings", as_torch=True).float()
    y = store.read("labels", as_torch=True).long()
    text = store.read_extra("text_embeddings", as_torch=True).float()
    doc = json.loads((out / "sweep.json").read_text())
    chosen = [p for p in doc["points"] if p["ood_weight"] > 0][:points]
    measured = []
    for p in chosen:
        point = {k: v for k, v in p.items() if k != "point_id"}
        r = time_mode(z, y, text, head_config(point, 0), steps, torch.device("cpu"))
        print(f"  online {p['point_id']}: {r['total']:.2f} s per step "
              f"(synthesis {r['synthesis']:.2f} s)")
        measured.append(r["total"])
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rows", type=int, default=1260, help="train rows per class")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time (npos sweep --jobs; default 2, the goal's 2-core "
                             "setting: one torch thread per run)")
    parser.add_argument("--online-points", type=int, default=1,
                        help="points timed through per-step online synthesis (0: skip)")
    parser.add_argument("--online-steps", type=int, default=5,
                        help="steps timed per online point (extrapolated to the epochs)")
    parser.add_argument("--outliers-per-step", type=int, default=None,
                        help="passed to the sweep (default: train-head's)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the cache and finished sweep in --dir (online part only)")
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    args = parser.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="npos-sweep-bench-"))
    start = time.perf_counter()
    out = root / "sweep"
    if args.reuse:
        urls = {"train": str(root / "cache" / "train.zarr")}
    else:
        urls = make_cache(root / "cache", args.classes, args.rows, args.dim)
        print(f"cache: {args.classes} classes x {args.rows} rows x {args.dim} "
              f"({time.perf_counter() - start:.0f} s to generate)")
        extra = ([] if args.outliers_per_step is None
                 else ["--outliers-per-step", str(args.outliers_per_step)])
        total = run_sweep(urls, out, epochs=args.epochs, seeds=args.seeds, jobs=args.jobs,
                          extra=extra)
    records = [json.loads(p.read_text()) for p in (out / "points").glob("*.json")]
    synth = [r for r in records if r["point"]["ood_weight"] > 0]
    per_run = sum(sum(r["seconds"].values()) for r in synth) / len(synth)
    stages = {k: sum(r["seconds"].get(k, 0.0) for r in synth) / len(synth)
              for k in ("synthesis", "training", "evaluation")}
    n_points = len({r["point_id"] for r in records})
    if args.reuse:  # the runs' own seconds (without process start and the baselines)
        total = sum(sum(r["seconds"].values()) for r in records)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jobs {args.jobs}")
    print(f"sweep: {n_points} points (12 + ablation) x {args.seeds} seeds, {args.epochs} epochs,"
          f" offline outliers: {total:.0f} s total ({total / 60:.1f} min), "
          f"{total / n_points:.1f} s per point")
    print("per synthesis run (one seed): " + ", ".join(f"{k} {v:.2f} s"
                                                       for k, v in stages.items())
          + f" = {per_run:.2f} s")
    if args.online_points <= 0:
        return
    online = time_online(urls, out, points=args.online_points, steps=args.online_steps)
    steps_per_epoch = math.ceil(args.classes * args.rows / 256)
    online_run = sum(online) / len(online) * steps_per_epoch * args.epochs + stages["evaluation"]
    # Both per run, as one job spends it; the grid at the sweep's --jobs, granting the online
    # path the same parallel speed-up as the offline sweep measured here.
    grid_online = total * online_run / per_run
    print(f"online per-step synthesis: {sum(online) / len(online):.2f} s per step (measured on "
          f"{len(online)} point(s), {args.online_steps} steps each) -> {online_run:.0f} s per "
          f"run vs {per_run:.1f} s offline: {online_run / per_run:.0f}x (every step of every "
          f"epoch synthesizing: the first epoch, which fills the queues, is cheaper); the "
          f"grid at --jobs {args.jobs}, extrapolated: {grid_online:.0f} s "
          f"({grid_online / 60:.1f} min)")


if __name__ == "__main__":
    main()
