"""Forward + backward time of the RBF head's logit against plain autograd on the same
expression, at a training step's shape.

Shape: the sweep's step, 256 ID rows + 600 outliers = 856 rows, 100 classes x 16 centres =
1,600 centres, D = 512 (``--rows``, ``--centres``, ``--dim``). Variants, interleaved
round by round so a noisy box affects all alike (the median per variant is printed):

* ``autograd``  — ``logsumexp(-clamp(‖x‖² + ‖μ‖² - 2 x·μ, 0) / 2w²)`` through autograd
  (the baseline of the ratios);
* ``kernel``    — :func:`npos.train_head.rbf.rbf_logsumexp` without a workspace;
* ``workspace`` — the same with an :class:`~npos.train_head.rbf.RbfWorkspace`, as
  ``RbfHead`` trains.

Each under float32 products and under the CPU's ``--amp`` setting (bfloat16 product inputs,
float32 results; plain float32 where the CPU lacks native bfloat16). The centres and the width
need gradients, the rows do not (``--id-loss none``; ``--grad-x`` to include them). Page
faults per step (``ru_minflt``) show what a fresh (N, M) matrix per step costs.

Usage::

    python -m benchmarks.rbf_head                 # 2-core box: ~1 minute
    python -m benchmarks.rbf_head --threads 1
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from npos.device import cpu_matmul_precision
from npos.train_head.rbf import RbfWorkspace, rbf_logsumexp


def autograd_logit(x: torch.Tensor, centres: torch.Tensor,
                   log_width: torch.Tensor) -> torch.Tensor:
    d2 = (x.pow(2).sum(-1, keepdim=True) + centres.pow(2).sum(-1)
          - 2 * x @ centres.T).clamp_min(0)
    return torch.logsumexp(-d2 / (2 * torch.exp(2 * log_width)), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=856)
    parser.add_argument("--centres", type=int, default=1600)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="steps per variant and round")
    parser.add_argument("--grad-x", action="store_true", help="the rows need gradients too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    normalize = torch.nn.functional.normalize
    x = normalize(torch.randn(args.rows, args.dim, generator=g), dim=-1)
    x.requires_grad_(args.grad_x)
    centres = normalize(torch.randn(args.centres, args.dim, generator=g), dim=-1)
    centres.requires_grad_()
    log_width = torch.tensor(-1.0, requires_grad=True)
    workspace = RbfWorkspace()
    variants = {
        "autograd": lambda: autograd_logit(x, centres, log_width),
        "kernel": lambda: rbf_logsumexp(x, centres, log_width),
        "workspace": lambda: rbf_logsumexp(x, centres, log_width, workspace=workspace),
    }

    def step(fn) -> None:
        x.grad = centres.grad = log_width.grad = None
        fn().sum().backward()

    print(f"machine: {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rows} rows x {args.centres} centres x "
          f"{args.dim}, rows {'with' if args.grad_x else 'without'} gradient")
    for bf16 in (False, True):
        times: dict[str, list[float]] = {k: [] for k in variants}
        faults: dict[str, int] = {k: 0 for k in variants}
        with cpu_matmul_precision(bf16=bf16):
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    for _ in range(3):
                        step(fn)
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step(fn)
                    times[name].append((time.perf_counter() - start) / args.steps)
                    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        base = statistics.median(times["autograd"])
        print(f"products: {'bfloat16 inputs (--amp)' if bf16 else 'float32'}")
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"  {name:10s} {t * 1e3:7.2f} ms/step  {base / t:5.2f}x  "
                  f"{faults[name] / (args.rounds * args.steps):7.0f} page faults/step")


if __name__ == "__main__":
    main()
