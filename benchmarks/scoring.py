"""Benchmark of batch scoring and of the knn score's search backends.

Two measurements, each against a baseline measured in the same run:

1. ``npos score`` throughput (rows/s) on a generated store (float16 embeddings, class text
   embeddings), through :func:`npos.evaluate.score_store` exactly as the CLI calls it: the
   zero-shot ``mcm`` score, and the head's scores (``head,mcm``) when a trained head is
   available (``npos.train_head``); baseline: streaming the same store without scoring.
2. ``knn`` on a bank of >= 200k rows: IVF (``faiss-ivf``, nprobe tuned for recall 0.95)
   against exact search (``faiss-flat`` and ``torch``): search time, speedup, recall@K of the
   returned neighbour ids against exact search over all queries, and the largest change of
   the knn score. Goal: IVF >= 5x exact at recall >= 0.95.

The data are generated, not real embeddings: unit vectors drawn around ``--clusters`` random
centres (cosine to the centre ~0.8, like CLIP image embeddings of one class), queries drawn
from the same mixture. IVF recall depends on this structure; report it with the numbers.

Usage: ``python benchmarks/scoring.py [--rows 200000] [--bank 200000] [--queries 5000]``
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def clustered(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator,
              spread: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit-ish vectors around random rows of ``centres`` (float32) and their centre."""
    which = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return (centres[which] + noise).astype(np.float32), which


def bench_score(args, rng: np.random.Generator, workdir: Path) -> None:
    from npos.evaluate import score_store
    from npos.store import FeatureStore

    dim, n = args.dim, args.rows
    centres = rng.standard_normal((args.classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    url = str(workdir / "store.zarr")
    store = FeatureStore.create(url, n_rows=n, dim=dim, dtype="float16", chunk_rows=4096,
                                class_names=[f"c{i}" for i in range(args.classes)],
                                attrs={"model": "bench", "pretrained": None,
                                       "preprocess": None})
    for index in range(store.n_chunks):
        rows = store.chunk_slice(index)
        m = rows.stop - rows.start
        z, y = clustered(m, dim, centres, rng)
        ids = np.array([f"img/{i:08d}.jpg" for i in range(rows.start, rows.stop)])
        store.write_chunk(index, embeddings=z, labels=y, ids=ids)
    store.set_array("text_embeddings", centres)

    t = time.perf_counter()
    for _ in store.iter_batches(args.batch_size, dtype="float32"):
        pass
    read_s = time.perf_counter() - t
    print(f"\n## npos score: {n} rows x {dim} (float16 store, {args.classes} classes)")
    print("| run | seconds | rows/s | vs read |\n|---|---:|---:|---:|")
    print(f"| read only (baseline) | {read_s:.2f} | {n / read_s:,.0f} | 1.00 |")

    runs = [("mcm (zero-shot)", dict(scores="mcm"), ".zarr"),
            ("mcm (zero-shot)", dict(scores="mcm"), ".csv")]
    head_dir = make_head(store, workdir, args)
    if head_dir is not None:
        runs += [("head,mcm (trained head)", dict(scores="head,mcm", head=head_dir), ".zarr"),
                 ("head,mcm (trained head)", dict(scores="head,mcm", head=head_dir), ".csv")]
    for i, (name, kw, suffix) in enumerate(runs):
        summary = score_store(store, workdir / f"out{i}{suffix}", device=args.device,
                              batch_size=args.batch_size, **kw)
        print(f"| {name} -> {suffix} | {summary.seconds:.2f} | {summary.rows_per_s:,.0f} | "
              f"{read_s / summary.seconds:.2f} |")
    if head_dir is None:
        print("\n(no trained head available: npos.train_head is missing; head runs skipped)")


def make_head(store, workdir: Path, args):
    """A real head checkpoint trained briefly on the store (scoring cost does not depend on
    how well it was trained), or None without npos.train_head."""
    try:
        from npos.train_head import HeadConfig, train_head
    except ImportError:
        return None
    head_dir = workdir / "head"
    train_head(store.url, str(head_dir),
               HeadConfig(epochs=1, batch_size=4096, ood_weight=0.0, seed=0),
               device=args.device)
    return str(head_dir)


def bench_knn(args, rng: np.random.Generator) -> None:
    import torch

    from npos.knn import KnnIndex

    dim, k = args.dim, args.k
    centres = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bank, _ = clustered(args.bank, dim, centres, rng)
    queries, _ = clustered(args.queries, dim, centres, rng)
    print(f"\n## knn score: bank {args.bank} x {dim}, {args.queries} queries, K = {k}, "
          f"{args.clusters} generated clusters; torch threads {torch.get_num_threads()}")
    results = {}
    for backend in ("faiss-flat", "torch", "faiss-ivf"):
        t = time.perf_counter()
        index = KnnIndex(backend, device=args.device).fit(bank)
        fit_s = time.perf_counter() - t
        if backend == "faiss-ivf":  # nprobe tuning happens on the first search for this k
            t = time.perf_counter()
            index.search(queries[:1], k)
            fit_s += time.perf_counter() - t
        t = time.perf_counter()
        dist, ids = index.search(queries, k)
        search_s = time.perf_counter() - t
        results[backend] = (fit_s, search_s, dist, ids, index)
    exact_dist, exact_ids = results["faiss-flat"][2], results["faiss-flat"][3]
    base = results["faiss-flat"][1]
    print("| backend | build s | search s | queries/s | speedup vs faiss-flat | recall@K | "
          "max abs score change |\n|---|---:|---:|---:|---:|---:|---:|")
    for backend, (fit_s, search_s, dist, ids, index) in results.items():
        hits = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, exact_ids)])
        change = float(np.max(np.abs(dist[:, k - 1] - exact_dist[:, k - 1])))
        extra = (f" (nlist {index.nlist_}, nprobe {index.nprobe_[k]})"
                 if backend == "faiss-ivf" else "")
        print(f"| {backend}{extra} | {fit_s:.2f} | {search_s:.2f} | "
              f"{args.queries / search_s:,.0f} | {base / search_s:.2f} | {hits:.4f} | "
              f"{change:.2e} |")
    # The tuned nprobe aims at recall 0.95 on bank points; held-out queries can sit lower,
    # so also sweep nprobe on the same (already trained) IVF index.
    ivf = results["faiss-ivf"][4]
    print("\nIVF nprobe sweep (same index):\n| nprobe | search s | speedup vs faiss-flat | "
          "recall@K | max abs score change |\n|---:|---:|---:|---:|---:|")
    nprobe = 1
    while nprobe <= min(ivf.nlist_, 256):
        ivf.nprobe = nprobe
        ivf.nprobe_.clear()
        t = time.perf_counter()
        dist, ids = ivf.search(queries, k)
        search_s = time.perf_counter() - t
        hits = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, exact_ids)])
        change = float(np.max(np.abs(dist[:, k - 1] - exact_dist[:, k - 1])))
        print(f"| {nprobe} | {search_s:.2f} | {base / search_s:.2f} | {hits:.4f} | "
              f"{change:.2e} |")
        nprobe *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the scored store")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--bank", type=int, default=200_000, help="knn bank rows")
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", choices=["score", "knn"], action="append", default=[])
    args = parser.parse_args()
    print(f"# scoring benchmark — {platform.node()}, {platform.processor() or platform.machine()}"
          f", {time.strftime('%Y-%m-%d')}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if "score" not in args.skip:
            bench_score(args, rng, Path(tmp))
    if "knn" not in args.skip:
        bench_knn(args, rng)


if __name__ == "__main__":
    main()
