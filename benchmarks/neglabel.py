"""Benchmark: ``neglabel`` scoring against MCM in the same run (rows/s and peak memory).

Setting (the ImageNet-1k one): C = 1000 ID class embeddings, a text bank of 70,000 words
(3/4 nouns), NegLabel defaults (M = 10,000 negatives, G = 100 groups, eta = 0.95,
15 % per part of speech), so every image is compared with 11,000 labels. The image store
(float16, 4096-row chunks) is generated (unit vectors around the class embeddings); scores
go through :func:`npos.evaluate.score_store` exactly as ``npos score`` calls it, writing a
``.zarr`` score store. Each detector runs in its own child process, so its peak resident
memory (and on CUDA its peak allocated GPU memory) is its own. Goal: neglabel >= 0.3x MCM's
rows/s, memory bounded by the batch (it must not grow with the rows scored).

Usage::

    python -m benchmarks.neglabel [--rows 200000] [--device auto] [--batch-size 65536]
    python -m benchmarks.neglabel --rows 1000000 --device cuda     # the full-size run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, CLASSES, WORDS = 512, 1000, 70000
ROOT = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_inputs(workdir: Path, rows: int, seed: int = 0) -> tuple[str, str]:
    """The image store and the text bank, generated."""
    from npos.store import FeatureStore
    from npos.textbank import import_text_bank

    rng = np.random.default_rng(seed)
    classes = unit(rng.standard_normal((CLASSES, DIM), dtype=np.float32))
    store = FeatureStore.create(str(workdir / "images.zarr"), n_rows=rows, dim=DIM,
                                dtype="float16", chunk_rows=4096,
                                attrs={"model": "bench", "pretrained": None,
                                       "preprocess": None})
    for index in range(store.n_chunks):
        part = store.chunk_slice(index)
        n = part.stop - part.start
        z = classes[rng.integers(0, CLASSES, n)] + rng.standard_normal(
            (n, DIM), dtype=np.float32) * (0.75 / np.sqrt(DIM))
        store.write_chunk(index, embeddings=z, ids=np.arange(part.start, part.stop).astype(str))
    store.set_array("text_embeddings", classes)
    store.close()
    np.save(workdir / "words.npy", unit(rng.standard_normal((WORDS, DIM), dtype=np.float32)))
    (workdir / "words.txt").write_text("".join(f"w{i}\t{'a' if i % 4 == 0 else 'n'}\n"
                                               for i in range(WORDS)))
    import_text_bank(workdir / "words.npy", workdir / "words.txt", str(workdir / "bank.zarr"),
                     model="bench").close()
    return str(workdir / "images.zarr"), str(workdir / "bank.zarr")


def child(args: argparse.Namespace) -> None:
    """Score once with one detector; print rows/s and peak memory as JSON."""
    import torch

    from npos.device import resolve_device
    from npos.evaluate import ScoringConfig, score_store

    config = ScoringConfig(scores=args.child, text_bank=args.bank, device=args.device,
                           batch_size=args.batch_size)
    start = time.perf_counter()
    summary = score_store(args.store, str(Path(args.workdir) / f"{args.child}.zarr"), config)
    result = {"score": args.child, "rows_per_s": summary.rows_per_s,
              "scoring_s": summary.seconds, "total_s": time.perf_counter() - start,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if str(resolve_device(config.device)).startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--bank", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        store, bank = make_inputs(Path(tmp), args.rows)
        results = {}
        for score in ("mcm", "neglabel"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.neglabel", "--child", score, "--store", store,
                 "--bank", bank, "--workdir", tmp, "--device", args.device, "--batch-size",
                 str(args.batch_size)], check=True, capture_output=True, text=True, cwd=ROOT)
            results[score] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.processor() or platform.machine()}, device {args.device}; "
          f"{args.rows} rows x {DIM}, {CLASSES} classes, neglabel: {CLASSES} + 10000 labels")
    for score, r in results.items():
        extra = f", peak CUDA {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""
        print(f"{score:>9}: {r['rows_per_s']:,.0f} rows/s (scoring {r['scoring_s']:.1f} s, "
              f"with setup {r['total_s']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB{extra}")
    ratio = results["neglabel"]["rows_per_s"] / results["mcm"]["rows_per_s"]
    print(f"neglabel / mcm rows/s: {ratio:.2f}x (goal >= 0.3x)")


if __name__ == "__main__":
    main()
