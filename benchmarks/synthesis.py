"""Benchmark: one NPOS synthesis step, batched engine vs the research code's per-class loop.

Shapes (the paper's): ``in100`` C=100, Q=1000, D=512, K=400, select=300, pick=3,
candidates=1500, keep=2; ``in1k`` the same with C=1000, pick=1. ``--classes N`` scales C down
for a CPU run.

Measured in the same run, on the same banks:

* ``engine``: :func:`npos.synthesize.synthesize` (backend ``torch``), seeded.
* ``loop``: the research code's structure — a Python loop over classes that builds a faiss
  ``IndexFlatL2`` on each class bank, searches the bank, picks boundary points, searches the
  candidates and resets the index. It draws the same noise in the same order as the engine
  (independent per class, unlike the research code), so both do the same work and the
  script checks that they agree.
* ``floor``: bare ``torch.bmm`` calls with the engine's chunk shapes and FLOPs (bank Gram
  matrices + candidate-bank products): what the products alone cost.

Prints the times (best of ``--repeat``), the ratios loop/engine and engine/floor, and the
peak working memory of each (CPU: the process's resident-set high-water mark above what it
held before, via /proc; CUDA: ``torch.cuda.max_memory_allocated``). ``--primitives`` also
times the k-th-value candidates on one (classes, rows, Q) similarity block.

    python -m benchmarks.synthesis --shape in100 --classes 20
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from npos.knn.kth import DEFAULT_MEMORY_BUDGET, kth_largest_
from npos.synthesize import SynthesisConfig, synthesize
from npos.synthesize.engine import _chunk_size, draw_noise, draw_positions

SHAPES = {
    "in100": dict(classes=100, queue=1000, dim=512, k=400, select=300, pick=3,
                  candidates=1500, keep=2),
    "in1k": dict(classes=1000, queue=1000, dim=512, k=400, select=300, pick=1,
                 candidates=1500, keep=2),
}


# ---------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above the level at entry (bytes) for a block of code."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _reset_rss_peak()
            self._base = _rss("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self.peak = _rss("VmHWM") - self._base


def _precise_rss() -> None:
    """Send every allocation of 1 MiB or more to mmap, so freed buffers leave the resident
    set at once and the RSS peak measures live memory (glibc otherwise raises its mmap
    threshold up to 32 MiB and keeps freed blocks in the heap)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere peaks are cumulative.
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss(field: str) -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, device, repeat):
    """Run the functions round-robin ``repeat`` times (so that a machine shared with other
    work loads them alike); per name: (best seconds, peak bytes of that run, last result)."""
    out = {name: (math.inf, 0, None) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            with PeakMemory(device) as mem:
                _sync(device)
                start = time.perf_counter()
                result = fn()
                _sync(device)
                elapsed = time.perf_counter() - start
            best, peak, _ = out[name]
            out[name] = (elapsed, mem.peak, result) if elapsed < best else (best, peak, result)
    return out


# ---------------------------------------------------------------------------- baselines
def research_loop(banks: torch.Tensor, cfg: SynthesisConfig, seed: int, *, gpu: bool = False):
    """Per-class loop with a faiss flat index rebuilt per class (the reference structure);
    ``gpu``: a faiss ``GpuIndexFlatL2`` (needs a faiss GPU build), as the research code ran."""
    import faiss

    n_classes, _, dim = banks.shape
    g = torch.Generator().manual_seed(seed)
    picks = draw_positions(n_classes, cfg.select, cfg.pick, g)
    sigma = cfg.resolved_sigma
    index = (faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), dim) if gpu
             else faiss.IndexFlatL2(dim))
    outliers, distances = [], []
    for c in range(n_classes):
        bank = banks[c]
        unit = F.normalize(bank, dim=-1)
        index.add(unit.numpy())
        d2, _ = index.search(unit.numpy(), cfg.k + 1)  # +1: the point itself comes first
        kth = np.sqrt(np.maximum(d2[:, -1], 0))
        boundary = np.argsort(-kth, kind="stable")[:cfg.select]
        noise = draw_noise(1, (cfg.pick, cfg.candidates, dim), g, torch.device("cpu"))[0]
        for j in range(cfg.pick):
            b = bank[int(boundary[picks[c, j]])]
            cand = b.norm() * F.normalize(b / b.norm() + sigma * noise[j], dim=-1)
            d2c, _ = index.search(F.normalize(cand, dim=-1).numpy(), cfg.k)
            kth_c = torch.from_numpy(np.sqrt(np.maximum(d2c[:, -1], 0)))
            top = kth_c.topk(cfg.keep).indices
            outliers.append(cand[top])
            distances.append(kth_c[top])
        index.reset()
    return torch.cat(outliers), torch.cat(distances)


