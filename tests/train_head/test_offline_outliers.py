"""``train-head --outliers``: the offline path equals the online objective on a fixed outlier
set, end to end with resume, the one-class detector, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from npos.cli import cli
from npos.store import FeatureStore
from npos.synthesize import SynthesisConfig
from npos.synthesize.offline import synthesize_store
from npos.train_head import HeadConfig, HeadModel, HeadObjective, load_head, train_head
from npos.train_head.data import OutlierDraws, build_head, load_one_class

SYNTH = SynthesisConfig(k=20, select=30, pick=3, candidates=100, keep=2)
SMALL = HeadConfig(epochs=3, batch_size=128, queue=100, synthesis=SYNTH)


@pytest.mark.parametrize("id_loss", ["none", "ce"])
def test_offline_step_equals_online_objective_on_fixed_outliers(id_loss):
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    z, y = torch.randn(32, 16, generator=g), torch.arange(32) % 4
    outliers = torch.randn(24, 16, generator=g) * 2
    config = HeadConfig(batch_size=32, queue=100, id_loss=id_loss, projection="linear",
                        synthesis=SYNTH)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = HeadModel(text, projection="linear", head="rbf")
        model.head.init_from_data(z, y, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # a projection that is not the identity
            for p in model.projection.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        models.append(model)
    online = HeadObjective(models[0], config)
    with torch.no_grad():  # online outliers live in the projected space
        online.outliers = models[0].project(outliers)
    offline = HeadObjective(models[1], config,
                            offline_outliers=OutlierDraws(outliers, 24, torch.device("cpu")))
    outs = []
    for objective in (online, offline):
        out = objective(z, y, epoch=0)
        out.loss.backward()
        outs.append(out)
    assert not outs[0].synthesized and offline.queues is None
    torch.testing.assert_close(outs[0].loss, outs[1].loss)
    torch.testing.assert_close(outs[0].outlier_loss, outs[1].outlier_loss)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters(),
                                    strict=True):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.fixture(scope="module")
def outliers_store(world_stores, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("outliers") / "o.zarr")
    source = FeatureStore.open(world_stores["train"])
    synthesize_store(source, SYNTH, queue=100, seed=0).write(url, source=source)
    return url


def test_train_on_offline_outliers_resume_equals_uninterrupted(world_stores, outliers_store,
                                                              tmp_path):
    args = dict(outliers=outliers_store)
    result = train_head(world_stores["train"], str(tmp_path / "a"), SMALL, **args)
    assert all(e["synth_steps"] == 0 and e["outlier_loss"] is not None for e in result.history)
    config = load_head(tmp_path / "a").config
    assert config["outliers"] == outliers_store and config["outliers_per_step"] == 8 * 3 * 2
    assert config["one_class"] is False and config["settings"]["outliers"] == outliers_store

    class Interrupt(Exception):
        pass

    def stop(line):
        if line.startswith("epoch 2/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train_head(world_stores["train"], str(tmp_path / "b"), SMALL, log=stop, **args)
    train_head(world_stores["train"], str(tmp_path / "b"), SMALL, resume=True, **args)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == a
    other = train_head(world_stores["train"], str(tmp_path / "c"), SMALL, outliers_per_step=5,
                       **args)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["outliers_per_step"] == 5
    assert other.history[-1]["outlier_loss"] != result.history[-1]["outlier_loss"]


def _auroc(score, world, ood):
    with torch.no_grad():
        s_id = score(torch.from_numpy(world.test)).numpy()
        s_ood = score(torch.from_numpy(world.ood[ood])).numpy()
    return roc_auc_score(np.r_[np.ones(len(s_id)), np.zeros(len(s_ood))], np.r_[s_id, s_ood])


def test_one_class_detector_on_unlabeled_store(world, world_stores, make_store, tmp_path):
    train = FeatureStore.open(world_stores["train"])
    unlabeled = make_store(tmp_path / "u.zarr", train.read(), None, model="generated-world")
    runner = CliRunner()
    out = str(tmp_path / "o.zarr")
    result = runner.invoke(cli, ["synthesize", unlabeled.url, "--out", out, "--scope", "global",
                                 "--count", "2000", "--k", "20", "--select", "200",
                                 "--candidates", "100", "--sigma", "0.1"])
    assert result.exit_code == 0, result.output
    head_dir = tmp_path / "head"
    result = runner.invoke(cli, ["train-head", unlabeled.url, "--outliers", out, "--id-loss",
                                 "none", "--out", str(head_dir), "--epochs", "10", "--lr",
                                 "0.01", "--batch-size", "128", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    head = load_head(head_dir)
    assert head.config["one_class"] is True and head.config["class_names"] == ["id"]
    assert head.config["outliers_per_step"] == 128
    # The trained head separates held-out classes better than the head it started from.
    initial, _ = build_head(load_one_class(unlabeled), HeadConfig(id_loss="none"))
    before = _auroc(initial.eval().ood_logit, world, "held-out")
    after = _auroc(head.ood_logit, world, "held-out")
    assert after > before + 0.05, (before, after)


def test_outliers_refusals(world_stores, outliers_store, make_store, tmp_path):
    runner = CliRunner()
    base = ["train-head", world_stores["train"], "--out", str(tmp_path / "h"), "--epochs", "1",
            "--queue", "100", "--k", "20", "--select", "30", "--candidates", "100"]
    other = make_store(tmp_path / "x.zarr", np.ones((4, 64)), [0, 0, 1, 1], kind="outliers",
                       model="another-encoder")
    cases = [
        (["--outliers", other.url], "does not match store"),
        (["--outliers", world_stores["test"]], "train-head --outliers"),
        (["--outliers", outliers_store, "--ood-weight", "0"], "--outliers trains the OOD head"),
    ]
    for extra, message in cases:
        result = runner.invoke(cli, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, \
            result.output
    result = runner.invoke(cli, ["train-head", world_stores["ood/held-out"], "--out",
                                 str(tmp_path / "h"), "--outliers", outliers_store])
    assert result.exit_code == 2 and "has no labeled rows" in result.output


def test_finetune_refuses_outliers(tmp_path):
    result = CliRunner().invoke(cli, ["finetune", str(tmp_path / "t.zarr"), "--out",
                                      str(tmp_path / "ft"), "--model", "npos-tiny",
                                      "--outliers", str(tmp_path / "o.zarr")])
    assert result.exit_code == 2
    assert "--outliers is for 'npos train-head' only" in result.output
