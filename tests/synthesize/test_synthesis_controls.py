import pytest
import torch

from npos.synthesize import SynthesisConfig, synthesize


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("noise_space,sigma", [("sphere", 0.05), ("raw", 0.3)])
def test_gaussian_control_equals_plain_loop(banks, ref, noise_space, sigma):
    cfg = SynthesisConfig(method="gaussian", k=5, pick=4, keep=3, sigma=sigma,
                          noise_space=noise_space)
    got = synthesize(banks, cfg, generator=_gen(5), memory_budget=4096, return_stats=True)
    out, dist, picks = ref.gaussian(banks, cfg, 5)
    assert got.outliers.shape == (4 * 4 * 3, banks.shape[2])
    assert torch.equal(got.source_index, picks.repeat_interleave(3, dim=1).reshape(-1))
    torch.testing.assert_close(got.outliers, out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.knn_distance, dist.float(), atol=1e-5, rtol=1e-5)
    assert got.stats.boundary is None and got.stats.candidate_distance.shape == (4, 4, 3)
    if noise_space == "sphere":
        torch.testing.assert_close(got.outliers.norm(dim=-1),
                                   banks[got.labels, got.source_index].norm(dim=-1))


@pytest.mark.parametrize("noise_space", ["sphere", "raw"])
def test_vos_control_equals_plain_loop(banks, ref, noise_space):
    cfg = SynthesisConfig(method="vos", k=5, pick=2, candidates=300, keep=3,
                          noise_space=noise_space)
    got = synthesize(banks, cfg, generator=_gen(9), memory_budget=4096)
    out, dist, _, _ = ref.vos(banks, cfg, 9)
    assert got.outliers.shape == (4 * 2 * 3, banks.shape[2])
    assert (got.source_index == -1).all()
    assert got.labels.tolist() == sum(([c] * 6 for c in range(4)), [])
    torch.testing.assert_close(got.outliers, out.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.knn_distance, dist.float(), atol=1e-4, rtol=1e-4)


def test_vos_keeps_the_lowest_likelihood_samples(banks, ref):
    cfg = SynthesisConfig(method="vos", k=5, pick=1, candidates=400, keep=5, noise_space="raw")
    got = synthesize(banks, cfg, generator=_gen(2))
    _, _, means, cov = ref.vos(banks, cfg, 2)
    # Reproduce every sample of class 0 and score it with an independent log-density.
    g = _gen(2)
    eps = torch.randn((400, banks.shape[2]), generator=g).double()
    samples = means[0] + eps @ torch.linalg.cholesky(cov).T
    gauss = torch.distributions.MultivariateNormal(means[0], covariance_matrix=cov)
    logp = gauss.log_prob(samples)
    kept_logp = gauss.log_prob(got.outliers[:5].double())
    assert kept_logp.max() <= logp.sort().values[4] + 1e-6  # the 5 least likely of 400
    assert torch.allclose(kept_logp.sort().values, logp.sort().values[:5], atol=1e-4)


def test_controls_are_seeded_and_support_one(banks):
    for method in ("gaussian", "vos"):
        cfg = SynthesisConfig(method=method, k=5, pick=1, candidates=10, keep=1)
        a = synthesize(banks, cfg, generator=_gen(1))
        b = synthesize(banks, cfg, generator=_gen(1))
        assert len(a) == 4 and torch.equal(a.outliers, b.outliers)
        assert not torch.equal(a.outliers, synthesize(banks, cfg, generator=_gen(2)).outliers)
