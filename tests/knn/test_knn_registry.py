"""npos.knn: one backend registry, one auto policy (shared with the synthesis engine), the
IVF state kept across fits and calls, and the old import paths."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import npos.knn
from npos.errors import ParameterError
from npos.knn import KnnCache, KnnIndex, register_backend, resolve_knn_backend
from npos.knn.backends import KnnBackend
from npos.knn.ivf import FaissIvfBackend
from npos.synthesize import SynthesisConfig, synthesize


def _clustered(n, dim=16, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)]
            + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def _banks(n_classes=3, queue=150, dim=16, seed=0):
    return torch.from_numpy(np.stack([_clustered(queue, dim, seed=seed + c)
                                      for c in range(n_classes)]))


class NumpyBruteForce(KnnBackend):
    """A backend as a user would add one: full distance matrix in float64 numpy."""

    def fit(self, unit):
        self.bank = unit
        self.fits = getattr(self, "fits", 0) + 1

    def search(self, unit, k):
        d = np.linalg.norm(unit.numpy()[:, None].astype(np.float64)
                           - self.bank.numpy()[None].astype(np.float64), axis=2)
        ids = np.argsort(d, axis=1, kind="stable")[:, :k]
        dist = np.take_along_axis(d, ids, axis=1).astype(np.float32)
        return torch.from_numpy(dist), torch.from_numpy(ids)


@pytest.fixture
def brute():
    register_backend("numpy-brute", NumpyBruteForce)
    yield "numpy-brute"
    npos.knn.unregister_backend("numpy-brute")


def test_registered_backend_is_usable_by_name(brute):
    bank, queries = _clustered(300, seed=1), _clustered(40, seed=2)
    index = KnnIndex(backend=brute).fit(bank)
    assert index.backend_ == brute and "numpy-brute" in npos.knn.backend_names()
    d, i = index.search(queries, 5)
    d_ref, i_ref = KnnIndex("torch").fit(bank).search(queries, 5)
    np.testing.assert_allclose(d, d_ref, atol=1e-5)
    assert (i == i_ref).mean() > 0.99
    # the base class's exclude_self (search k+1, drop the own row) against torch's diagonal mask
    np.testing.assert_allclose(index.kth_distance(bank, 4, exclude_self=True),
                               KnnIndex("torch").fit(bank).kth_distance(bank, 4,
                                                                        exclude_self=True),
                               atol=1e-5)
    # ... and in the synthesis engine (one index per class), equal to the batched engine
    banks = _banks()
    cfg = SynthesisConfig(k=5, select=20, pick=2, candidates=30, keep=2, sigma=0.05)
    base = synthesize(banks, cfg, generator=torch.Generator().manual_seed(0))
    other = synthesize(banks, SynthesisConfig(**{**cfg.__dict__, "backend": brute}),
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(other.source_index, base.source_index)
    torch.testing.assert_close(other.knn_distance, base.knn_distance, atol=1e-4, rtol=0)
    torch.testing.assert_close(other.outliers, base.outliers, atol=1e-4, rtol=0)


def test_register_backend_errors(brute):
    with pytest.raises(ParameterError, match="already registered"):
        register_backend(brute, NumpyBruteForce)
    register_backend(brute, NumpyBruteForce, replace=True)
    with pytest.raises(ParameterError, match="other than 'auto'"):
        register_backend("auto", NumpyBruteForce)
    npos.knn.unregister_backend(brute)
    with pytest.raises(ParameterError, match="The 'backend' parameter must be one of"):
        KnnIndex(brute).fit(_clustered(10))
    with pytest.raises(ParameterError, match="The 'backend' parameter must be one of"):
        SynthesisConfig(backend=brute)


def _spy_registry(monkeypatch):
    """Replace each built-in backend by a subclass that records its name on every fit."""
    fitted = []
    for name in ("torch", "faiss-flat", "faiss-ivf"):
        base = npos.knn.get_backend(name)
        spy = type(f"Spy{base.__name__}", (base,), {
            "fit": lambda self, unit, _base=base, _name=name: (fitted.append(_name),
                                                               _base.fit(self, unit))[1]})
        monkeypatch.setitem(npos.knn._REGISTRY, name, spy)
    return fitted


@pytest.mark.parametrize("torch_max, exact_max, expected",
                         [(20_000, 1_000_000, "torch"), (50, 1_000_000, "faiss-flat"),
                          (50, 60, "faiss-ivf")])
def test_one_auto_policy_for_index_and_engine(monkeypatch, torch_max, exact_max, expected):
    monkeypatch.setattr(npos.knn, "AUTO_TORCH_MAX", torch_max)
    monkeypatch.setattr(npos.knn, "AUTO_EXACT_MAX", exact_max)
    assert resolve_knn_backend("auto", 100) == expected
    fitted = _spy_registry(monkeypatch)
    assert KnnIndex().fit(_clustered(100)).backend_ == expected
    assert fitted == [expected]
    fitted.clear()
    cfg = SynthesisConfig(k=5, select=20, pick=1, candidates=10, keep=1)  # backend auto
    synthesize(_banks(queue=100), cfg, generator=torch.Generator().manual_seed(0))
    # the engine's torch path is its own batched kernel; the others fit one index per class
    assert fitted == ([] if expected == "torch" else [expected] * 3)


def _count_ivf_work(monkeypatch):
    calls = {"train": 0, "tune": 0}
    train, tune = FaissIvfBackend._train, FaissIvfBackend._tune

    def counting_train(self, data):
        calls["train"] += 1
        return train(self, data)

    def counting_tune(self, k):
        calls["tune"] += 1
        return tune(self, k)

    monkeypatch.setattr(FaissIvfBackend, "_train", counting_train)
    monkeypatch.setattr(FaissIvfBackend, "_tune", counting_tune)
    return calls


def test_engine_trains_and_tunes_ivf_once_with_a_cache(monkeypatch):
    pytest.importorskip("faiss")
    calls = _count_ivf_work(monkeypatch)
    cfg = SynthesisConfig(k=5, select=20, pick=2, candidates=30, keep=2, sigma=0.05,
                          backend="faiss-ivf")
    cache = KnnCache()
    first = synthesize(_banks(seed=0), cfg, generator=torch.Generator().manual_seed(0),
                       knn_cache=cache)
    # 3 classes: one training each, one tuning per class for the bank (k + 1) and candidates (k)
    assert calls == {"train": 3, "tune": 6}
    banks = _banks(seed=10)  # the next step's banks: new points, same shapes
    second = synthesize(banks, cfg, generator=torch.Generator().manual_seed(1),
                        knn_cache=cache)
    assert calls == {"train": 3, "tune": 6}
    assert len(first) == len(second) == 3 * 2 * 2
    # a bank of 150 points has one IVF list: the reused lists still give exact distances
    exact = synthesize(banks, SynthesisConfig(**{**cfg.__dict__, "backend": "torch"}),
                       generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(second.knn_distance, exact.knn_distance, atol=1e-4, rtol=0)
    # without a cache every call trains and tunes again
    synthesize(banks, cfg, generator=torch.Generator().manual_seed(1))
    assert calls == {"train": 6, "tune": 12}


def test_index_reuses_trained_lists_and_nprobe_from_cache(monkeypatch):
    pytest.importorskip("faiss")
    calls = _count_ivf_work(monkeypatch)
    bank, queries = _clustered(6000, dim=32, clusters=40, seed=3), _clustered(50, 32, 40, 4)
    cache = KnnCache()
    a = KnnIndex("faiss-ivf", cache=cache, cache_key="bank").fit(bank)
    d_a, i_a = a.search(queries, 10)
    assert calls == {"train": 1, "tune": 1} and a.nlist_ == 32 and a.nprobe_[10] < 32
    b = KnnIndex("faiss-ivf", cache=cache, cache_key="bank").fit(bank)
    d_b, i_b = b.search(queries, 10)
    assert calls == {"train": 1, "tune": 1}
    assert b.nprobe_ == a.nprobe_ and b.recall_ == a.recall_
    np.testing.assert_array_equal(i_b, i_a)
    np.testing.assert_allclose(d_b, d_a)
    # another key, or another bank size, trains its own lists
    KnnIndex("faiss-ivf", cache=cache, cache_key="other").fit(bank)
    KnnIndex("faiss-ivf", cache=cache, cache_key="bank").fit(bank[:5000])
    assert calls["train"] == 3
    cache.clear()
    KnnIndex("faiss-ivf", cache=cache, cache_key="bank").fit(bank).search(queries, 10)
    assert calls == {"train": 4, "tune": 2}
    with pytest.raises(ParameterError, match="cache must be a KnnCache"):
        KnnIndex("faiss-ivf", cache={}).fit(bank)


def test_old_import_paths_still_work():
    import npos.synthesize
    import npos.synthesize.engine as engine
    from npos.synthesize import _kth, knn
    from npos.synthesize.config import BACKENDS

    assert knn is npos.knn
    assert knn.KnnIndex is KnnIndex and npos.synthesize.KnnIndex is KnnIndex
    assert npos.synthesize.knn_kth_distance is npos.knn.knn_kth_distance
    assert _kth.kth_largest_ is npos.knn.kth_largest_
    assert engine.kth_similarity is npos.knn.kth_similarity
    assert BACKENDS == npos.knn.KNN_BACKENDS == ("auto", "torch", "faiss-flat", "faiss-ivf")


def test_backend_names_load_without_torch():
    code = ("import sys, npos.knn, npos.synthesize.config; "
            "print(npos.knn.backend_names()); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "faiss-ivf" in out.stdout


def test_registered_backend_serves_the_knn_score(brute):
    from npos.evaluate import OODScorer

    train, test = _clustered(200, seed=5), _clustered(30, seed=6)
    scores = {backend: OODScorer("knn", knn_k=5, knn_backend=backend, device="cpu")
              .fit(train).score(test)["knn"] for backend in (brute, "torch")}
    np.testing.assert_allclose(scores[brute], scores["torch"], atol=1e-5)
    expected = -KnnIndex("torch").fit(train).kth_distance(test, 5)
    np.testing.assert_allclose(scores[brute], expected, atol=1e-5)
