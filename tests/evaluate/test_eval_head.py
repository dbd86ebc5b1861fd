"""Evaluation and scoring with a real trained head (``npos.train_head``)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from npos.cli import cli
from npos.evaluate import evaluate, score_store


@pytest.fixture
def head_dir(world):
    from npos.train_head import HeadConfig, train_head

    out = world["tmp"] / "head"
    # One quick epoch, no synthesis: these tests need a real checkpoint, not a good head.
    train_head(world["train"], str(out), HeadConfig(epochs=1, batch_size=64, ood_weight=0.0,
                                                    seed=0), device="cpu")
    return str(out)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_head_space_scores_match_the_loaded_head(world, head_dir):
    from npos.train_head import load_head

    head = load_head(head_dir)
    res = evaluate(world["test"], {"far": world["far"]}, head=head_dir, train=world["train"],
                   scores="mcm,msp,head,knn", knn_k=5, knn_backend="torch", device="cpu")
    z = torch.as_tensor(world["z_test"], dtype=torch.float32)
    with torch.no_grad():
        logits = head.logits(z).double().numpy()
        cos = logits * head.config["temperature"]
        ood = head.ood_logit(z).numpy()
        h = _unit(head.project(z).numpy())
        bank = _unit(head.project(torch.as_tensor(world["z_train"],
                                                  dtype=torch.float32)).numpy())
    softmax = np.exp(cos - cos.max(1, keepdims=True))
    np.testing.assert_allclose(res.id_scores["mcm"], (softmax / softmax.sum(1, keepdims=True))
                               .max(1), rtol=1e-5)
    np.testing.assert_allclose(res.id_scores["head"], ood, rtol=1e-5, atol=1e-6)
    d = np.linalg.norm(h[:, None] - bank[None], axis=2)
    np.testing.assert_allclose(res.id_scores["knn"], -np.sort(d, axis=1)[:, 4], atol=1e-5)
    assert res.id_accuracy == pytest.approx(np.mean(logits.argmax(1) == world["y_test"]))
    assert res.settings["space"] == "head" and res.settings["head"] == head_dir


def test_evaluate_and_score_cli_with_head(world, head_dir):
    runner = CliRunner()
    out = world["tmp"] / "rep"
    result = runner.invoke(cli, ["evaluate", "--id", world["test"], "--ood",
                                 f"far={world['far']}", "--head", head_dir, "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert list(json.loads((out / "metrics.json").read_text())["scores"]) == ["mcm", "head"]
    summary = score_store(world["far"], world["tmp"] / "s.csv", head=head_dir, device="cpu")
    assert summary.scores == ["mcm", "head"] and summary.rows == 120


def test_cli_refuses_head_of_another_encoder(world, head_dir, make_store, rng):
    other = make_store(world["tmp"] / "vit.zarr", rng.normal(size=(40, 16)), model="ViT-B-16")
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--id", other.url, "--ood", f"far={other.url}",
                                 "--head", head_dir, "--out", str(world["tmp"] / "rep")])
    assert result.exit_code == 2
    assert f"head {head_dir!r} does not match store" in result.output
    assert "model is 'test-model' there but 'ViT-B-16' in the store" in result.output
    result = runner.invoke(cli, ["score", other.url, "--head", head_dir, "--out",
                                 str(world["tmp"] / "s.csv")])
    assert result.exit_code == 2 and "does not match store" in result.output
    assert not (world["tmp"] / "rep").exists() and not (world["tmp"] / "s.csv").exists()