def floor_products(banks: torch.Tensor, cfg: SynthesisConfig, budget: int):
    """The engine's matrix products alone, with its chunk shapes."""
    n_classes, q, dim = banks.shape
    pm = cfg.pick * cfg.candidates
    chunk, _ = _chunk_size(n_classes, q * dim + pm * dim + q, max(q * q, pm * q), budget // 4)
    a = torch.randn((chunk, q, dim), device=banks.device)
    b = torch.randn((chunk, pm, dim), device=banks.device)
    for start in range(0, n_classes, chunk):
        c = min(chunk, n_classes - start)
        torch.bmm(a[:c], a[:c].transpose(1, 2))
        torch.bmm(b[:c], a[:c].transpose(1, 2))
    return 2 * n_classes * (q * q + pm * q) * dim


def primitives(cfg: SynthesisConfig, queue: int, device: torch.device, rows: int = 4500,
               classes: int = 8) -> dict[str, float]:
    """Time k-th-value selection candidates on one (classes, rows, Q) similarity block."""
    g = torch.Generator(device).manual_seed(0)
    sims = torch.rand((classes, rows, queue), generator=g, device=device) * 2 - 1
    k, n = cfg.k, queue
    options = {
        "torch.topk(k, sorted=False).min": lambda s: s.topk(k, dim=-1, sorted=False)
        .values.amin(-1),
        "torch.kthvalue": lambda s: s.kthvalue(n - k + 1, dim=-1).values,
        "torch.sort": lambda s: s.sort(dim=-1).values[..., n - k],
        "bf16 torch.kthvalue": lambda s: s.bfloat16().kthvalue(n - k + 1, dim=-1).values,
    }
    if device.type == "cpu":
        options["numpy partition, 1 thread"] = lambda s: torch.from_numpy(
            np.partition(s.numpy(), n - k, axis=-1)[..., n - k])
        options["kth_largest_ (npos: threaded in-place partition)"] = \
            lambda s: kth_largest_(s, k)
    reference = sims.sort(dim=-1).values[..., n - k]
    times = {}
    for name, fn in options.items():
        best = math.inf
        for _ in range(3):
            work = sims.clone()
            _sync(device)
            start = time.perf_counter()
            value = fn(work)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        exact = torch.equal(value.float(), reference)
        times[name] = (best, exact)
    a = torch.randn((classes, rows, 512), device=device)
    b = torch.randn((classes, queue, 512), device=device)
    best = math.inf
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        torch.bmm(a, b.transpose(1, 2))
        _sync(device)
        best = min(best, time.perf_counter() - start)
    times["(the bmm that makes the block, D=512)"] = (best, True)
    return times


# ---------------------------------------------------------------------------- main
def shape_config(shape: dict) -> SynthesisConfig:
    """The synthesis settings of a shape dict (see :data:`SHAPES`)."""
    return SynthesisConfig(k=shape["k"], select=shape["select"], pick=shape["pick"],
                           candidates=shape["candidates"], keep=shape["keep"], backend="torch")


def make_banks(shape: dict, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(classes, queue, dim) banks: Gaussian blobs around random class offsets, norms ~10."""
    g = torch.Generator(device).manual_seed(seed)
    c, q, d = shape["classes"], shape["queue"], shape["dim"]
    banks = torch.randn((c, q, d), generator=g, device=device)
    banks = banks + 2 * torch.randn((c, 1, d), generator=g, device=device)
    return banks * (10 / banks.norm(dim=-1, keepdim=True).mean())  # CLIP-like norms ~10


def measure_shape(shape: dict, device: torch.device, *, repeat: int = 2, loop: str | None =
                  "faiss-cpu", loop_repeat: int = 1, loop_classes: int | None = None,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict:
    """Time the engine, the bare-product floor and (``loop``: ``"faiss-cpu"``,
    ``"faiss-gpu"`` or None) the per-class faiss loop on the same banks.

    Returns a dict of seconds, peak bytes, GFLOP, the ratios ``engine_over_floor`` and
    ``loop_over_engine``, and the engine/loop agreement. ``loop_classes`` times the loop on
    the first that many classes only and scales its time to all classes (the loop's cost is
    the same for every class; ``loop_extrapolated`` says so in the result).
    """
    cfg = shape_config(shape)
    banks = make_banks(shape, device)

    def engine():
        return synthesize(banks, cfg, generator=torch.Generator(device).manual_seed(1),
                          memory_budget=memory_budget)

    runs = timed({"engine": engine,
                  "floor": lambda: floor_products(banks, cfg, memory_budget)}, device, repeat)
    (t_engine, m_engine, res), (t_floor, m_floor, flops) = runs["engine"], runs["floor"]
    out = {"shape": dict(shape), "device": str(device), "engine_s": t_engine,
           "engine_peak_bytes": m_engine, "floor_s": t_floor, "floor_peak_bytes": m_floor,
           "gflop": flops / 1e9, "engine_over_floor": t_engine / t_floor, "loop": loop}
    if loop is None:
        return out
    n_loop = min(loop_classes or len(banks), len(banks))
    cpu_banks = banks[:n_loop].cpu()
    t_loop, m_loop, (loop_out, loop_d) = timed(
        {"loop": lambda: research_loop(cpu_banks, cfg, 1, gpu=loop == "faiss-gpu")},
        torch.device("cpu"), loop_repeat)["loop"]
    t_loop *= len(banks) / n_loop
    first = (res.labels < n_loop).cpu()
    close = torch.isclose(res.knn_distance.cpu()[first], loop_d.float(), atol=1e-4).float().mean()
    same = torch.isclose(res.outliers.cpu()[first], loop_out, atol=1e-3).all(dim=1).float().mean()
    out.update(loop_classes=n_loop, loop_extrapolated=n_loop < len(banks), loop_s=t_loop,
               loop_peak_bytes=m_loop, loop_over_engine=t_loop / t_engine,
               same_outliers=float(same), same_distances=float(close),
               median_distance_engine=float(res.knn_distance.median()),
               median_distance_loop=float(loop_d.median()))
    return out


def run_shape(name: str, args, device: torch.device) -> None:
    shape = dict(SHAPES[name])
    shape["classes"] = args.classes or shape["classes"]
    cfg = shape_config(shape)
    print(f"\n== {name}: C={shape['classes']} Q={shape['queue']} D={shape['dim']} K={cfg.k} "
          f"select={cfg.select} pick={cfg.pick} candidates={cfg.candidates} keep={cfg.keep}")
    r = measure_shape(shape, device, repeat=args.repeat, loop=None if args.no_loop else
                      "faiss-cpu", loop_repeat=args.loop_repeat,
                      memory_budget=args.memory_budget)
    flops = r["gflop"] * 1e9
    print(f"engine : {r['engine_s']:8.2f} s   peak {r['engine_peak_bytes'] / 2**20:7.0f} MiB   "
          f"({flops / r['engine_s'] / 1e9:.0f} GFLOP/s effective)")
    print(f"floor  : {r['floor_s']:8.2f} s   peak {r['floor_peak_bytes'] / 2**20:7.0f} MiB   "
          f"({r['gflop']:.0f} GFLOP of products, {flops / r['floor_s'] / 1e9:.0f} GFLOP/s)")
    print(f"engine / floor = {r['engine_over_floor']:.2f}  (goal <= 2)")
    if args.no_loop:
        return
    print(f"loop   : {r['loop_s']:8.2f} s   peak {r['loop_peak_bytes'] / 2**20:7.0f} MiB")
    goal = 20 if device.type == "cuda" else 2
    print(f"loop / engine = {r['loop_over_engine']:.2f}  (goal >= {goal})")
    # Exact ties (or 1e-6 differences between faiss and torch distances) among the bank's
    # K-th-NN distances can reorder the boundary list and so change which points are picked:
    # expect a few percent of outliers to differ, with the same distribution.
    print(f"check  : engine and loop agree on {100 * r['same_outliers']:.2f}% of outliers, "
          f"{100 * r['same_distances']:.2f}% of distances; median outlier K-th-NN distance "
          f"{r['median_distance_engine']:.4f} (engine) vs {r['median_distance_loop']:.4f} "
          f"(loop)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--classes", type=int, default=None,
                        help="Scale the number of classes C down (e.g. for a CPU run).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=2, help="Engine/floor repeats (best).")
    parser.add_argument("--loop-repeat", type=int, default=1, help="Loop repeats (best).")
    parser.add_argument("--memory-budget", type=int, default=DEFAULT_MEMORY_BUDGET,
                        help="Engine working-memory budget in bytes.")
    parser.add_argument("--no-loop", action="store_true", help="Skip the per-class loop.")
    parser.add_argument("--primitives", action="store_true",
                        help="Also time k-th-value primitives on one similarity block.")
    args = parser.parse_args()
    device = torch.device(args.device)
    _precise_rss()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if args.primitives:
        shape = SHAPES["in100"]
        cfg = SynthesisConfig(k=shape["k"])
        print(f"\n== k-th value of (8, 4500, {shape['queue']}) similarities, K={cfg.k}")
        for name, (seconds, exact) in primitives(cfg, shape["queue"], device).items():
            print(f"{name:<50} {seconds * 1e3:8.1f} ms   {'exact' if exact else 'DIFFERS'}")
    for name in (SHAPES if args.shape == "both" else [args.shape]):
        run_shape(name, args, device)


if __name__ == "__main__":
    main()
