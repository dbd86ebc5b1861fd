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

Usage: ``python -m benchmarks.scoring [--rows 200000] [--bank 200000] [--queries 5000]``
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


def make_score_store(url: str, rows: int, dim: int, classes: int, rng: np.random.Generator):
    """A float16 store of clustered rows around ``classes`` text embeddings (4096-row chunks)."""
    from npos.store import FeatureStore

    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    store = FeatureStore.create(url, n_rows=rows, dim=dim, dtype="float16", chunk_rows=4096,
                                class_names=[f"c{i}" for i in range(classes)],
                                attrs={"model": "bench", "pretrained": None,
                                       "preprocess": None})
    for index in range(store.n_chunks):
        part = store.chunk_slice(index)
        z, y = clustered(part.stop - part.start, dim, centres, rng)
        ids = np.array([f"img/{i:08d}.jpg" for i in range(part.start, part.stop)])
        store.write_chunk(index, embeddings=z, labels=y, ids=ids)
    store.set_array("text_embeddings", centres)
    return store


def measure_score(*, rows: int, dim: int, classes: int, batch_size: int, device: str,
                  rng: np.random.Generator, workdir: Path, runs=None) -> dict:
    """``score_store`` rows/s of each run against streaming the store without scoring.

    ``runs``: ``[(name, score_store keyword arguments, suffix)]``; a ``head=True`` argument
    is replaced by a head trained briefly on the store (skipped without npos.train_head),
    ``train=True`` by the store itself. Default: mcm, and head,mcm, to .zarr and .csv.
    """
    from npos.evaluate import score_store

    store = make_score_store(str(workdir / "store.zarr"), rows, dim, classes, rng)
    t = time.perf_counter()
    for _ in store.iter_batches(batch_size, dtype="float32"):
        pass
    read_s = time.perf_counter() - t
    if runs is None:
        runs = [(f"{name} -> {suffix}", kw, suffix)
                for name, kw in (("mcm (zero-shot)", dict(scores="mcm")),
                                 ("head,mcm (trained head)", dict(scores="head,mcm", head=True)))
                for suffix in (".zarr", ".csv")]
    needs_head = any(kw.get("head") is True for _, kw, _ in runs)
    head_dir = make_head(store, workdir, device) if needs_head else None
    out = {"rows": rows, "dim": dim, "classes": classes, "read_s": read_s,
           "read_rows_per_s": rows / read_s, "head": head_dir is not None, "runs": {}}
    for i, (name, kw, suffix) in enumerate(runs):
        kw = dict(kw)
        if kw.get("head") is True:
            if head_dir is None:
                continue
            kw["head"] = head_dir
        if kw.get("train") is True:
            kw["train"] = store.url
        summary = score_store(store, workdir / f"out{i}{suffix}", device=device,
                              batch_size=batch_size, **kw)
        out["runs"][name] = {"seconds": summary.seconds, "rows_per_s": summary.rows_per_s,
                             "over_read": read_s / summary.seconds}
    return out


def bench_score(args, rng: np.random.Generator, workdir: Path) -> None:
    r = measure_score(rows=args.rows, dim=args.dim, classes=args.classes,
                      batch_size=args.batch_size, device=args.device, rng=rng, workdir=workdir)
    print(f"\n## npos score: {r['rows']} rows x {r['dim']} (float16 store, {r['classes']} "
          "classes)")
    print("| run | seconds | rows/s | vs read |\n|---|---:|---:|---:|")
    print(f"| read only (baseline) | {r['read_s']:.2f} | {r['read_rows_per_s']:,.0f} | 1.00 |")
    for name, run in r["runs"].items():
        print(f"| {name} | {run['seconds']:.2f} | {run['rows_per_s']:,.0f} | "
              f"{run['over_read']:.2f} |")
    if not r["head"]:
        print("\n(no trained head available: npos.train_head is missing; head runs skipped)")


def make_head(store, workdir: Path, device: str):
    """A real head checkpoint trained briefly on the store (scoring cost does not depend on
    how well it was trained), or None without npos.train_head."""
    try:
        from npos.train_head import HeadConfig, train_head
    except ImportError:
        return None
    head_dir = workdir / "head"
    train_head(store.url, str(head_dir),
               HeadConfig(epochs=1, batch_size=4096, ood_weight=0.0, seed=0),
               device=device)
    return str(head_dir)


