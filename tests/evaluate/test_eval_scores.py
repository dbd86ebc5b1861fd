import numpy as np
import pytest
import torch

from npos.errors import IncompatibleStoreError, ParameterError
from npos.evaluate.inputs import build_scorer
from npos.evaluate.scores import MahalanobisScore, OODScorer, parse_scores
from npos.store import FeatureStore


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_mcm_equals_direct_softmax(arrays, temperature):
    z, text = arrays["z_test"], arrays["text"]
    scorer = OODScorer(["mcm"], text_embeddings=text, mcm_temperature=temperature, device="cpu")
    cos = _unit(z) @ _unit(text).T
    want = _softmax(cos / temperature).max(axis=1)
    np.testing.assert_allclose(scorer.score(z.astype(np.float32))["mcm"], want, rtol=1e-5)


def test_logit_scores_equal_direct_formulas(arrays):
    z, text = arrays["z_far"], arrays["text"]
    scorer = OODScorer(["msp", "maxlogit", "energy"], text_embeddings=text, device="cpu")
    logits = 100.0 * _unit(z) @ _unit(text).T  # CLIP's logit scale
    got = scorer.score(z)
    np.testing.assert_allclose(got["msp"], _softmax(logits).max(1), rtol=1e-4)
    np.testing.assert_allclose(got["maxlogit"], logits.max(1), rtol=1e-5, atol=1e-4)
    m = logits.max(1)
    np.testing.assert_allclose(got["energy"], m + np.log(np.exp(logits - m[:, None]).sum(1)),
                               rtol=1e-5, atol=1e-4)


def test_mahalanobis_equals_direct_computation(arrays):
    z, y = arrays["z_train"], arrays["y_train"]
    queries = arrays["z_near"]
    det = MahalanobisScore().fit(z, y)
    means = np.stack([z[y == c].mean(0) for c in range(4)])
    centered = z - means[y]
    precision = np.linalg.inv(centered.T @ centered / len(z))
    dist = np.stack([np.einsum("nd,de,ne->n", queries - m, precision, queries - m)
                     for m in means], axis=1)
    np.testing.assert_allclose(det.score(queries), -dist.min(1), rtol=1e-6)
    # Unlabeled rows are ignored; no labeled row at all is an error.
    det2 = MahalanobisScore().fit(np.r_[z, queries], np.r_[y, -np.ones(len(queries), int)])
    np.testing.assert_allclose(det2.score(queries), det.score(queries), rtol=1e-8)
    with pytest.raises(ParameterError, match="labeled train rows"):
        MahalanobisScore().fit(z, -np.ones(len(z), int))


def test_knn_equals_bruteforce_numpy(arrays):
    bank, queries, k = arrays["z_train"], arrays["z_near"], 7
    scorer = OODScorer(["knn"], knn_k=k, knn_backend="torch", device="cpu").fit(bank)
    d = np.linalg.norm(_unit(queries)[:, None, :] - _unit(bank)[None, :, :], axis=2)
    want = -np.sort(d, axis=1)[:, k - 1]
    np.testing.assert_allclose(scorer.score(queries)["knn"], want, atol=1e-5)


def test_knn_faiss_backend_matches_torch(arrays):
    bank, queries = arrays["z_train"], arrays["z_far"]
    a = OODScorer(["knn"], knn_k=5, knn_backend="torch", device="cpu").fit(bank).score(queries)
    b = OODScorer(["knn"], knn_k=5, knn_backend="faiss-flat", device="cpu").fit(bank).score(
        queries)
    np.testing.assert_allclose(a["knn"], b["knn"], atol=1e-5)


def test_head_space_scores(arrays, contract_head):
    head = contract_head(16, 4, fingerprint={"model": "test-model"}, temperature=0.1)
    z = torch.as_tensor(arrays["z_test"], dtype=torch.float32)
    bank = torch.as_tensor(arrays["z_train"], dtype=torch.float32)
    scorer = OODScorer(["mcm", "msp", "head", "knn"], head=head, knn_k=3, knn_backend="torch",
                       device="cpu").fit(bank)
    got = scorer.score(z)
    logits = head.logits(z).double().numpy()
    np.testing.assert_allclose(got["mcm"], _softmax(logits * 0.1).max(1), rtol=1e-5)
    np.testing.assert_allclose(got["msp"], _softmax(logits).max(1), rtol=1e-5)
    np.testing.assert_allclose(got["head"], head.ood_logit(z).numpy(), rtol=1e-6)
    h, hb = _unit(head.project(z).numpy()), _unit(head.project(bank).numpy())
    d = np.linalg.norm(h[:, None] - hb[None], axis=2)
    np.testing.assert_allclose(got["knn"], -np.sort(d, axis=1)[:, 2], atol=1e-5)


