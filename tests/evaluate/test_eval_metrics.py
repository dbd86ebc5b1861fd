import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from npos.errors import ParameterError
from npos.evaluate.metrics import accuracy, average_metrics, fpr_at_tpr, ood_metrics, roc_curve


def _sklearn(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    return {"auroc": roc_auc_score(y, s), "aupr_in": average_precision_score(y, s),
            "aupr_out": average_precision_score(1 - y, -s)}


def _fpr95_from_sklearn_roc(id_s, ood_s):
    # Independent route: the first ROC point (highest threshold) reaching TPR >= 95 %.
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = sk_roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    return fpr[np.searchsorted(tpr, 0.95 - 1e-12)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tied", [False, True])
def test_metrics_equal_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    id_s = rng.normal(1.0, 1.0, rng.integers(20, 300))
    ood_s = rng.normal(0.0, 1.2, rng.integers(20, 300))
    if tied:  # few distinct values: many ties within and across the two sets
        id_s, ood_s = np.round(id_s * 2) / 2, np.round(ood_s * 2) / 2
    got = ood_metrics(id_s, ood_s)
    want = _sklearn(id_s, ood_s)
    for key in ("auroc", "aupr_in", "aupr_out"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["fpr95"] == pytest.approx(_fpr95_from_sklearn_roc(id_s, ood_s))
    assert set(got) == {"fpr95", "auroc", "aupr_in", "aupr_out"}
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_all_tied_scores():
    got = ood_metrics(np.zeros(10), np.zeros(30))
    assert got["auroc"] == 0.5
    assert got["aupr_in"] == pytest.approx(10 / 40)
    assert got["aupr_out"] == pytest.approx(30 / 40)
    assert got["fpr95"] == 1.0


def test_fpr95_hand_computed():
    # 20 ID scores 1..20: keeping >= 95 % (19 of 20) allows the threshold 2 at most.
    id_s = np.arange(1, 21, dtype=float)
    assert fpr_at_tpr(id_s, np.array([1.0, 1.5, 2.0, 2.5, 30.0])) == pytest.approx(3 / 5)
    # 10 ID scores: 95 % of 10 = 9.5 -> 10 rows needed -> threshold = the smallest ID score.
    id_s = np.arange(1, 11, dtype=float)
    assert fpr_at_tpr(id_s, np.array([0.5, 1.0, 0.99])) == pytest.approx(1 / 3)
    # 100 ID scores: threshold = 95th largest = 6; OOD ties at the threshold count.
    id_s = np.arange(1, 101, dtype=float)
    assert fpr_at_tpr(id_s, np.array([5.0, 5.999, 6.0, 7.0])) == pytest.approx(2 / 4)
    # Perfect separation and perfect inversion.
    assert ood_metrics([3.0, 4.0], [1.0, 2.0])["fpr95"] == 0.0
    assert ood_metrics([1.0, 2.0], [3.0, 4.0])["fpr95"] == 1.0


def test_fpr95_ties_at_threshold_in_id():
    # ID ties at the threshold keep more than 95 %: threshold stays at the tied value.
    id_s = np.r_[np.full(10, 1.0), np.arange(2, 12, dtype=float)]  # 20 rows
    assert fpr_at_tpr(id_s, np.array([0.9, 1.0, 1.5])) == pytest.approx(2 / 3)


def test_degenerate_inputs_raise():
    with pytest.raises(ParameterError, match="id_scores is empty"):
        ood_metrics([], [1.0])
    with pytest.raises(ParameterError, match="ood_scores is empty"):
        ood_metrics([1.0], [])
    with pytest.raises(ParameterError, match="non-finite"):
        ood_metrics([1.0, np.nan], [0.0])
    with pytest.raises(ParameterError, match="1-D"):
        ood_metrics(np.zeros((2, 2)), [0.0])
    with pytest.raises(ParameterError, match="tpr"):
        fpr_at_tpr([1.0], [0.0], tpr=0.0)
    with pytest.raises(ParameterError, match="zero OOD sets"):
        average_metrics({})


def test_roc_curve_matches_sklearn(rng):
    id_s, ood_s = rng.normal(1, 1, 50), np.round(rng.normal(0, 1, 40), 1)
    fpr, tpr = roc_curve(id_s, ood_s)
    y = np.r_[np.ones(50), np.zeros(40)]
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_average_and_accuracy():
    per = {"a": {"fpr95": 0.2, "auroc": 0.9, "aupr_in": 0.8, "aupr_out": 0.7},
           "b": {"fpr95": 0.4, "auroc": 0.7, "aupr_in": 0.6, "aupr_out": 0.5}}
    assert average_metrics(per) == pytest.approx(
        {"fpr95": 0.3, "auroc": 0.8, "aupr_in": 0.7, "aupr_out": 0.6})
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, -1])) == pytest.approx(2 / 3)
    assert accuracy(np.array([0, 1]), np.array([-1, -1])) is None
