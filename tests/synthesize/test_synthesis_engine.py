import pytest
import torch

from npos.errors import ParameterError
from npos.synthesize import SynthesisConfig, synthesize


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


SMALL = dict(k=5, select=12, pick=3, candidates=40, keep=2)


@pytest.mark.parametrize("noise_space,sigma", [("sphere", 0.05), ("raw", 0.3)])
def test_batched_engine_equals_plain_loop(banks, noise_space, sigma, ref):
    cfg = SynthesisConfig(**SMALL, sigma=sigma, noise_space=noise_space, backend="torch")
    # A tiny memory budget forces one class per chunk and row-blocked products: chunking
    # must not change anything.
    for budget in (1 << 30, 4096):
        got = synthesize(banks, cfg, generator=_gen(3), memory_budget=budget)
        out, labels, dist, src = ref.npos(banks, cfg, 3)
        assert torch.equal(got.labels, labels)
        assert torch.equal(got.source_index, src)
        torch.testing.assert_close(got.knn_distance, dist.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.outliers, out.float(), atol=1e-5, rtol=1e-5)


def test_ready_mask_and_output_layout(banks, ref):
    cfg = SynthesisConfig(**SMALL, sigma=0.05)
    ready = torch.tensor([False, True, False, True])
    got = synthesize(banks, cfg, ready=ready, generator=_gen(1))
    out, labels, dist, src = ref.npos(banks, cfg, 1, ready=ready)
    assert got.outliers.shape == (2 * 3 * 2, banks.shape[2])
    assert got.labels.tolist() == [1] * 6 + [3] * 6 and torch.equal(got.labels, labels)
    torch.testing.assert_close(got.outliers, out.float(), atol=1e-5, rtol=1e-5)
    none = synthesize(banks, cfg, ready=torch.zeros(4, dtype=torch.bool), generator=_gen())
    assert len(none) == 0 and none.outliers.shape == (0, banks.shape[2])


def test_seeded_determinism(banks):
    cfg = SynthesisConfig(**SMALL)
    a = synthesize(banks, cfg, generator=_gen(7))
    b = synthesize(banks, cfg, generator=_gen(7))
    c = synthesize(banks, cfg, generator=_gen(8))
    assert torch.equal(a.outliers, b.outliers) and torch.equal(a.knn_distance, b.knn_distance)
    assert not torch.equal(a.outliers, c.outliers)


def test_self_is_not_a_neighbour(ref):
    # Points 0 and 1 coincide: each one's nearest *other* point is at distance 0, while
    # every other point's nearest neighbour is a distinct point (distance > 0).
    bank = torch.nn.functional.normalize(torch.randn(1, 30, 8, generator=_gen()), dim=-1)
    bank[0, 1] = bank[0, 0]
    cfg = SynthesisConfig(k=1, select=30, pick=1, candidates=4, keep=1)
    stats = synthesize(bank, cfg, generator=_gen(), return_stats=True).stats
    assert stats.bank_distance[0, :2].max() < 1e-3
    assert stats.bank_distance[0, 2:].min() > 1e-2
    torch.testing.assert_close(stats.bank_distance[0].double(),
                               ref.kth(bank[0], bank[0], 1, exclude_self=True),
                               atol=1e-3, rtol=0)
    cfg5 = SynthesisConfig(k=5, select=30, pick=1, candidates=4, keep=1)
    stats = synthesize(bank, cfg5, generator=_gen(), return_stats=True).stats
    torch.testing.assert_close(stats.bank_distance[0].double(),
                               ref.kth(bank[0], bank[0], 5, exclude_self=True),
                               atol=1e-5, rtol=0)


def test_kept_outliers_lie_beyond_their_boundary_points(banks):
    cfg = SynthesisConfig(k=5, select=10, pick=3, candidates=200, keep=2, sigma=0.05)
    res = synthesize(banks, cfg, generator=_gen(), return_stats=True)
    stats = res.stats
    source_d = stats.bank_distance[res.labels, res.source_index]
    assert (res.knn_distance > source_d).all()
    # The boundary really is the top of the bank's K-th-NN distances.
    assert torch.isin(res.source_index.view(4, -1), stats.boundary).all()
    threshold = stats.bank_distance.gather(1, stats.boundary).min(dim=1).values
    assert (stats.bank_distance.sort(dim=1, descending=True).values[:, 9] == threshold).all()
    # Rejection is per picked point: each pick's kept pair are its two farthest candidates.
    per_pick = stats.candidate_distance.topk(2, dim=-1).values.reshape(-1)
    torch.testing.assert_close(res.knn_distance, per_pick)


def test_sphere_outliers_keep_source_norm(banks):
    res = synthesize(banks, SynthesisConfig(**SMALL, sigma=0.1), generator=_gen())
    source_norm = banks[res.labels, res.source_index].norm(dim=-1)
    torch.testing.assert_close(res.outliers.norm(dim=-1), source_norm)
    raw = synthesize(banks, SynthesisConfig(**SMALL, sigma=0.3, noise_space="raw"),
                     generator=_gen())
    assert not torch.allclose(raw.outliers.norm(dim=-1),
                              banks[raw.labels, raw.source_index].norm(dim=-1))


