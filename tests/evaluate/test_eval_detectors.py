"""The detector registry: registration rules, derived input checks, every built-in detector
against a plain numpy reference, and a detector registered here used by both commands."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import ParameterError
from npos.evaluate import OODScorer, evaluate, ood_metrics
from npos.evaluate.detectors import Detector, EnergyScore, HeadScore, KNNScore, \
    MahalanobisScore, MaxLogitScore, MCMScore, MSPScore, default_scores, detector_names, \
    get_detector, register_detector, to_numpy, unregister_detector
from npos.evaluate.detectors import base as registry

BUILT_INS = ["mcm", "msp", "maxlogit", "energy", "knn", "mahalanobis", "head"]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class MaxCosine(Detector):
    """Largest cosine similarity to a class embedding (needs a classifier)."""

    input = "cosine"

    def score(self, cosine):
        return to_numpy(cosine).max(axis=1)


class Centroid(Detector):
    """Negative distance to the mean of the labeled train features (fitted, with labels)."""

    input = "features"
    needs_labels = True

    def fit(self, features, labels=None):
        self.mean_ = features[labels >= 0].mean(axis=0)
        return self

    def score(self, features):
        return -np.linalg.norm(to_numpy(features) - self.mean_, axis=1)


@pytest.fixture
def registered():
    """Register the two test detectors for one test, then remove them."""
    register_detector("maxcos")(MaxCosine)
    register_detector("centroid")(Centroid)
    yield
    unregister_detector("maxcos")
    unregister_detector("centroid")


# ---------------------------------------------------------------------- registry
def test_built_ins_are_registered_in_report_order_with_derived_needs():
    assert detector_names()[:7] == BUILT_INS
    needs = {n: (get_detector(n).needs_classifier, get_detector(n).needs_train,
                 get_detector(n).needs_labels, get_detector(n).needs_head) for n in BUILT_INS}
    assert needs == {"mcm": (True, False, False, False), "msp": (True, False, False, False),
                     "maxlogit": (True, False, False, False),
                     "energy": (True, False, False, False), "knn": (False, True, False, False),
                     "mahalanobis": (False, True, True, False),
                     "head": (False, False, False, True)}
    assert get_detector("knn") is KNNScore and get_detector("knn").name == "knn"


def test_registry_errors():
    with pytest.raises(ParameterError, match=r"unknown detector 'odin'; available: mcm, msp, "
                                             r"maxlogit, energy, knn, mahalanobis, head"):
        get_detector("odin")
    with pytest.raises(ParameterError, match=r"detector 'knn' is already registered "
                                             r"\(KNNScore\); pass replace=True"):
        register_detector("knn")(MaxCosine)
    with pytest.raises(ParameterError, match="detector name 'a b' must start with"):
        register_detector("a b")
    with pytest.raises(ParameterError, match="must be a subclass of npos.evaluate.Detector"):
        register_detector("plain")(object)
    with pytest.raises(ParameterError, match=r"The 'input' parameter of Bad must be one of "
                                             r"'features', 'cosine', 'logits', 'ood_logit'"):
        type("Bad", (Detector,), {"input": "pixels"})
    with pytest.raises(ParameterError, match="unknown detector 'nope'"):
        unregister_detector("nope")
    assert detector_names()[:7] == BUILT_INS  # nothing above changed the registry


def test_replace_and_unregister():
    register_detector("maxcos")(MaxCosine)
    try:
        class Other(MaxCosine):
            pass

        with pytest.raises(ParameterError, match="already registered"):
            register_detector("maxcos")(Other)
        register_detector("maxcos", replace=True)(Other)
        assert get_detector("maxcos") is Other
    finally:
        unregister_detector("maxcos")
    assert "maxcos" not in detector_names()


def test_default_scores_follow_the_registry(registered):
    assert default_scores(has_classifier=True, has_train=True, has_head=True) == \
        ["mcm", "knn", "head"]
    assert default_scores(has_classifier=False, has_train=True, has_head=False) == ["knn"]

    class Always(Detector):
        default = True

        def score(self, features):
            return np.zeros(len(features))

    register_detector("always")(Always)
    try:
        assert default_scores(has_classifier=False, has_train=False, has_head=False) == \
            ["always"]
    finally:
        unregister_detector("always")
    with pytest.raises(ParameterError, match="no score can be computed"):
        default_scores(has_classifier=False, has_train=False, has_head=False)


def test_entry_point_plugins_are_loaded_once(monkeypatch):
    class EntryPoint:
        name, value = "maxcos", "tests:maxcos"
        loads = 0

        def load(self):
            EntryPoint.loads += 1
            register_detector("maxcos")(MaxCosine)

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_entry_points", lambda: [EntryPoint()])
    try:
        assert get_detector("maxcos") is MaxCosine and "maxcos" in detector_names()
        assert EntryPoint.loads == 1
    finally:
        unregister_detector("maxcos")

    class Broken(EntryPoint):
        def load(self):
            raise ImportError("no module named 'gone'")

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "_entry_points", lambda: [Broken()])
    with pytest.raises(ParameterError, match=r"detector plugin 'maxcos' \(tests:maxcos\) "
                                             r"failed to load: ImportError"):
        detector_names()


def test_detector_with_wrong_output_shape_is_refused(arrays):
    class Flat(Detector):
        def score(self, features):
            return np.zeros((len(features), 2))

    register_detector("flat")(Flat)
    try:
        with pytest.raises(ParameterError, match=r"detector 'flat' returned scores of shape "
                                                 r"\(150, 2\) for 150 rows"):
            OODScorer("flat", device="cpu").score(arrays["z_test"])
    finally:
        unregister_detector("flat")


# ---------------------------------------------------------------------- built-ins vs numpy
@pytest.fixture
def logits_data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(40, 6)) * 3


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_mcm_detector_equals_numpy(logits_data, temperature):
    cos = np.tanh(logits_data)  # values in (-1, 1), like cosines
    got = MCMScore(temperature=temperature).score(cos)
    np.testing.assert_allclose(got, _softmax(cos / temperature).max(1), rtol=1e-12)
    torch_in = MCMScore(temperature=temperature).score(torch.as_tensor(cos))
    np.testing.assert_array_equal(got, torch_in)
    with pytest.raises(ParameterError, match=r"The 'temperature' parameter of mcm must be a "
                                             r"float in the range \(0, inf\)"):
        MCMScore(temperature=-1.0)


def test_logit_detectors_equal_numpy(logits_data):
    l = logits_data
    np.testing.assert_allclose(MSPScore().score(l), _softmax(l).max(1), rtol=1e-12)
    np.testing.assert_array_equal(MaxLogitScore().score(l), l.max(1))
    np.testing.assert_allclose(EnergyScore().score(l), np.log(np.exp(l).sum(1)), rtol=1e-12)
    np.testing.assert_array_equal(HeadScore().score(l[:, :1]), l[:, 0])


def test_knn_detector_equals_numpy(arrays):
    bank, queries, k = arrays["z_train"], arrays["z_far"], 4
    det = KNNScore(k=k, backend="torch", device="cpu").fit(bank)
    d = np.linalg.norm(_unit(queries)[:, None] - _unit(bank)[None], axis=2)
    np.testing.assert_allclose(det.score(queries), -np.sort(d, axis=1)[:, k - 1], atol=1e-5)
    assert det.facts() == {"backend_used": "torch"}
    with pytest.raises(ParameterError, match="KNNScore is not fitted"):
        KNNScore().score(queries)
    with pytest.raises(ParameterError, match="knn was fitted on dim 16"):
        det.score(queries[:, :5])
    with pytest.raises(ParameterError, match=r"The 'k' parameter of knn must be an int in "
                                             r"the range \[1, inf\)\. Got 0 instead\."):
        KNNScore(k=0)
    with pytest.raises(ParameterError, match="The 'backend' parameter of knn must be one of"):
        KNNScore(backend="annoy")


def test_mahalanobis_detector_errors(arrays):
    z, y = arrays["z_train"], arrays["y_train"]
    with pytest.raises(ParameterError, match="mahalanobis needs train labels"):
        MahalanobisScore().fit(z)
    with pytest.raises(ParameterError, match=r"features of shape \(N, D\)"):
        MahalanobisScore().fit(z[:, 0], y)
    with pytest.raises(ParameterError, match="is not fitted"):
        MahalanobisScore().score(z)
    with pytest.raises(ParameterError, match="fitted on dim 16"):
        MahalanobisScore().fit(z, y).score(z[:, :3])


# ---------------------------------------------------------------------- registered, in use
def test_registered_detectors_in_the_scorer_match_numpy(arrays, registered):
    scorer = OODScorer(["maxcos", "centroid"], text_embeddings=arrays["text"], device="cpu")
    scorer.fit(arrays["z_train"], arrays["y_train"])
    got = scorer.score(arrays["z_near"])
    np.testing.assert_allclose(got["maxcos"], (_unit(arrays["z_near"]) @
                                               _unit(arrays["text"]).T).max(1), rtol=1e-5)
    mean = arrays["z_train"].astype(np.float32).mean(0)
    np.testing.assert_allclose(got["centroid"],
                               -np.linalg.norm(arrays["z_near"] - mean, axis=1), rtol=1e-5)
    with pytest.raises(ParameterError, match="score.s. maxcos need class logits"):
        OODScorer("maxcos", device="cpu")
    with pytest.raises(ParameterError, match="centroid need train embeddings"):
        OODScorer("centroid", device="cpu").fit(None)
    with pytest.raises(ParameterError, match="centroid needs train labels"):
        OODScorer("centroid", device="cpu").fit(arrays["z_train"])


def test_registered_detector_from_npos_evaluate(world, registered):
    out = world["tmp"] / "rep"
    result = CliRunner().invoke(cli, [
        "evaluate", "--id", world["test"], "--ood", f"far={world['far']}", "--ood",
        f"near={world['near']}", "--train", world["train"], "--scores", "mcm,maxcos,centroid",
        "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| maxcos" in result.output and "| centroid" in result.output
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["scores"]) == ["mcm", "maxcos", "centroid"]
    assert doc["settings"]["config"]["scores"] == ["mcm", "maxcos", "centroid"]
    cos = {n: (_unit(world[f"z_{n}"]) @ _unit(world["text"]).T).max(1)
           for n in ("test", "far", "near")}
    for ood in ("far", "near"):
        want = ood_metrics(cos["test"], cos[ood])
        for key, value in want.items():
            assert doc["scores"]["maxcos"][ood][key] == pytest.approx(value, abs=1e-6)
    assert (out / "plots" / "hist_centroid.png").exists()
    assert "## centroid" in (out / "report.md").read_text()
    # Without --train the fitted detector is refused before any work, naming the flag.
    result = CliRunner().invoke(cli, ["evaluate", "--id", world["test"], "--ood",
                                      f"far={world['far']}", "--scores", "centroid",
                                      "--out", str(world["tmp"] / "rep2")])
    assert result.exit_code == 2 and "centroid need a train store: pass --train" in \
        result.output


def test_registered_detector_from_npos_score(world, registered):
    out = world["tmp"] / "s.csv"
    result = CliRunner().invoke(cli, ["score", world["near"], "--train", world["train"],
                                      "--scores", "centroid,maxcos", "--device", "cpu",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "scored 90 rows (centroid, maxcos)" in result.output
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "centroid", "maxcos"]
    z = world["z_near"]
    mean = world["z_train"].astype(np.float32).mean(0)
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]],
                               -np.linalg.norm(z - mean, axis=1), rtol=1e-5)
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]],
                               (_unit(z) @ _unit(world["text"]).T).max(1), rtol=1e-5)


def test_registered_detector_from_the_api(world, registered):
    res = evaluate(world["test"], {"near": world["near"]}, scores="maxcos", device="cpu")
    np.testing.assert_allclose(res.id_scores["maxcos"],
                               (_unit(world["z_test"]) @ _unit(world["text"]).T).max(1),
                               rtol=1e-5)
