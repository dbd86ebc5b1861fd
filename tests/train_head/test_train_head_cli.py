"""`npos train-head` on the command line."""

from __future__ import annotations

import json
from dataclasses import fields

from click.testing import CliRunner

from npos.cli import cli
from npos.commands import train_head as train_head_command
from npos.train_head import HeadConfig, load_head

SMALL_ARGS = ["--epochs", "2", "--batch-size", "128", "--queue", "100", "--k", "20",
              "--select", "30", "--candidates", "100", "--device", "cpu"]


def test_defaults_are_head_config_defaults():
    params = {p.name: p.default for p in train_head_command.command.params}
    config = HeadConfig()
    for f in fields(HeadConfig):
        if f.name != "synthesis":
            assert params[f.name] == getattr(config, f.name), f.name
    for f in fields(type(config.synthesis)):
        assert params[f.name] == getattr(config.synthesis, f.name), f.name


def test_train_head_command(world_stores, tmp_path):
    out = tmp_path / "head"
    args = ["train-head", world_stores["train"], "--out", str(out), *SMALL_ARGS,
            "--val", world_stores["test"], "--head", "mlp", "--method", "gaussian",
            "--no-detach-head", "--sigma", "0.05", "--seed", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output and "val accuracy" in result.output
    config = load_head(out).config
    assert config["head"] == "mlp" and config["detach_head"] is False and config["seed"] == 3
    assert config["synthesis"]["method"] == "gaussian" and config["synthesis"]["sigma"] == 0.05
    assert json.loads((out / "config.json").read_text())["queue"] == 100

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "pass --overwrite" in again.output
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0


def test_train_head_command_errors(world_stores, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "h")
    result = runner.invoke(cli, ["train-head", world_stores["train"], "--out", out,
                                 *SMALL_ARGS, "--k", "100"])
    assert result.exit_code == 2
    assert "--k 100 must be an int in the range [1, 100)" in result.output
    assert "try --k 33" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["train-head", world_stores["ood/held-out"], "--out", out,
                                 *SMALL_ARGS])
    assert result.exit_code == 2 and "has no labeled rows" in result.output
    result = runner.invoke(cli, ["train-head", world_stores["train"], "--out", out,
                                 "--head", "svm"])
    assert result.exit_code == 2 and "Invalid value for '--head'" in result.output
