"""Scoring at scale: the knn score through the train store's persisted index (``--index``),
refusals of indexes that do not match, row-block scoring, and peak memory bounded by
``--memory-budget`` instead of the batch size and the head's classes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import npos
from npos.cli import cli
from npos.evaluate import OODScorer, ScoringConfig, score_store
from npos.evaluate.batch import read_score_settings
from npos.knn import build_store_index

from benchmarks.feature_world import random_trained_head


def _scores(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[float(v) for v in row[1:]] for row in rows[1:]])


def test_knn_through_index_equals_knn_without(world):
    runner = CliRunner()
    build_store_index(world["train"], nlist=1, ks=(5,))  # one list: exact
    outs = {}
    for name, flags in (("plain", ["--index", "none"]), ("default", []),
                        ("explicit", ["--index", world["train"] + ".index"])):
        out = str(world["tmp"] / f"{name}.csv")
        result = runner.invoke(cli, ["score", world["near"], "--train", world["train"],
                                     "--scores", "knn", "--knn-k", "5", "--out", out,
                                     "--device", "cpu", *flags])
        assert result.exit_code == 0, result.output
        outs[name] = out
    plain = _scores(outs["plain"])
    for name in ("default", "explicit"):
        np.testing.assert_allclose(_scores(outs[name]), plain, atol=1e-5)
        facts = read_score_settings(outs[name])["detectors"]["knn"]
        assert facts["backend_used"] == "store-index" and facts["nlist"] == 1
    assert read_score_settings(outs["plain"])["detectors"]["knn"]["backend_used"] != \
        "store-index"


def test_index_of_another_store_or_stale_is_refused_in_one_line(world):
    runner = CliRunner()
    build_store_index(world["test"], nlist=1, out=str(world["tmp"] / "test.index"))
    for args in (["score", world["near"], "--out", str(world["tmp"] / "x.csv")],
                 ["evaluate", "--id", world["test"], "--ood", f"near={world['near']}",
                  "--out", str(world["tmp"] / "rep")]):
        result = runner.invoke(cli, [*args, "--train", world["train"], "--scores", "knn",
                                     "--index", str(world["tmp"] / "test.index")])
        assert result.exit_code == 2, result.output
        assert "was built for another store" in result.output
        assert len(result.output.strip().splitlines()) == 1
    missing = runner.invoke(cli, ["score", world["near"], "--train", world["train"],
                                  "--scores", "knn", "--index", str(world["tmp"] / "nope"),
                                  "--out", str(world["tmp"] / "y.csv")])
    assert missing.exit_code == 2 and "no store index at" in missing.output


def test_index_serves_only_encoder_space_features(world, contract_head):
    from npos.store import FeatureStore

    train = FeatureStore.open(world["train"])
    build_store_index(train, nlist=1)
    projecting = contract_head(16, 4, fingerprint=train.fingerprint())
    with pytest.raises(npos.errors.ParameterError, match="drop --index"):
        score_store(world["near"], world["tmp"] / "a.csv", head=projecting,
                    train=world["train"], scores="knn", index=world["train"] + ".index",
                    device="cpu")
    # the default index is skipped for a projecting head: knn reads the projected rows
    score_store(world["near"], world["tmp"] / "b.csv", head=projecting, train=world["train"],
                scores="knn", device="cpu")
    assert read_score_settings(world["tmp"] / "b.csv")["detectors"]["knn"]["backend_used"] \
        != "store-index"
    # an identity projection (a head-only head) scores the raw embeddings: the index serves
    identity = random_trained_head(16, 4, head="mlp", fingerprint=train.fingerprint())
    score_store(world["near"], world["tmp"] / "c.csv", head=identity, train=world["train"],
                scores="knn,head", device="cpu")
    facts = read_score_settings(world["tmp"] / "c.csv")["detectors"]["knn"]
    assert facts["backend_used"] == "store-index"


def test_row_blocks_give_the_same_scores(world):
    from npos.store import FeatureStore

    fp = FeatureStore.open(world["train"]).fingerprint()
    head = random_trained_head(16, 4, fingerprint=fp)
    z = world["z_near"].astype(np.float32)
    results = []
    for budget in (1 << 30, 4096):  # one block / blocks of a few rows
        config = ScoringConfig(scores="mcm,energy,head,mahalanobis", memory_budget=budget,
                               device="cpu")
        scorer = OODScorer(head=head, config=config).fit(world["z_train"], world["y_train"])
        assert (scorer.block_rows(16) >= len(z)) == (budget == 1 << 30)
        results.append(scorer.score_and_predict(z))
    for name, values in results[0][0].items():
        np.testing.assert_allclose(results[1][0][name], values, rtol=1e-6, atol=1e-9)
    assert np.array_equal(results[0][1], results[1][1])


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from benchmarks.feature_world import random_trained_head
    from npos.evaluate import score_store
    from npos.store import FeatureStore

    store = FeatureStore.open(sys.argv[1])
    head = random_trained_head(store.dim, 1000, fingerprint=store.fingerprint())
    import torch
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    score_store(store, sys.argv[2], head=head, scores="head,mcm", device="cpu",
                memory_budget=64 * 2**20)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
""")


@pytest.mark.slow
def test_peak_memory_of_scoring_200k_rows_with_1000_class_rbf_head(tmp_path, make_store):
    """Peak RSS growth (``ru_maxrss`` in a fresh process, which sees torch's allocations)
    while scoring 200,000 rows (dim 32, ``head,mcm``) with a 1000-class RBF head (4000
    centres) stays under 128 MiB, twice the 64 MiB block budget (measured: ~41 MiB on a
    2-core Xeon; 152 MiB with a 256 MiB budget). Unblocked, one 65,536-row batch needs a
    65,536 x 4,000 float32 distance matrix (1 GiB) plus its temporaries (> 3 GiB); the
    outputs (2 scores x 200k float64 plus the zarr chunks) are ~3 MiB.

    ``MALLOC_MMAP_THRESHOLD_`` pins glibc's mmap threshold: with its default dynamic
    threshold, freed block-sized buffers stay in the heap and RSS then measures heap
    fragmentation (100-500 MiB, varying from run to run) instead of live memory."""
    rng = np.random.default_rng(0)
    n, dim = 200_000, 32
    store = make_store(tmp_path / "big.zarr", rng.normal(size=(n, dim)).astype(np.float16),
                       chunk_rows=8192, dtype="float16")
    script = tmp_path / "measure.py"
    script.write_text(_MEMORY_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(Path(npos.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), store.url, str(tmp_path / "s.zarr")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_mib = (rss["after_kib"] - rss["before_kib"]) / 1024
    assert growth_mib < 128, growth_mib
