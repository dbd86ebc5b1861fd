"""Ctrl-C (exit 130, one line saying how to resume; resuming gives the uninterrupted
result), fine-tuning under a full disk, and parameter errors told in flags with every
conflict and values that fit."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import npos
import npos.atomic
from npos.errors import ParameterError
from npos.synthesize import SynthesisConfig
from npos.train_head import HeadConfig

REPO = Path(npos.__file__).resolve().parents[1]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_resume_gives_the_uninterrupted_head(world, tmp_path,
                                                                  cli_checks):
    args = ["train-head", world["train"], *cli_checks.HEAD_ARGS, "--epochs", "60"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "head"
    proc = subprocess.Popen([sys.executable, "-m", "npos", *map(str, args), "--out", str(out)],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:  # interrupt once a few epochs are done
        if line.startswith("epoch 3/60"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    errors = [line for line in rest.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: interrupted (train-head); re-run with --resume to continue from "
                      "the last finished epoch"], rest
    assert "Traceback" not in rest and not out.exists()
    assert cli_checks.run(*args, "--out", out, "--resume").exit_code == 0
    assert cli_checks.run(*args, "--out", tmp_path / "clean").exit_code == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "clean" /
                                                                     "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class _FullDiskAt:
    """``os`` for :mod:`npos.atomic` whose ``replace`` fails with ENOSPC at call ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def replace(self, src, dst):
        self.calls += 1
        if self.calls == self.at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return os.replace(src, dst)

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.slow
def test_finetune_disk_full_then_resume(images, tmp_path, monkeypatch, cli_checks):
    c = cli_checks
    store = tmp_path / "tokens.zarr"
    assert c.run("extract", images, "--model", "npos-tiny", "--workers", "0", "--dtype",
                 "float32", "--chunk-rows", "4", "--tokens-layer", "1", "--device", "cpu",
                 "--out", store).exit_code == 0
    args = ["finetune", store, "--model", "npos-tiny", "--epochs", "2", "--batch-size", "8",
            "--queue", "8", "--k", "3", "--select", "5", "--pick", "2", "--candidates", "8",
            "--head", "mlp", "--device", "cpu", "--no-progress", "--embed", f"x={store}"]
    assert c.run(*args, "--out", tmp_path / "clean").exit_code == 0
    out = tmp_path / "ft"
    monkeypatch.setattr(npos.atomic, "os", _FullDiskAt(2))
    c.assert_one_line_error(c.run(*args, "--out", out), "(finetune --out): No space left",
                            "re-run with --resume")
    monkeypatch.undo()
    assert c.no_temporaries(tmp_path) == []
    assert c.run(*args, "--out", out, "--resume").exit_code == 0
    for name in ("tail.safetensors", "head/model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(tmp_path / "clean" / name))
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    c.same_store(str(out / "x.zarr"), str(tmp_path / "clean" / "x.zarr"))


def test_train_head_proposes_values_that_fit_and_they_do(world, tmp_path, cli_checks):
    """Defaults on 30 rows per class: one message with the queue and every synthesis value
    that must change; the proposal runs as given."""
    c = cli_checks
    base = ["train-head", world["train"], "--epochs", "1", "--device", "cpu", "--out",
            tmp_path / "h"]
    line = c.assert_one_line_error(c.run(*base),
                                   "fewer than --queue 1000 (default)",
                                   "the smallest class has 30 labeled rows: try --queue 30 "
                                   "--k 10 --select 20")
    assert "queue=" not in line and "'k'" not in line
    # A queue that fits but synthesis values that do not: all of them in one message.
    line = c.assert_one_line_error(c.run(*base, "--queue", "30"),
                                   "--k 400 (default) must be", "--select 300 (default) must "
                                   "be", "values that fit --queue 30: try --k 10 --select 20")
    assert line.count("must be") == 2
    assert c.run(*base, "--queue", "30", "--k", "10", "--select", "20").exit_code == 0


def test_synthesize_proposal_runs(world, cli_checks):
    c = cli_checks
    c.assert_one_line_error(c.run("synthesize", world["train"], "--stats-only"),
                            "the largest class has 30 rows: try --queue 30 --k 10 --select 20")
    assert c.run("synthesize", world["train"], "--stats-only", "--queue", "30", "--k", "10",
                 "--select", "20", "--candidates", "50").exit_code == 0


def test_api_messages_keep_python_names_and_list_every_violation():
    with pytest.raises(ParameterError) as info:
        HeadConfig(lr=-1.0, momentum=2.0, queue=30).validate()
    message = str(info.value)
    assert "The 'lr' parameter of train_head" in message
    assert "The 'momentum' parameter of train_head" in message
    assert [v.name for v in info.value.violations] == ["lr", "momentum"]
    with pytest.raises(ParameterError) as info:
        SynthesisConfig(pick=5).validate(12, bank_name="queue")
    assert "Values that fit queue=12: try k=4, select=8." in str(info.value)
    assert info.value.suggestion == {"k": 4, "select": 8}
    SynthesisConfig(k=4, select=8, pick=5).validate(12)  # the proposal fits


def test_scoring_option_names_are_the_flags(world, cli_checks):
    """An option whose Python name differs from its flag (knn's 'k' is --knn-k)."""
    line = cli_checks.assert_one_line_error(
        cli_checks.run("score", world["test"], "--train", world["train"], "--knn-k", "5000",
                       "--out", "/tmp/never-written.csv"), "--knn-k")
    assert "'k'" not in line