@pytest.mark.parametrize("pick,keep", [(1, 1), (1, 3), (3, 1)])
def test_pick_and_keep_of_one(banks, pick, keep, ref):
    cfg = SynthesisConfig(k=5, select=12, pick=pick, candidates=20, keep=keep, sigma=0.05)
    got = synthesize(banks, cfg, generator=_gen(2))
    out, labels, dist, _ = ref.npos(banks, cfg, 2)
    assert got.outliers.shape == (4 * pick * keep, banks.shape[2])
    torch.testing.assert_close(got.outliers, out.float(), atol=1e-5, rtol=1e-5)


def test_dtype_and_input_errors(banks):
    cfg = SynthesisConfig(**SMALL)
    res = synthesize(banks.double(), cfg, generator=_gen())
    assert res.outliers.dtype == torch.float64 and res.knn_distance.dtype == torch.float32
    assert res.labels.dtype == torch.int64
    with pytest.raises(ParameterError, match=r"banks must be a tensor of shape \(classes"):
        synthesize(banks[0], cfg, generator=_gen())
    with pytest.raises(ParameterError, match="ready must be a bool tensor of shape"):
        synthesize(banks, cfg, ready=torch.ones(3, dtype=torch.bool), generator=_gen())
    with pytest.raises(ParameterError, match="torch.Generator"):
        synthesize(banks, cfg, generator=0)
    bad = banks.clone()
    bad[2, 5, 0] = float("nan")
    with pytest.raises(ParameterError, match="NaN or Inf"):
        synthesize(bad, cfg, generator=_gen())
    ready = torch.tensor([True, True, False, True])
    assert len(synthesize(bad, cfg, ready=ready, generator=_gen())) == 3 * 3 * 2


@pytest.mark.parametrize("kwargs,bank,match", [
    (dict(method="knn"), None,
     r"The 'method' parameter must be one of 'npos', 'vos', 'gaussian'. Got 'knn' instead."),
    (dict(noise_space="ball"), None, r"The 'noise_space' parameter must be one of"),
    (dict(backend="annoy"), None, r"The 'backend' parameter must be one of 'auto', 'torch'"),
    (dict(k=0), None, r"The 'k' parameter must be an int in the range \[1, inf\). Got 0"),
    (dict(k=2.5), None, r"The 'k' parameter must be an int .* Got 2.5 instead"),
    (dict(pick=True), None, r"The 'pick' parameter must be an int .* Got True instead"),
    (dict(candidates=0), None, r"The 'candidates' parameter must be an int in the range"),
    (dict(sigma=0.0), None, r"The 'sigma' parameter must be a float in the range \(0, inf\)"),
    (dict(sigma=float("nan")), None, r"The 'sigma' parameter must be a float"),
    (dict(sigma=-1), None, r"The 'sigma' parameter"),
    (dict(pick=301), None,
     r"The 'pick' parameter must be an int in the range \[1, 300\] \(pick <= select\)"),
    (dict(keep=1501), None,
     r"The 'keep' parameter must be an int in the range \[1, 1500\] \(keep <= candidates\)"),
    (dict(), 400, r"The 'k' parameter must be an int in the range \[1, 400\) "
                  r"\(k < bank size 400: the K-th nearest other point\). Got 400 instead."),
    (dict(k=10), 200, r"The 'select' parameter must be an int in the range \[3, 200\] "
                      r"\(pick <= select <= bank size 200\). Got 300 instead."),
    (dict(k=10, method="gaussian", pick=30), 20,
     r"The 'pick' parameter must be an int in the range \[1, 20\] \(pick <= bank size 20\)"),
    (dict(k=2), 1, r"The 'bank size' parameter must be an int in the range \[2, inf\)"),
])
def test_parameter_errors(kwargs, bank, match):
    with pytest.raises(ParameterError, match=match):
        SynthesisConfig(**kwargs).validate(bank_size=bank)


def test_parameter_error_from_synthesize(ref):
    banks = ref.banks(2, 50, 8)
    with pytest.raises(ParameterError, match=r"The 'k' parameter .* \(k < bank size 50"):
        synthesize(banks, SynthesisConfig(k=50, select=10), generator=_gen())


def test_config_defaults_and_sigma_resolution():
    cfg = SynthesisConfig()
    assert (cfg.method, cfg.k, cfg.select, cfg.pick, cfg.candidates, cfg.keep) == \
        ("npos", 400, 300, 3, 1500, 2)
    assert cfg.sigma is None and cfg.resolved_sigma == 0.01
    assert SynthesisConfig(noise_space="raw").resolved_sigma == 0.1
    assert SynthesisConfig(sigma=0.2).resolved_sigma == 0.2
    assert cfg.to_dict()["resolved_sigma"] == 0.01
