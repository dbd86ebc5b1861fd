"""Faults while writing local outputs (heads, reports, score files, fine-tuned tails): a
failing ``os.replace`` (disk full) in :mod:`npos.atomic`, a file-size limit (``ulimit -f``:
EFBIG), unwritable paths. One line, exit 2, nothing half-written left to be trusted; re-run
gives what a clean run gives. Also: parent folders are created the same way everywhere."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import npos
import npos.atomic

REPO = Path(npos.__file__).resolve().parents[1]


class _FailingOs:
    """``os`` for :mod:`npos.atomic` whose ``replace`` fails with ENOSPC at call number
    ``at`` (every call from ``at`` on with ``always``)."""

    def __init__(self, at: int, *, always: bool = False) -> None:
        self.at, self.always, self.calls = at, always, 0

    def replace(self, src, dst):
        self.calls += 1
        if self.calls == self.at or (self.always and self.calls > self.at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return os.replace(src, dst)

    def __getattr__(self, name):
        return getattr(os, name)


def _tensors(head: Path) -> dict[str, np.ndarray]:
    return load_file(str(head / "model.safetensors"))


def _same_head(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert np.array_equal(ta[key], tb[key]), key


def test_train_head_disk_full_mid_run_then_resume(world, tmp_path, monkeypatch, cli_checks):
    c = cli_checks
    clean = tmp_path / "clean" / "head"
    args = ["train-head", world["train"], *c.HEAD_ARGS, "--epochs", "4"]
    assert c.run(*args, "--out", clean).exit_code == 0  # parent folder created
    out = tmp_path / "x" / "head"
    # Epoch 1's state is written (1 replace); epoch 2's replaces it (old aside, new in place):
    # the disk is full at that second step, so epoch 1's state must stay in place.
    monkeypatch.setattr(npos.atomic, "os", _FailingOs(at=3))
    c.assert_one_line_error(c.run(*args, "--out", out),
                                   f"cannot write checkpoint '{out}.partial' (train-head --out)"
                                   ": No space left on device", "re-run with --resume")
    monkeypatch.undo()
    assert not out.exists() and c.no_temporaries(tmp_path) == []
    assert (out.parent / "head.partial").is_dir()  # epoch 1's state, whole
    resumed = c.run(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0 and "after epoch 1/4" in resumed.output, resumed.output
    assert "\nepoch 1/4" not in resumed.output
    _same_head(clean, out)


def test_evaluate_and_score_csv_disk_full_leave_nothing(world, tmp_path, monkeypatch,
                                                        cli_checks):
    c = cli_checks
    ev = ["evaluate", "--id", world["test"], "--ood", f"held={world['ood/held-out']}",
          "--train", world["train"], "--knn-k", "5", "--device", "cpu"]
    sc = ["score", world["test"], "--train", world["train"], "--knn-k", "5", "--device", "cpu"]
    monkeypatch.setattr(npos.atomic, "os", _FailingOs(at=1, always=True))
    report, scores = tmp_path / "reports" / "r", tmp_path / "scores" / "s.csv"
    c.assert_one_line_error(c.run(*ev, "--out", report),
                            f"cannot write report folder '{report}' (evaluate --out): No space")
    c.assert_one_line_error(c.run(*sc, "--out", scores),
                            f"cannot write score settings file '{scores}.json' (score --out)")
    monkeypatch.undo()
    assert not report.exists() and not scores.exists() and c.no_temporaries(tmp_path) == []
    assert not list(tmp_path.rglob(".*.lock"))  # locks released
    # After the fault: the same outputs as a clean run (missing parents created as before).
    assert c.run(*ev, "--out", report).exit_code == 0
    assert c.run(*sc, "--out", scores).exit_code == 0
    assert c.run(*ev, "--out", tmp_path / "clean" / "r").exit_code == 0
    assert c.run(*sc, "--out", tmp_path / "clean" / "s.csv").exit_code == 0
    metrics = [json.loads((p / "metrics.json").read_text())["scores"]
               for p in (report, tmp_path / "clean" / "r")]
    assert metrics[0] == metrics[1]
    assert scores.read_bytes() == (tmp_path / "clean" / "s.csv").read_bytes()


def _npos_subprocess(args, *, fsize: int | None = None, **kwargs):
    """``python -m npos ARGS`` in a child process (with a file-size limit)."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "npos", *map(str, args)], env=env,
                          preexec_fn=limit, capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.mark.slow
def test_file_size_limit_is_one_line(world, tmp_path, cli_checks):
    """ulimit -f 8 KiB: the probe (4 KiB) passes, the head's first checkpoint and the report's
    plots do not: EFBIG in one line (npos ignores SIGXFSZ), nothing left behind."""
    head = tmp_path / "head"
    proc = _npos_subprocess(["train-head", world["train"], *cli_checks.HEAD_ARGS, "--epochs",
                             "2", "--out", head], fsize=8192)
    cli_checks.assert_one_line_error(
        proc, f"cannot write checkpoint '{head}.partial' (train-head --out): File too large")
    report = tmp_path / "report"
    proc = _npos_subprocess(["evaluate", "--id", world["test"], "--ood",
                             f"held={world['ood/held-out']}", "--out", report], fsize=8192)
    cli_checks.assert_one_line_error(proc, f"cannot write report folder '{report}' (evaluate "
                                           "--out): File too large")
    assert not head.exists() and not report.exists()
    assert cli_checks.no_temporaries(tmp_path) == []


def test_unwritable_outputs_stop_before_any_work(world, tmp_path, cli_checks):
    c = cli_checks
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        (["train-head", world["train"], *c.HEAD_ARGS, "--out", blocker / "head"],
         "cannot write head", "train-head --out"),
        (["evaluate", "--id", world["test"], "--ood", f"h={world['ood/held-out']}", "--out",
          blocker / "r"], "cannot write report folder", "evaluate --out"),
        (["score", world["test"], "--out", blocker / "s.parquet"], "cannot write score file",
         "score --out"),
        (["synthesize", world["train"], "--queue", "30", "--k", "10", "--select", "20",
          "--out", blocker / "o.zarr"], "cannot write store", "synthesize --out"),
        (["train-head", world["train"], *c.HEAD_ARGS, "--out", "/proc/npos-head"],
         "cannot write head '/proc/npos-head'", "train-head --out"),
    ]
    for args, what, flag in cases:
        result = c.run(*args)
        line = c.assert_one_line_error(result, what, f"({flag})")
        assert "epoch" not in result.output and "re-run" not in line, result.output
    assert c.no_temporaries(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(world, tmp_path, cli_checks):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = cli_checks.run("score", world["test"], "--out", folder / "s.csv")
        cli_checks.assert_one_line_error(result, "Permission denied", "(score --out)")
    finally:
        folder.chmod(0o755)


def test_check_writable_and_user_path(tmp_path):
    target = tmp_path / "a" / "b" / "out.zarr"
    assert npos.atomic.check_writable(target, "store") == str(target)
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []  # probe removed
    assert npos.atomic.user_path("/x/.head.tmp-ab_12/model.safetensors") == \
        "/x/head/model.safetensors"
    assert npos.atomic.user_path("/s.zarr/embeddings/c/0/." + "0" * 0 + "x." + "a" * 32
                                 + ".partial") == "/s.zarr/embeddings/c/0/.x"
