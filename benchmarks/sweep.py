"""Time of ``npos sweep`` on an ImageNet-100-shaped cache, against the per-step online path.

The cache is generated (:func:`benchmarks.feature_world.make_feature_world`): 100 classes x
1260 rows, D=512 (126,000 train rows, CLIP ViT-B/16 on ImageNet-100), a test split and two
OOD sets. The sweep is a 12-point grid (``sigma`` x ``method`` x ``ood-weight``, plus the
ablation row) x 3 seeds with ``--id-loss none``, 5 epochs and offline outliers, at the
default (paper) synthesis sizes, run through the real command. Then the same points are
timed through the per-step online path (``train_head`` without ``--outliers``: synthesis on
the queues every step) for ``--online-points`` points and ``--online-epochs`` epochs, and
extrapolated to the grid (per point: epoch time x epochs x seeds).

Usage::

    python -m benchmarks.sweep                     # full shape (goal: <= 15 min on 2 cores)
    python -m benchmarks.sweep --classes 20        # a quick check on a busy box
"""

from __future__ import annotations

import argparse
import json
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


def run_sweep(urls: dict[str, str], out: Path, *, epochs: int, seeds: int, jobs: int) -> float:
    from npos.cli import cli

    args = ["sweep", urls["train"], "--val-id", urls["test"],
            "--val-ood", f"held-out={urls['ood/held-out']}",
            "--val-ood", f"off-manifold={urls['ood/off-manifold']}",
            "--grid", GRID, "--id-loss", "none", "--epochs", str(epochs), "--seeds", str(seeds),
            "--jobs", str(jobs), "--device", "cpu", "--out", str(out)]
    start = time.perf_counter()
    cli.main(args, standalone_mode=False)
    return time.perf_counter() - start


def time_online(urls: dict[str, str], out: Path, *, points: int,
                epochs: int) -> list[tuple[float, float]]:
    """``(first epoch s, last epoch s)`` of the same points trained with per-step online
    synthesis. The first epoch fills the queues (synthesis starts once every class has
    ``queue`` rows, late in the epoch); from the second on every step synthesizes."""
    from npos.sweep.run import head_config, point_id
    from npos.train_head import train_head

    doc = json.loads((out / "sweep.json").read_text())
    chosen = [p for p in doc["points"] if p["ood_weight"] > 0][:points]
    measured = []
    for p in chosen:
        point = {k: v for k, v in p.items() if k != "point_id"}
        config = head_config({**point, "epochs": epochs}, 0)
        result = train_head(urls["train"], str(out / "online" / point_id(point)), config,
                            device="cpu", overwrite=True)
        first, last = result.history[0], result.history[-1]
        print(f"  online {point_id(point)}: epoch seconds "
              + ", ".join(f"{h['seconds']:.1f} ({h['synth_steps']} synthesis steps)"
                          for h in result.history))
        measured.append((first["seconds"], last["seconds"]))
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rows", type=int, default=1260, help="train rows per class")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--online-points", type=int, default=1)
    parser.add_argument("--online-epochs", type=int, default=2,
                        help="2+: the last epoch synthesizes every step (the steady state)")
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
        total = run_sweep(urls, out, epochs=args.epochs, seeds=args.seeds, jobs=args.jobs)
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
    online = time_online(urls, out, points=args.online_points, epochs=args.online_epochs)
    first = sum(f for f, _ in online) / len(online)
    steady = sum(last for _, last in online) / len(online)
    online_run = first + steady * (args.epochs - 1) + stages["evaluation"]
    grid_online = online_run * len(synth) + (total - per_run * len(synth))
    print(f"online per-step synthesis: first epoch {first:.1f} s (queues filling), then "
          f"{steady:.1f} s per epoch (measured on {len(online)} point(s)) -> {online_run:.1f} s "
          f"per run vs {per_run:.1f} s offline; grid extrapolated {grid_online:.0f} s "
          f"({grid_online / 60:.1f} min): offline is {grid_online / total:.1f}x faster")

if __name__ == "__main__":
    main()