def measure_knn(bank: np.ndarray, queries: np.ndarray, k: int, *, device: str = "cpu",
                backends=("faiss-flat", "torch", "faiss-ivf"), nlist: int | None = None,
                sweep: bool = True) -> dict:
    """Build and search time, recall@k and score change of each backend against the first
    (exact) one; with ``sweep``, IVF nprobe doubled from 1 on the same trained index."""
    from npos.knn import KnnIndex

    results, out = {}, {"bank": list(bank.shape), "queries": len(queries), "k": k,
                        "backends": {}, "sweep": []}
    for backend in backends:
        t = time.perf_counter()
        index = KnnIndex(backend, device=device,
                         nlist=nlist if backend == "faiss-ivf" else None).fit(bank)
        fit_s = time.perf_counter() - t
        if backend == "faiss-ivf":  # nprobe tuning happens on the first search for this k
            t = time.perf_counter()
            index.search(queries[:1], k)
            fit_s += time.perf_counter() - t
        t = time.perf_counter()
        dist, ids = index.search(queries, k)
        results[backend] = (fit_s, time.perf_counter() - t, dist, ids, index)
    exact = results[backends[0]]
    base, exact_dist, exact_ids = exact[1], exact[2], exact[3]

    def quality(dist, ids):
        hits = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, exact_ids, strict=True)])
        return float(hits), float(np.max(np.abs(dist[:, k - 1] - exact_dist[:, k - 1])))

    for backend, (fit_s, search_s, dist, ids, index) in results.items():
        recall, change = quality(dist, ids)
        out["backends"][backend] = {
            "build_s": fit_s, "search_s": search_s, "queries_per_s": len(queries) / search_s,
            "speedup": base / search_s, "recall": recall, "max_score_change": change,
            "on_gpu": bool(index.on_gpu_), "nlist": index.nlist_,
            "nprobe": index.nprobe_.get(k)}
    ivf = results.get("faiss-ivf", (None,) * 5)[4]
    nprobe = 1
    while sweep and ivf is not None and nprobe <= min(ivf.nlist_, 256):
        ivf.nprobe = nprobe
        ivf.nprobe_.clear()
        t = time.perf_counter()
        dist, ids = ivf.search(queries, k)
        search_s = time.perf_counter() - t
        recall, change = quality(dist, ids)
        out["sweep"].append({"nprobe": nprobe, "search_s": search_s,
                             "speedup": base / search_s, "recall": recall,
                             "max_score_change": change})
        nprobe *= 2
    return out


def bench_knn(args, rng: np.random.Generator) -> None:
    import torch

    dim, k = args.dim, args.k
    centres = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bank, _ = clustered(args.bank, dim, centres, rng)
    queries, _ = clustered(args.queries, dim, centres, rng)
    print(f"\n## knn score: bank {args.bank} x {dim}, {args.queries} queries, K = {k}, "
          f"{args.clusters} generated clusters; torch threads {torch.get_num_threads()}")
    r = measure_knn(bank, queries, k, device=args.device)
    print("| backend | build s | search s | queries/s | speedup vs faiss-flat | recall@K | "
          "max abs score change |\n|---|---:|---:|---:|---:|---:|---:|")
    for backend, b in r["backends"].items():
        extra = (f" (nlist {b['nlist']}, nprobe {b['nprobe']})"
                 if backend == "faiss-ivf" else "")
        print(f"| {backend}{extra} | {b['build_s']:.2f} | {b['search_s']:.2f} | "
              f"{b['queries_per_s']:,.0f} | {b['speedup']:.2f} | {b['recall']:.4f} | "
              f"{b['max_score_change']:.2e} |")
    # The tuned nprobe aims at recall 0.95 on bank points; held-out queries can sit lower,
    # so also sweep nprobe on the same (already trained) IVF index.
    print("\nIVF nprobe sweep (same index):\n| nprobe | search s | speedup vs faiss-flat | "
          "recall@K | max abs score change |\n|---:|---:|---:|---:|---:|")
    for row in r["sweep"]:
        print(f"| {row['nprobe']} | {row['search_s']:.2f} | {row['speedup']:.2f} | "
              f"{row['recall']:.4f} | {row['max_score_change']:.2e} |")


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
