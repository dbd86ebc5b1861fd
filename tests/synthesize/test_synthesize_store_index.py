"""``npos synthesize`` through the store's persisted index (``npos index build``): equal to
the in-memory path with an exact (one-list flat) index, ``--scope global`` streams the rows,
and an index of another store is refused in one line."""

import pytest
import torch
from click.testing import CliRunner

import npos.synthesize.bank_search as bank_search
from npos.cli import cli
from npos.errors import ParameterError
from npos.knn import build_store_index
from npos.synthesize import SynthesisConfig
from npos.synthesize.offline import synthesize_store

CFG = SynthesisConfig(k=8, select=20, pick=3, candidates=40, keep=2, backend="torch")


def _same(a, b):
    torch.testing.assert_close(a.outliers, b.outliers, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.knn_distance, b.knn_distance, atol=1e-5, rtol=0)
    assert a.source_rows.tolist() == b.source_rows.tolist()
    for name, part in a.banks.items():
        torch.testing.assert_close(part.bank_distance, b.banks[name].bank_distance, atol=1e-5,
                                   rtol=0)
        assert set(part.boundary.tolist()) == set(b.banks[name].boundary.tolist())


def test_global_with_index_equals_in_memory_and_streams(labelled, monkeypatch):
    build_store_index(labelled, nlist=1, ks=(CFG.k,))  # one list: exact, at STORE.index
    plain = synthesize_store(labelled, CFG, scope="global", count=9, seed=2, index="none")
    assert plain.banks["all"].backend == "torch"
    held = []  # rows of every store read synthesis makes
    read = bank_search.read_rows
    monkeypatch.setattr(bank_search, "read_rows",
                        lambda store, pos: held.append(pos.size) or read(store, pos))
    # a budget far below the 300 rows x 16 float32 (19 KB) the in-memory path needs
    budget = 3000
    with pytest.raises(ParameterError, match="cannot hold the 300 rows"):
        synthesize_store(labelled, CFG, scope="global", count=9, seed=2, index="none",
                         memory_budget=budget)
    indexed = synthesize_store(labelled, CFG, scope="global", count=9, seed=2,
                               memory_budget=budget)  # the default location is found
    assert indexed.banks["all"].backend == "store-index"
    _same(indexed, plain)
    assert held and max(held) * 16 * 4 <= budget  # streamed: never all 300 rows at once


def test_bank_all_large_classes_use_the_filtered_index(labelled):
    build_store_index(labelled, nlist=1, ks=(CFG.k,))
    plain = synthesize_store(labelled, CFG, bank="all", seed=4, index="none")
    # faiss-ivf sends every class to IVF: the store index, filtered to the class's rows
    ivf = SynthesisConfig(**{**CFG.__dict__, "backend": "faiss-ivf"})
    indexed = synthesize_store(labelled, ivf, bank="all", seed=4)
    assert {p.backend for p in indexed.banks.values()} == {"store-index"}
    _same(indexed, plain)


def test_cli_index_of_another_store_is_refused_in_one_line(labelled, make_store, tmp_path):
    other = make_store(tmp_path / "o.zarr", labelled.read()[:200], None, chunk_rows=32)
    build_store_index(other, nlist=1, ks=(CFG.k,))
    fast = ["--k", "8", "--select", "20", "--candidates", "40", "--stats-only",
            "--scope", "global", "--count", "3"]
    res = CliRunner().invoke(cli, ["synthesize", labelled.url, *fast,
                                   "--index", other.url + ".index"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "built for another store" in lines[0], res.output
    ok = CliRunner().invoke(cli, ["synthesize", labelled.url, *fast, "--index", "none"])
    assert ok.exit_code == 0, ok.output
    sample = CliRunner().invoke(cli, ["synthesize", labelled.url, *fast[:7], "--queue", "60",
                                      "--index", other.url + ".index"])
    assert sample.exit_code == 2 and "--index" in sample.output and "--bank all" in sample.output


def test_ivf_index_scores_candidates_in_the_source_neighbourhood(tmp_path, make_store, rng):
    """With an IVF index, candidates are scored against their source's LOCAL_DEPTH x K
    nearest rows: their d_K and the kept candidates match exact search over every row."""
    centres = rng.normal(size=(20, 64))
    x = centres[rng.integers(0, 20, 4000)] + 0.7 * rng.normal(size=(4000, 64))
    store = make_store(tmp_path / "ivf.zarr", x, None, chunk_rows=512, dtype="float16")
    index = build_store_index(store, ks=(10,), device="cpu")
    assert index.nlist > 1
    bank = bank_search.IndexedBank(store, index, index.rows)
    units = torch.nn.functional.normalize(torch.from_numpy(store.read(dtype="float32")), dim=-1)
    sources = torch.arange(0, 4000, 200)
    bank.prepare(sources, 10)
    noise = torch.randn((sources.numel(), 300, 64), generator=torch.Generator().manual_seed(0))
    v = units[sources][:, None] + 0.01 * noise
    local = bank.candidate_kth(v, sources, 10, 1 << 20)
    unit_v = torch.nn.functional.normalize(v, dim=-1)
    exact = torch.cdist(unit_v, units[None]).sort(dim=-1).values[..., 9]
    assert ((local - exact).abs() < 1e-4).float().mean() >= 0.95  # IVF: a few missed rows
    assert (local >= exact - 1e-4).all()  # a missed row can only lengthen d_K
    top_local, top_exact = local.topk(2, dim=1).indices, exact.topk(2, dim=1).indices
    assert (top_local.sort().values == top_exact.sort().values).float().mean() >= 0.95


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_an_ivf_index(tmp_path, make_store, rng,
                                                            torchrun_pair):
    """The list-by-list every-row pass (lists shared by the ranks) and the per-source
    candidate workers: 2 processes write exactly what one does."""
    import numpy as np

    centres = rng.normal(size=(20, 32))
    x = centres[rng.integers(0, 20, 3000)] + 0.7 * rng.normal(size=(3000, 32))
    store = make_store(tmp_path / "ivf.zarr", x, None, chunk_rows=256, dtype="float16")
    assert build_store_index(store, ks=(8,), device="cpu").nlist > 1
    args = ["synthesize", store.url, "--scope", "global", "--count", "40", "--k", "8",
            "--select", "20", "--candidates", "50", "--seed", "2"]
    a, b = torchrun_pair(args, tmp_path)
    for name in ("embeddings", "labels", "knn_distance", "ids"):
        np.testing.assert_array_equal(a.read(name), b.read(name))
