import json

import numpy as np
import pytest
from PIL import Image

from npos.evaluate import OutputExistsError, evaluate, ood_metrics, write_report
from npos.evaluate.evaluation import parse_ood_specs
from npos.errors import ParameterError

SCORES = ["mcm", "energy", "mahalanobis"]


@pytest.fixture
def result(world):
    return evaluate(world["test"], {"far": world["far"], "near": world["near"]},
                    scores=SCORES, train=world["train"], device="cpu", batch_size=40)


def test_evaluate_metrics_match_direct_computation(world, result):
    # The scores of every row, and metrics over them, equal a one-shot computation.
    from npos.evaluate.scores import OODScorer

    scorer = OODScorer(SCORES, text_embeddings=world["text"], device="cpu")
    scorer.fit(world["z_train"], world["y_train"])
    id_s = scorer.score(world["z_test"].astype(np.float32))
    for name in SCORES:
        np.testing.assert_allclose(result.id_scores[name], id_s[name], rtol=1e-6)
        far = scorer.score(world["z_far"].astype(np.float32))[name]
        assert result.metrics[name]["far"] == pytest.approx(ood_metrics(id_s[name], far),
                                                            abs=1e-9)
        avg = result.metrics[name]["average"]
        assert avg["auroc"] == pytest.approx(
            (result.metrics[name]["far"]["auroc"] + result.metrics[name]["near"]["auroc"]) / 2)
    cos = world["z_test"] @ world["text"].T  # argmax is scale-invariant per row
    assert result.id_accuracy == pytest.approx(np.mean(cos.argmax(1) == world["y_test"]))
    assert result.metrics["mcm"]["far"]["auroc"] > 0.9  # the generated OOD is separable


def test_report_files_and_metrics_json_shape(world, result):
    out = world["tmp"] / "report"
    write_report(result, out)
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc) == {"id_accuracy", "scores", "settings"}
    assert isinstance(doc["id_accuracy"], float)
    assert list(doc["scores"]) == SCORES
    for per in doc["scores"].values():
        assert list(per) == ["far", "near", "average"]
        for metrics in per.values():
            assert set(metrics) == {"fpr95", "auroc", "aupr_in", "aupr_out"}
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())
    md = (out / "report.md").read_text()
    auroc = doc["scores"]["mcm"]["near"]["auroc"]
    assert f"{100 * auroc:.2f}" in md
    assert md.index("| near") < md.index("| **average**")
    for score in SCORES:
        for kind in ("hist", "roc"):
            with Image.open(out / "plots" / f"{kind}_{score}.png") as img:
                img.load()
                assert img.format == "PNG" and img.size[0] > 100
    assert not [p for p in world["tmp"].iterdir() if p.name.startswith(".report")]


@pytest.fixture
def small_result(rng):
    """A one-score result from generated scores (report tests that need no stores)."""
    from npos.evaluate import EvaluationResult, average_metrics

    id_s = {"knn": rng.normal(1, 1, 200)}
    ood_s = {"knn": {"a": rng.normal(0, 1, 80)}}
    per = {"a": ood_metrics(id_s["knn"], ood_s["knn"]["a"])}
    return EvaluationResult(None, {"knn": {**per, "average": average_metrics(per)}}, id_s,
                            ood_s)


def test_report_refuses_existing_dir_and_overwrites_atomically(tmp_path, small_result):
    result = small_result
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        write_report(result, out)
    assert (out / "old.txt").read_text() == "keep me"
    write_report(result, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "metrics.json").exists()
    assert json.loads((out / "metrics.json").read_text())["id_accuracy"] is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failed_report_leaves_nothing(tmp_path, small_result, monkeypatch):
    import npos.evaluate.report as report

    def boom(*a, **k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "_plot_roc", boom)
    with pytest.raises(RuntimeError):
        write_report(small_result, tmp_path / "report")
    assert list(tmp_path.iterdir()) == []


def test_parse_ood_specs():
    assert parse_ood_specs(["a=x.zarr", "b = y.zarr"]) == {"a": "x.zarr", "b": "y.zarr"}
    with pytest.raises(ParameterError, match="NAME=STORE"):
        parse_ood_specs(["x.zarr"])
    with pytest.raises(ParameterError, match="given twice"):
        parse_ood_specs(["a=x", "a=y"])
    with pytest.raises(ParameterError, match="reserved"):
        parse_ood_specs(["average=x"])


def test_accuracy_null_without_labels_or_matching_classes(world, make_store):
    unlabeled = make_store(world["tmp"] / "u.zarr", world["z_test"],
                           text_embeddings=world["text"])
    res = evaluate(unlabeled, {"far": world["far"]}, scores="mcm", device="cpu")
    assert res.id_accuracy is None
    renamed = make_store(world["tmp"] / "r.zarr", world["z_test"], world["y_test"],
                         class_names=["w", "x", "y", "z"])
    res = evaluate(renamed, {"far": world["far"]}, scores="mcm", train=world["train"],
                   device="cpu")
    assert res.id_accuracy is None  # the train store's classes are not this store's
