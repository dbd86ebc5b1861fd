import sys

import numpy as np
import pytest
import torch

from npos.errors import MissingDependencyError, ParameterError
from npos.synthesize import SynthesisConfig, synthesize
from npos.synthesize import knn
from npos.synthesize.knn import KnnIndex, ivf_nlist, knn_kth_distance


def _clustered(n, dim=32, clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    which = rng.integers(0, clusters, n)
    return (centres[which] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def test_faiss_flat_equals_torch():
    bank = _clustered(3000, seed=1)
    queries = _clustered(200, seed=2)
    flat = KnnIndex("faiss-flat").fit(bank)
    exact = KnnIndex("torch").fit(bank)
    d_f, i_f = flat.search(queries, 7)
    d_t, i_t = exact.search(queries, 7)
    assert isinstance(d_f, np.ndarray) and d_f.shape == (200, 7) and i_f.dtype == np.int64
    np.testing.assert_allclose(d_f, d_t, atol=1e-4)
    assert (i_f == i_t).mean() > 0.999
    assert (np.diff(d_t, axis=1) >= 0).all()
    # against a brute-force reference on normalized vectors
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    brute = np.sort(np.linalg.norm(unit(queries)[:, None] - unit(bank)[None], axis=2), axis=1)
    np.testing.assert_allclose(d_t, brute[:, :7], atol=1e-5)
    for k in (1, 7):
        np.testing.assert_allclose(flat.kth_distance(queries, k), exact.kth_distance(queries, k),
                                   atol=1e-4)
        np.testing.assert_allclose(exact.kth_distance(queries, k), brute[:, k - 1], atol=1e-5)


def test_exclude_self_with_duplicates():
    bank = _clustered(500, seed=3)
    bank[1] = bank[0]
    bank[2] = bank[0]  # three copies: each one's 2 nearest others are at distance 0
    for backend in ("torch", "faiss-flat"):
        d = knn_kth_distance(bank, bank, 2, backend=backend, exclude_self=True)
        assert d[:3].max() < 1e-3
        d3 = knn_kth_distance(bank, bank, 3, backend=backend, exclude_self=True)
        assert d3[:3].min() > 1e-2
    t = knn_kth_distance(bank, bank, 5, backend="torch", exclude_self=True)
    f = knn_kth_distance(bank, bank, 5, backend="faiss-flat", exclude_self=True)
    np.testing.assert_allclose(t, f, atol=1e-4)
    with_self = knn_kth_distance(bank, bank, 5, backend="torch")
    assert (with_self <= t + 1e-6).all() and (with_self < t - 1e-4).any()


def test_torch_in_torch_out_and_memory_blocks():
    bank = torch.from_numpy(_clustered(400, seed=4))
    q = torch.from_numpy(_clustered(50, seed=5))
    index = KnnIndex("torch", memory_budget=4 * 400 * 3).fit(bank)  # 3 query rows per block
    d, i = index.search(q, 4)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.float32 and i.dtype == torch.int64
    d_ref, i_ref = KnnIndex("torch").fit(bank).search(q, 4)
    assert torch.equal(i, i_ref) and torch.allclose(d, d_ref)
    flat_kth = KnnIndex("faiss-flat").fit(bank).kth_distance(q, 4)
    assert isinstance(flat_kth, torch.Tensor) and torch.allclose(flat_kth, d[:, 3], atol=1e-4)


def test_ivf_sizing():
    assert ivf_nlist(1_000_000) == 4096
    assert ivf_nlist(10_000) == 64  # 4 sqrt(N) = 400 -> 512, capped at 100 points per list
    assert ivf_nlist(50_000) == 256  # 894 -> 1024, capped by 500 -> 256
    assert ivf_nlist(150) == 1
    for n in (200, 5000, 123_456):
        assert n / ivf_nlist(n) >= 100


def test_ivf_recall_on_clustered_data_at_default_nprobe():
    data = _clustered(20_300, seed=6)
    bank, held_out = data[:20_000], data[20_000:]  # unseen queries, same distribution
    index = KnnIndex("faiss-ivf").fit(bank)
    assert index.nlist_ == 128
    d, i = index.search(held_out, 10)
    assert index.nprobe_[10] < index.nlist_  # tuned, not exhaustive
    assert index.recall_[10] >= 0.95
    assert index.measure_recall(10, queries=held_out) >= 0.95
    exact = KnnIndex("torch").fit(bank).kth_distance(held_out, 10)
    assert np.mean(np.abs(d[:, 9] - exact) < 1e-4) >= 0.9
    fixed = KnnIndex("faiss-ivf", nlist=64, nprobe=1).fit(bank)
    fixed.search(held_out, 10)
    assert fixed.nlist_ == 64 and fixed.nprobe_ == {}
    assert fixed.measure_recall(10, queries=held_out) < index.measure_recall(10, queries=held_out)


def test_auto_backend(monkeypatch):
    assert KnnIndex().fit(_clustered(100)).backend_ == "torch"
    monkeypatch.setattr(knn, "AUTO_TORCH_MAX", 50)
    assert KnnIndex().fit(_clustered(100)).backend_ == "faiss-flat"
    monkeypatch.setattr(knn, "AUTO_EXACT_MAX", 60)
    assert KnnIndex().fit(_clustered(100)).backend_ == "faiss-ivf"
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss not installed
    assert KnnIndex().fit(_clustered(100)).backend_ == "torch"


def test_missing_faiss_has_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    for backend in ("faiss-flat", "faiss-ivf"):
        with pytest.raises(MissingDependencyError,
                           match=r"backend 'faiss-.*' needs faiss; install it with: "
                                 r"pip install \"npos\[cpu\]\" .*\"npos\[gpu\]\""):
            KnnIndex(backend).fit(_clustered(100))
    bank = torch.randn(2, 30, 4)
    with pytest.raises(MissingDependencyError, match="needs faiss"):
        synthesize(bank, SynthesisConfig(k=3, select=5, pick=1, candidates=3, keep=1,
                                         backend="faiss-flat"),
                   generator=torch.Generator())


def test_knn_errors():
    bank = _clustered(40)
    with pytest.raises(ParameterError, match="not fitted yet"):
        KnnIndex().search(bank, 3)
    index = KnnIndex("torch").fit(bank)
    with pytest.raises(ParameterError, match="queries have dimension 8 but the index was fitted"):
        index.search(np.ones((2, 8), np.float32), 3)
    with pytest.raises(ParameterError, match=r"The 'k' parameter must be an int in the range "
                                             r"\[1, 40\]. Got 41 instead."):
        index.search(bank, 41)
    with pytest.raises(ParameterError, match=r"\[1, 39\] \(k < bank size: self is excluded\)"):
        index.kth_distance(bank, 40, exclude_self=True)
    with pytest.raises(ParameterError, match="exclude_self needs the queries to be the bank"):
        index.kth_distance(bank[:5], 3, exclude_self=True)
    with pytest.raises(ParameterError, match="The 'backend' parameter must be one of"):
        KnnIndex("hnsw").fit(bank)
    with pytest.raises(ParameterError, match="The 'nprobe' parameter must be an int"):
        KnnIndex("faiss-ivf", nprobe=0).fit(bank)
    with pytest.raises(ParameterError, match="bank must have shape"):
        KnnIndex().fit(np.ones(5, np.float32))
    with pytest.raises(ParameterError, match="queries contains NaN"):
        index.search(np.full((1, 32), np.nan, np.float32), 1)


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf"])
def test_synthesis_with_faiss_backends_matches_torch(backend, ref):
    banks = ref.banks(3, 150, 16)
    cfg = SynthesisConfig(k=5, select=20, pick=2, candidates=30, keep=2, sigma=0.05)
    base = synthesize(banks, cfg, generator=torch.Generator().manual_seed(0),
                      return_stats=True)
    other = synthesize(banks, SynthesisConfig(**{**cfg.__dict__, "backend": backend}),
                       generator=torch.Generator().manual_seed(0), return_stats=True)
    # one IVF list per class bank of 150 points: the IVF search is exhaustive here
    torch.testing.assert_close(other.stats.bank_distance, base.stats.bank_distance,
                               atol=1e-4, rtol=0)
    assert torch.equal(other.labels, base.labels)
    torch.testing.assert_close(other.knn_distance, base.knn_distance, atol=1e-4, rtol=0)
    torch.testing.assert_close(other.outliers, base.outliers, atol=1e-4, rtol=0)
