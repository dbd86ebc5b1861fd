import json

import pytest
from click.testing import CliRunner

from npos.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def _evaluate(runner, world, *extra):
    return runner.invoke(cli, ["evaluate", "--id", world["test"], "--ood",
                               f"far={world['far']}", "--ood", f"near={world['near']}",
                               "--device", "cpu", *extra])


def test_evaluate_cli_writes_report_and_prints_table(runner, world):
    out = world["tmp"] / "rep"
    result = _evaluate(runner, world, "--train", world["train"], "--scores", "mcm,knn",
                       "--knn-k", "5", "--out", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["scores"]) == ["mcm", "knn"]
    assert "| mcm" in result.output and "| knn" in result.output
    assert f"{100 * doc['scores']['knn']['average']['auroc']:.2f}" in result.output
    assert "ID accuracy:" in result.output
    # Refused without --overwrite, nothing touched; accepted with it.
    before = (out / "metrics.json").read_text()
    result = _evaluate(runner, world, "--scores", "mcm", "--out", str(out))
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert (out / "metrics.json").read_text() == before
    result = _evaluate(runner, world, "--scores", "mcm", "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert list(json.loads((out / "metrics.json").read_text())["scores"]) == ["mcm"]


def test_evaluate_cli_default_scores(runner, world):
    out = world["tmp"] / "rep"
    result = _evaluate(runner, world, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert list(json.loads((out / "metrics.json").read_text())["scores"]) == ["mcm"]


@pytest.mark.parametrize("scores", ["knn", "mcm,mahalanobis"])
def test_evaluate_cli_train_scores_need_train(runner, world, scores):
    out = world["tmp"] / "rep"
    result = _evaluate(runner, world, "--scores", scores, "--out", str(out))
    assert result.exit_code == 2
    assert "need a train store: pass --train TRAIN_STORE" in result.output
    assert not out.exists()


def test_evaluate_cli_errors(runner, world, make_store, rng):
    out = str(world["tmp"] / "rep")
    result = _evaluate(runner, world, "--scores", "mcm,bogus", "--out", out)
    assert result.exit_code == 2 and "unknown score(s) 'bogus'" in result.output
    other = make_store(world["tmp"] / "o.zarr", rng.normal(size=(30, 16)), model="other")
    result = runner.invoke(cli, ["evaluate", "--id", world["test"], "--ood", f"o={other.url}",
                                 "--out", out])
    assert result.exit_code == 2
    assert "OOD store 'o'" in result.output and "model is 'other'" in result.output
    result = runner.invoke(cli, ["evaluate", "--id", world["test"], "--ood", "nothing",
                                 "--out", out])
    assert result.exit_code == 2 and "NAME=STORE" in result.output
    result = runner.invoke(cli, ["evaluate", "--id", world["far"], "--ood",
                                 f"n={world['near']}", "--out", out])
    assert result.exit_code == 2 and "no score can be computed" in result.output
    result = runner.invoke(cli, ["evaluate", "--id", world["test"], "--ood",
                                 f"x={world['tmp'] / 'missing.zarr'}", "--out", out])
    assert result.exit_code == 2 and "no feature store at" in result.output
