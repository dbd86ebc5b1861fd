"""``--bank all`` and ``--scope global``: every valid row against an exact float64 reference,
the documented seeding, budget independence, faiss-ivf recall, torchrun 2 = 1, bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from npos.cli import cli
from npos.synthesize import SynthesisConfig
from npos.synthesize.offline import synthesize_store
from npos.synthesize.scale import seeded

NAMES = ["cat", "dog", "fox"]  # the classes of the `labelled` store (conftest.py)
SIZES = (70, 95, 120)
CFG = SynthesisConfig(k=8, select=20, pick=3, candidates=40, keep=2, backend="torch")


def _kth(queries, bank, k, exclude_self=False):
    d = torch.cdist(F.normalize(queries.double(), dim=-1), F.normalize(bank.double(), dim=-1))
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, k - 1]


def reference_bank(raw, cfg, sources, key, seed):
    """NPOS over one whole bank in float64, with the seeding documented in npos.synthesize.scale."""
    raw = raw.double()
    bank_d = _kth(raw, raw, cfg.k, exclude_self=True)
    boundary = bank_d.argsort(descending=True)[:cfg.select]
    g = seeded(seed, key)
    order = torch.cat([torch.randperm(cfg.select, generator=g)
                       for _ in range(math.ceil(sources / cfg.select))])[:sources]
    out, dist = [], []
    for j in range(sources):
        b = raw[boundary[order[j]]]
        noise = torch.randn((cfg.candidates, raw.shape[1]), generator=seeded(seed, key, j))
        cand = b.norm() * F.normalize(b / b.norm() + cfg.resolved_sigma * noise.double(), dim=-1)
        cand_d = _kth(cand, raw, cfg.k)
        top = cand_d.argsort(descending=True)[:cfg.keep]
        out.append(cand[top])
        dist.append(cand_d[top])
    return bank_d, boundary, torch.cat(out), torch.cat(dist)


def test_bank_all_equals_float64_reference_per_class(labelled):
    x = torch.from_numpy(labelled.read(dtype="float64"))
    y = torch.from_numpy(labelled.read("labels"))
    # A budget for ~1.5 classes: classes are read in several store passes.
    res = synthesize_store(labelled, CFG, bank="all", seed=5, memory_budget=4 * 16 * 180)
    assert res.labels.tolist() == sum(([c] * 6 for c in range(3)), [])
    for c, name in enumerate(NAMES):
        bank_d, boundary, out, dist = reference_bank(x[y == c], CFG, CFG.pick, c, 5)
        part = res.banks[name]
        assert part.bank_distance.numel() == SIZES[c]
        torch.testing.assert_close(part.bank_distance.double(), bank_d, atol=1e-5, rtol=0)
        assert set(part.boundary.tolist()) == set(boundary.tolist())
        torch.testing.assert_close(res.outliers[res.labels == c].double(), out, atol=1e-4,
                                   rtol=0)
        torch.testing.assert_close(res.knn_distance[res.labels == c].double(), dist,
                                   atol=1e-5, rtol=0)
    # every source row is a row of its class; the budget changes nothing
    labels_all = labelled.read_rows("labels")
    assert (labels_all[res.source_rows] == res.labels.numpy()).all()
    again = synthesize_store(labelled, CFG, bank="all", seed=5, memory_budget=2**30)
    assert torch.equal(again.outliers, res.outliers)


def test_scope_global_equals_reference_and_ignores_labels(labelled, make_store, tmp_path):
    x = torch.from_numpy(labelled.read(dtype="float64"))
    res = synthesize_store(labelled, CFG, scope="global", count=7, seed=1,
                           memory_budget=20_000)  # several query and source chunks
    bank_d, boundary, out, dist = reference_bank(x, CFG, 4, -1, 1)
    part = res.banks["all"]
    assert set(part.boundary.tolist()) == set(boundary.tolist())
    torch.testing.assert_close(res.outliers.double(), out[:7], atol=1e-4, rtol=0)
    torch.testing.assert_close(res.knn_distance.double(), dist[:7], atol=1e-5, rtol=0)
    assert res.labels.tolist() == [-1] * 7

    unlabeled = make_store(tmp_path / "u.zarr", labelled.read(), None, chunk_rows=32)
    same = synthesize_store(unlabeled, CFG, scope="global", count=7, seed=1)
    assert torch.equal(same.outliers, res.outliers)
    store = same.write(str(tmp_path / "o.zarr"), source=unlabeled)
    assert store.kind == "outliers" and store.n_rows == 7
    assert store.attrs["synthesis"]["labels_used"] is False
    assert store.attrs["synthesis"]["scope"] == "global"
    assert store.read("labels").tolist() == [-1] * 7


def test_faiss_ivf_boundary_recall(tmp_path, make_store, rng):
    centres = rng.normal(size=(20, 32))
    y = rng.integers(0, 20, 6000)
    x = centres[y] + 0.6 * rng.normal(size=(y.size, 32))
    store = make_store(tmp_path / "big.zarr", x, None, chunk_rows=1024)
    cfg = SynthesisConfig(k=10, select=200, pick=1, candidates=20, keep=1)
    exact = synthesize_store(store, cfg, scope="global", count=4)
    ivf = synthesize_store(store, SynthesisConfig(**{**cfg.__dict__, "backend": "faiss-ivf"}),
                           scope="global", count=4)
    assert ivf.banks["all"].backend == "faiss-ivf"
    found = set(ivf.banks["all"].boundary.tolist())
    recall = len(found & set(exact.banks["all"].boundary.tolist())) / cfg.select
    assert recall >= 0.95


def _run(*args):
    return CliRunner().invoke(cli, ["synthesize", *args])


def test_bad_input_one_line(labelled, make_store, tmp_path):
    fast = ["--k", "8", "--select", "20", "--candidates", "40", "--stats-only"]
    unlabeled = make_store(tmp_path / "u.zarr", labelled.read(), None)
    cases = [
        ((unlabeled.url, *fast), "--scope class needs class labels; use --scope global"),
        ((labelled.url, *fast[:1], "75", *fast[2:], "--bank", "all"),
         "class 'cat' has 70 rows; use --k 69 or less"),
        ((labelled.url, *fast, "--scope", "global", "--count", "0"), "'--count' parameter"),
        ((labelled.url, *fast, "--scope", "global"), "--scope global needs --count"),
        ((labelled.url, *fast, "--bank", "all", "--memory-budget", "1KiB"),
         "use --memory-budget"),
        ((labelled.url, *fast, "--scope", "global", "--count", "3", "--memory-budget", "4K"),
         "cannot hold the 300 rows x 16 float32"),
        ((labelled.url, *fast, "--memory-budget", "lots"), "'--memory-budget' parameter"),
        ((labelled.url, *fast, "--count", "3"), "--count sets the total of --scope global"),
    ]
    for args, message in cases:
        result = _run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_global(labelled, tmp_path, torchrun_pair):
    args = ["synthesize", labelled.url, "--scope", "global", "--count", "40", "--k", "8",
            "--select", "20", "--candidates", "50", "--memory-budget", "64KiB", "--seed", "2"]
    a, b = torchrun_pair(args, tmp_path)
    for name in ("embeddings", "labels", "knn_distance", "ids"):
        np.testing.assert_array_equal(a.read(name), b.read(name))
    assert a.n_rows == 40
