"""Benchmark of stage two at scale: one persisted IVF index per store (``npos index build``).

On a generated clustered store (default **1,000,000 x 512 float16, 100 classes**; the
same rows unlabeled for class-agnostic synthesis), each phase in its own process so its
peak RSS (``ru_maxrss``) is its own:

1. ``build``: :func:`npos.knn.build_store_index` (flat codec, nprobe tuned for recall 0.95
   at K on held-out rows);
2. ``kth``: the K-th-NN distance of **every** row against all others (own row excluded),
   list by list through the index (:meth:`npos.knn.StoreIndex.kth_every_row`);
3. ``exact``: the baseline measured in the same run, exact ``faiss.IndexFlatL2`` over all rows
   (filled chunk by chunk), searched for the index's held-out rows: recall@K of the IVF
   answer against it, and time per query -> the exact time for every row (extrapolated: the
   full exact pass is hours at 1M rows);
4. ``outliers``: 100,000 class-agnostic outliers (``synthesize_store(..., scope="global")``)
   through the store index: its own every-row K-th-NN pass, then ``--candidates`` per
   boundary source scored against the source's neighbourhood;
5. ``score``: ``npos score`` with ``head,knn`` (a 1000-class RBF head, identity projection so
   knn uses the index) over every row (or, ``--score-rows N``, the first N rows as a store
   of their own, against the whole store's index), peak RSS.

Goals (issue 13, on a 2-core box): build + kth + outliers <= 10 min (the outliers phase
repeats the kth pass inside synthesis, so build + outliers is the whole pipeline);
recall@K >= 0.95 on held-out rows; IVF >= 5x faster than exact; peak RSS <= 2x the
store's float32 size; scoring peak RSS <= 3 GB. Sizes are parameters: run reduced
(``--rows 100000``) on shared machines.

Usage: ``python benchmarks/scale.py [--rows 1000000] [--dim 512] [--k 50] [--count 100000]
[--candidates 1500] [--skip score,exact]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- phases
def phase_generate(a: argparse.Namespace) -> dict:
    from scoring import make_score_store

    t = time.perf_counter()
    store = make_score_store(a.store, a.rows, a.dim, a.classes, np.random.default_rng(a.seed))
    return {"seconds": time.perf_counter() - t, "chunks": store.n_chunks}


def phase_build(a: argparse.Namespace) -> dict:
    from npos.knn import build_store_index

    t = time.perf_counter()
    index = build_store_index(a.store, ks=(a.k,), codec=a.codec, memory_budget=a.budget,
                              device="cpu", overwrite=True)
    return {"seconds": time.perf_counter() - t, **index.info()}


def phase_kth(a: argparse.Namespace) -> dict:
    from npos.knn import StoreIndex
    from npos.store import FeatureStore

    store = FeatureStore.open(a.store)
    index = StoreIndex.open(None, store=store)
    t = time.perf_counter()
    d_k = index.kth_every_row(a.k)  # list by list (npos.knn.store_index_lists)
    seconds = time.perf_counter() - t
    np.save(a.work / "kth.npy", d_k)
    return {"seconds": seconds, "rows": int(len(d_k)), "list_probe": index.list_probe_for(a.k),
            "finite": int(np.isfinite(d_k).sum())}


def phase_exact(a: argparse.Namespace) -> dict:
    import faiss

    from npos.knn import StoreIndex
    from npos.knn.store_index import _unit, drop_rows, recall_of
    from npos.store import FeatureStore

    store = FeatureStore.open(a.store)
    index = StoreIndex.open(None, store=store)
    held = np.load(Path(index.path) / "heldout.npy")
    queries = np.load(Path(index.path) / "queries.npy")
    flat = faiss.IndexIDMap(faiss.IndexFlatL2(store.dim))
    t = time.perf_counter()
    for batch in store.iter_batches(65536):
        flat.add_with_ids(_unit(batch["embeddings"]), batch["row"].astype(np.int64))
    fill = time.perf_counter() - t
    t = time.perf_counter()
    d2, ids = flat.search(queries, a.k + 1)
    per_query = (time.perf_counter() - t) / len(queries)
    _, exact_ids = drop_rows(d2, ids, held, a.k)
    t = time.perf_counter()
    _, ivf_ids = index.search(queries, a.k, exclude_rows=held)
    ivf_per_query = (time.perf_counter() - t) / len(queries)
    return {"fill_seconds": fill, "per_query_s": per_query, "ivf_per_query_s": ivf_per_query,
            "all_rows_seconds": per_query * index.n, "queries": int(len(queries)),
            "recall": recall_of(ivf_ids, exact_ids, a.k)}


def phase_outliers(a: argparse.Namespace) -> dict:
    """``--count`` class-agnostic outliers (``synthesize_store(..., scope="global")``) through
    the store's index (found at its default location): the every-row K-th-NN pass, then
    candidates around the boundary scored against their source's neighbourhood. Global scope
    ignores labels, so the labelled store with its index is the same computation as the
    unlabeled copy of its rows (which would need an index of its own)."""
    from npos.store import FeatureStore
    from npos.synthesize import SynthesisConfig
    from npos.synthesize.offline import synthesize_store

    if a.count == 0:
        return {"skipped": "--count 0"}
    store = FeatureStore.open(a.store)
    t = time.perf_counter()
    result = synthesize_store(store, SynthesisConfig(k=a.k, candidates=a.candidates),
                              scope="global", count=a.count, seed=a.seed, device="cpu")
    assert result.banks["all"].backend == "store-index"
    return {"seconds": time.perf_counter() - t, "outliers": len(result)}


def phase_score(a: argparse.Namespace) -> dict:
    from npos.evaluate import score_store
    from npos.store import FeatureStore

    from feature_world import random_trained_head

    store = FeatureStore.open(a.store)
    scored = store
    if a.score_rows:  # the store's first rows (same generator and seed) as a store of their
        from scoring import make_score_store  # own, scored against the whole store's index

        scored = make_score_store(str(a.work / "scored.zarr"), a.score_rows, a.dim, a.classes,
                                  np.random.default_rng(a.seed))
    head = random_trained_head(store.dim, a.head_classes, fingerprint=store.fingerprint())
    before = _peak_mib()
    t = time.perf_counter()
    summary = score_store(scored, str(a.work / "scores.zarr"), head=head, train=store,
                          scores="head,knn", knn_k=a.k, device="cpu", overwrite=True)
    return {"seconds": time.perf_counter() - t, "rows": summary.rows,
            "peak_before_mib": before}


def phase_baseline(a: argparse.Namespace) -> dict:
    """The RSS of a process that has imported what the phases import (torch, faiss, npos)."""
    import faiss  # noqa: F401
    import torch  # noqa: F401

    import npos.evaluate  # noqa: F401
    import npos.knn.store_index_build  # noqa: F401

    return {}


PHASES = {"baseline": phase_baseline, "generate": phase_generate, "build": phase_build,
          "kth": phase_kth, "exact": phase_exact, "outliers": phase_outliers, "score": phase_score}


# ---------------------------------------------------------------------------- driver
def run_phase(name: str, argv: list[str]) -> dict:
    """Run one phase in a fresh process; its result plus its peak RSS (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--phase", name, *argv],
                         capture_output=True, text=True, env=os.environ)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"phase {name} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--count", type=int, default=100_000,
                   help="global outliers (0: skip that phase)")
    p.add_argument("--candidates", type=int, default=1500, help="per boundary source (paper)")
    p.add_argument("--head-classes", type=int, default=1000)
    p.add_argument("--score-rows", type=int, default=0,
                   help="score the store's first N rows (a store of their own) against the "
                        "whole store's index instead of every row (peak RSS does not grow "
                        "with the rows scored)")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out")
    p.add_argument("--codec", default="flat")
    p.add_argument("--budget", type=int, default=1 << 30, help="index build memory budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the stores here (default: a temporary folder)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        a.work, a.store, a.unlabeled = work, str(work / "store.zarr"), str(work / "unl.zarr")
        if a.phase:  # child process: one phase, JSON on the last line
            result = PHASES[a.phase](a)
            print(json.dumps({**result, "peak_mib": _peak_mib()}, default=str))
            return
        argv = [x for x in sys.argv[1:]] + ["--workdir", str(work)] * (a.workdir is None)
        skip = set(filter(None, a.skip.split(",")))
        report(a, {name: run_phase(name, argv) if name not in skip else {"skipped": "--skip"}
                   for name in PHASES})


def report(a: argparse.Namespace, r: dict) -> None:
    f32_mib = a.rows * a.dim * 4 / 2**20
    print(f"# scale benchmark: {a.rows:,} x {a.dim} float16, {a.classes} classes, K={a.k}, "
          f"codec {a.codec}, {a.count:,} global outliers x {a.candidates} candidates; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.1f} at the end; store float32 size {f32_mib:,.0f} "
          f"MiB; a process with torch + faiss + npos imported: "
          f"{r['baseline']['peak_mib']:,.0f} MiB")
    b, k, e, o, s = r["build"], r["kth"], r["exact"], r["outliers"], r["score"]
    base = r["baseline"]["peak_mib"]
    if "nlist" not in b:  # a build from an earlier run (--skip build): its numbers are there
        b = {**b, "nlist": "?", "nprobe": "?", "recall": "?", "size_bytes": 0, "seconds": 0.0}
    print("| phase | seconds | peak RSS MiB | above imports MiB | peak / float32 size |")
    print("|---|---:|---:|---:|---:|")
    for name in ("generate", "build", "kth", "exact", "outliers", "score"):
        x = r[name]
        if "peak_mib" not in x:
            print(f"| {name} | skipped | | | |")
            continue
        secs = x.get("seconds", x.get("fill_seconds"))
        secs = "skipped" if secs is None else f"{secs:,.1f}"
        print(f"| {name} | {secs} | {x['peak_mib']:,.0f} | {x['peak_mib'] - base:,.0f} | "
              f"{x['peak_mib'] / f32_mib:.2f} |")
    print(f"\nindex: nlist {b['nlist']}, nprobe {b['nprobe']}, held-out recall {b['recall']}, "
          f"every-row pass list probe {b.get('list_probe')}, its held-out recall "
          f"{b.get('list_recall')}, {b['size_bytes'] / 2**20:,.0f} MiB")
    if "seconds" in o:  # synthesis runs its own every-row pass
        print(f"build + global synthesis (every-row kth + outliers): "
              f"{b['seconds'] + o['seconds']:,.1f} s (goal <= 600 s)")
    if "recall" in e and "seconds" in k:
        print(f"recall@{a.k} vs exact faiss-flat on {e['queries']} held-out rows: "
              f"{e['recall']:.4f} (goal >= 0.95)")
        print(f"exact faiss-flat: {e['per_query_s'] * 1e3:.2f} ms/query -> every row "
              f"{e['all_rows_seconds']:,.0f} s; IVF kth of every row {k['seconds']:,.1f} s: "
              f"{e['all_rows_seconds'] / k['seconds']:.1f}x faster (goal >= 5x); per query "
              f"{e['per_query_s'] / e['ivf_per_query_s']:.1f}x")
        print(f"peak RSS build/kth/outliers vs float32 size: "
              f"{b.get('peak_mib', 0) / f32_mib:.2f} / {k['peak_mib'] / f32_mib:.2f} / "
              f"{o.get('peak_mib', 0) / f32_mib:.2f} (goal <= 2)")
    if "seconds" in s:
        print(f"score head,knn ({a.head_classes}-class RBF head, {s['rows']:,} rows): "
              f"{s['seconds']:,.1f} s, peak RSS {s['peak_mib']:,.0f} MiB (goal <= 3072)")


if __name__ == "__main__":
    main()