def test_scorer_parameter_errors(arrays):
    with pytest.raises(ParameterError, match="unknown score"):
        parse_scores("mcm,odin")
    with pytest.raises(ParameterError, match="need class logits"):
        OODScorer(["mcm"], device="cpu")
    with pytest.raises(ParameterError, match="needs a trained head"):
        OODScorer(["head"], text_embeddings=arrays["text"], device="cpu")
    with pytest.raises(ParameterError, match="need train embeddings"):
        OODScorer(["knn"], device="cpu").fit(None)
    with pytest.raises(ParameterError, match="'k' parameter of knn must be <= the 400"):
        OODScorer(["knn"], knn_k=401, knn_backend="torch", device="cpu").fit(arrays["z_train"])
    with pytest.raises(ParameterError, match="mcm_temperature"):
        OODScorer(["mcm"], text_embeddings=arrays["text"], mcm_temperature=0, device="cpu")


def test_build_scorer_refuses_other_encoder_or_dim(world, make_store, rng):
    test = FeatureStore.open(world["test"])
    other_model = make_store(world["tmp"] / "m.zarr", rng.normal(size=(20, 16)), model="other")
    other_dim = make_store(world["tmp"] / "d.zarr", rng.normal(size=(20, 8)))
    with pytest.raises(IncompatibleStoreError, match=r"OOD store 'x'.*model is 'other'"):
        build_scorer({"ID store": test, "OOD store 'x'": other_model}, device="cpu")
    with pytest.raises(IncompatibleStoreError, match="dim is 8 there but 16"):
        build_scorer({"ID store": test}, train=other_dim, scores="knn", device="cpu")


def test_build_scorer_refuses_head_of_other_encoder(world, contract_head):
    test = FeatureStore.open(world["test"])
    head = contract_head(16, 4, fingerprint={**test.fingerprint(), "model": "ViT-B-16"})
    with pytest.raises(IncompatibleStoreError, match="head '<in-memory head>' does not match"):
        build_scorer({"ID store": test}, head=head, device="cpu")


def test_build_scorer_defaults_and_text_source(world):
    test = FeatureStore.open(world["test"])
    setup = build_scorer({"ID store": test}, train=world["train"], knn_backend="torch",
                         device="cpu")
    assert setup.scorer.scores == ["mcm", "knn"]
    assert setup.text_source == world["train"]  # the train store defines the ID classes
    far = FeatureStore.open(world["far"])
    assert build_scorer({"store": far}, train=world["train"], device="cpu",
                        scores="mcm").scorer.scores == ["mcm"]
    with pytest.raises(ParameterError, match="no text embeddings"):
        build_scorer({"store": far}, scores="mcm", device="cpu")
    with pytest.raises(ParameterError, match="no score can be computed"):
        build_scorer({"store": far}, device="cpu")
    with pytest.raises(ParameterError, match="need a train store"):
        build_scorer({"store": test}, scores="mcm,mahalanobis", device="cpu")


def test_knn_ivf_missing_neighbours_score_lowest(arrays):
    # 400 bank rows in ivf_nlist(400) = 4 lists of ~100; probing one list cannot return
    # K = 300 neighbours, so KnnIndex reports +inf and the score is clipped to -2.
    scorer = OODScorer(["knn"], knn_k=300, knn_backend="faiss-ivf", device="cpu")
    scorer.fit(arrays["z_train"])
    scorer.knn.index_.nprobe = 1
    raw = scorer.knn.index_.kth_distance(arrays["z_far"], 300)
    assert np.isinf(raw).any()
    got = scorer.score(arrays["z_far"])["knn"]
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[np.isinf(raw)], -2.0)
    np.testing.assert_allclose(got[~np.isinf(raw)], -raw[~np.isinf(raw)], rtol=1e-6)
