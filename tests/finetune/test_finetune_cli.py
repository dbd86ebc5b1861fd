"""`npos finetune` on the command line: options of train-head, outputs usable by the other
commands, one-line errors with exit code 2."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from npos.cli import cli
from npos.commands import finetune as finetune_cmd
from npos.commands import train_head as train_head_cmd
from npos.store import FeatureStore

SMALL = ["--model", "npos-tiny", "--epochs", "1", "--batch-size", "16", "--queue", "16",
         "--k", "4", "--select", "8", "--pick", "2", "--candidates", "16", "--head", "mlp",
         "--device", "cpu", "--no-progress"]


def test_finetune_takes_every_option_of_train_head():
    ours = {p.name: p for p in finetune_cmd.command.params}
    for param in train_head_cmd.command.params:
        if param.name in ("features", "out", "val", "resume", "overwrite"):
            continue
        assert param.name in ours, param.name
        assert (ours[param.name].opts, ours[param.name].default) == (param.opts, param.default)


def test_cli_end_to_end(token_stores, tmp_path):
    out = tmp_path / "ft"
    runner = CliRunner()
    result = runner.invoke(cli, ["finetune", token_stores["train"], "--out", str(out), *SMALL,
                                 "--embed", f"test={token_stores['test']}",
                                 "--embed", f"grey={token_stores['ood']}"])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output and "img/s" in result.output
    assert (out / "tail.safetensors").is_file() and (out / "head" / "model.safetensors").is_file()
    for name in ("test", "grey"):
        verify = runner.invoke(cli, ["store", "verify", str(out / f"{name}.zarr")])
        assert verify.exit_code == 0, verify.output
    assert FeatureStore.open(str(out / "grey.zarr")).n_rows == 16

    again = runner.invoke(cli, ["finetune", token_stores["train"], "--out", str(out), *SMALL])
    assert again.exit_code == 2
    assert "already exist" in again.output and "--overwrite" in again.output

    evaluate = runner.invoke(cli, ["evaluate", "--help"])
    if "not available" not in evaluate.output.lower():
        report = runner.invoke(cli, ["evaluate", "--id", str(out / "test.zarr"), "--ood",
                                     f"grey={out / 'grey.zarr'}", "--head", str(out / "head"),
                                     "--out", str(tmp_path / "report"), "--device", "cpu"])
        assert report.exit_code == 0, report.output
        assert (tmp_path / "report" / "metrics.json").is_file()
        refused = runner.invoke(cli, ["evaluate", "--id", token_stores["test"], "--ood",
                                      f"grey={token_stores['ood']}", "--head", str(out / "head"),
                                      "--out", str(tmp_path / "report2"), "--device", "cpu"])
        assert refused.exit_code == 2 and "pretrained" in refused.output


def test_cli_errors_are_one_line(token_stores, tmp_path, make_store):
    runner = CliRunner()
    plain = make_store(tmp_path / "plain.zarr", np.zeros((4, 32)), np.arange(4) % 2)
    result = runner.invoke(cli, ["finetune", plain.url, "--out", str(tmp_path / "o"), *SMALL])
    assert result.exit_code == 2
    assert "has no tokens" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["finetune", token_stores["train"], "--out",
                                 str(tmp_path / "o"), *SMALL, "--embed", "nonsense"])
    assert result.exit_code == 2 and "NAME=STORE" in result.output
    assert not (tmp_path / "o").exists()
