"""Epoch time of head training on an ImageNet-100-shaped cache, with and without synthesis.

The cache is generated (:func:`benchmarks.feature_world.make_feature_world`) with the
shape of CLIP ViT-B/16 features of ImageNet-100: 100 classes x ~1260 rows, D=512. Training
runs the real objective and loop (:class:`~npos.train_head.HeadObjective`,
:func:`~npos.train_head.run_epoch`) with the paper's synthesis sizes (Q=1000, K=400,
select=300, pick=3, candidates=1500, keep=2). The per-class queues are filled from the data
before timing (in a real run that happens during the first ~Q/rows-per-class of an epoch),
then ``--steps`` steps are timed and the epoch time is extrapolated to
``ceil(rows / batch)`` steps. Where the time goes is split into the queue push, the
synthesis call and the rest of the step (forward, backward, optimizer, batch gather).

Modes (same data, same model, same steps):

* ``no-synthesis``  — ``--ood-weight 0`` (the baseline of the ratios);
* ``every-step``    — synthesis every step (the paper);
* ``every-10``      — ``--synth-every 10``;
* ``cand-300``      — every step with 300 candidates instead of 1500;
* ``offline-outliers`` — ``train-head --outliers``: no queues, no synthesis; each step draws
  ``classes x pick x keep`` outliers (what online synthesis gives per step) from a
  pre-synthesized set (one engine call over the same banks, made before timing) and passes
  them through the projection.

On a small CPU box, scale down with ``--classes`` (rows per class and the synthesis sizes
stay those of ImageNet-100; epoch time and synthesis cost are both linear in the classes).

Usage::

    python -m benchmarks.train_head                              # full shape
    python -m benchmarks.train_head --classes 10 --steps 5       # 2-core CPU box
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import time

import torch
from torch.nn import functional as F

from benchmarks.feature_world import make_feature_world
from npos.synthesize import SynthesisConfig, synthesize
from npos.train_head import HeadConfig, HeadModel, HeadObjective, run_epoch
from npos.train_head.data import OutlierDraws
from npos.train_head.trainer import make_optimizer

PAPER = SynthesisConfig(k=400, select=300, pick=3, candidates=1500, keep=2)
MODES = {
    "no-synthesis": {"ood_weight": 0.0},
    "every-step": {},
    "every-10": {"synth_every": 10},
    "cand-300": {"synthesis": dataclasses.replace(PAPER, candidates=300)},
    "offline-outliers": {},  # online settings, outliers drawn from a fixed set (time_mode)
}


def offline_outliers(z, y, config: HeadConfig, device: torch.device) -> OutlierDraws:
    """One synthesis call over banks of the first ``queue`` rows per class: the outlier set
    ``offline-outliers`` draws ``classes x pick x keep`` rows from every step."""
    classes = int(y.max()) + 1
    banks = torch.stack([z[torch.nonzero(y == c).squeeze(1)[:config.queue]]
                         for c in range(classes)])
    result = synthesize(banks.to(device), config.synthesis,
                        generator=torch.Generator(device).manual_seed(0))
    per_step = classes * config.synthesis.pick * config.synthesis.keep
    return OutlierDraws(result.outliers, per_step, device)


def time_mode(z, y, text, config: HeadConfig, steps: int, device: torch.device,
              offline: OutlierDraws | None = None) -> dict:
    torch.manual_seed(0)
    model = HeadModel(text, head=config.head)
    if config.head == "rbf":  # on the CPU, as build_head does, then to the device
        model.head.init_from_data(z, y, generator=torch.Generator().manual_seed(0))
    model.to(device)
    means = F.normalize(torch.zeros_like(text).index_add_(0, y, F.normalize(z, dim=1)), dim=1)
    objective = HeadObjective(model, config, cider_prototypes=means, device=device, profile=True,
                              offline_outliers=offline)
    optimizer = make_optimizer(objective.parameter_groups(config.lr), config)
    if objective.queues is not None:
        for c in range(text.shape[0]):  # fill the queues as the first part of an epoch would
            rows = torch.nonzero(y == c).squeeze(1)[:config.queue]
            objective.queues.push(z[rows].to(device), y[rows].to(device))
    order = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(0))
    z_dev, y_dev = z.to(device), y.to(device)

    def batches(count):
        for i in range(count):
            idx = order[i * config.batch_size:(i + 1) * config.batch_size].to(device)
            yield z_dev[idx], y_dev[idx]

    amp = config.amp  # as train_head runs it: bf16 autocast on CUDA, bf16 inputs on the CPU
    run_epoch(objective, batches(2), optimizer, epoch=0, lr_at=lambda s: 1.0, first_step=0,
              amp=amp)
    # Time whole synthesis periods: the window starts on a synthesis step.
    steps = math.ceil(steps / config.synth_every) * config.synth_every
    objective.timings = {"queue": 0.0, "synthesis": 0.0}
    objective.steps = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run_epoch(objective, batches(steps), optimizer, epoch=0, lr_at=lambda s: 1.0, first_step=2,
              amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - started
    per_step = {k: v / steps for k, v in objective.timings.items()}
    per_step["rest"] = total / steps - sum(per_step.values())
    per_step["total"] = total / steps
    return per_step


def measure(*, classes: int = 100, rows_per_class: int = 1260, dim: int = 512,
            batch_size: int = 256, steps: int = 10, modes=tuple(MODES),
            device: torch.device | str = "cpu", synthesis: SynthesisConfig = PAPER,
            queue: int = 1000, repeat: int = 1, log=None) -> dict:
    """Per-step times of each mode on a generated cache; see the module docstring.

    Returns ``{"rows", "steps_per_epoch", "modes": {mode: {"total", "synthesis", "queue",
    "rest", "epoch_s"}}}`` (seconds per step; ``epoch_s`` extrapolated).
    """
    device = torch.device(device)
    world = make_feature_world(n_classes=classes, n_heldout=1, dim=dim, subspace=32,
                               n_train=rows_per_class, n_test=1, seed=0)
    z = torch.from_numpy(world.train)
    y = torch.from_numpy(world.train_labels).long()
    text = torch.from_numpy(world.text_embeddings)
    steps_per_epoch = math.ceil(z.shape[0] / batch_size)
    base = HeadConfig(batch_size=batch_size, queue=queue, synthesis=synthesis)
    out = {"rows": int(z.shape[0]), "dim": dim, "classes": classes, "batch_size": batch_size,
           "steps_per_epoch": steps_per_epoch, "device": str(device), "modes": {}}
    for mode in modes:
        changes = dict(MODES[mode])
        if "synthesis" in changes:
            changes["synthesis"] = dataclasses.replace(synthesis,
                                                       candidates=changes["synthesis"].candidates)
        config = dataclasses.replace(base, **changes)
        offline = offline_outliers(z, y, config, device) if mode == "offline-outliers" else None
        # the fastest of ``repeat`` runs: on a shared box the others measure the neighbours
        r = min((time_mode(z, y, text, config, steps, device, offline) for _ in range(repeat)),
                key=lambda t: t["total"])
        r["epoch_s"] = r["total"] * steps_per_epoch
        out["modes"][mode] = r
        if log is not None:
            log(mode, r)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rows-per-class", type=int, default=1260)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per mode (rounded up to whole --synth-every periods)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each mode this many times and keep the fastest")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps_per_epoch = math.ceil(args.classes * args.rows_per_class / args.batch_size)
    print(f"cache {args.classes * args.rows_per_class} x {args.dim}, {args.classes} classes, "
          f"batch {args.batch_size} ({steps_per_epoch} steps/epoch); device {args.device}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}")

    def log(mode, r):
        print(f"{mode:13s} step {1000 * r['total']:8.1f} ms  "
              f"(synthesis {1000 * r['synthesis']:8.1f}"
              f", queue {1000 * r['queue']:6.2f}, rest {1000 * r['rest']:6.2f})  "
              f"epoch {r['epoch_s']:8.1f} s", flush=True)

    results = measure(classes=args.classes, rows_per_class=args.rows_per_class, dim=args.dim,
                      batch_size=args.batch_size, steps=args.steps, modes=args.modes,
                      device=args.device, repeat=args.repeat, log=log)["modes"]
    if "no-synthesis" in results:
        baseline = results["no-synthesis"]["total"]
        every = results.get("every-step", {}).get("total")
        print("\n| mode | ms/step | synthesis ms | queue ms | rest ms | epoch s "
              "| vs no-synthesis | vs every-step |")
        print("|---|---|---|---|---|---|---|---|")
        for mode, r in results.items():
            print(f"| {mode} | {1000 * r['total']:.1f} | {1000 * r['synthesis']:.1f} | "
                  f"{1000 * r['queue']:.2f} | {1000 * r['rest']:.2f} | "
                  f"{r['epoch_s']:.1f} | {r['total'] / baseline:.2f}x | "
                  + (f"{r['total'] / every:.3f}x |" if every else "- |"))


if __name__ == "__main__":
    main()
