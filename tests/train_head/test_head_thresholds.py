"""`train-head --val` stores thresholds at --tpr; `score --threshold auto` reads them."""

from __future__ import annotations

import csv
import json

import numpy as np
from click.testing import CliRunner

from npos.cli import cli

SMALL_ARGS = ["--epochs", "1", "--batch-size", "128", "--queue", "100", "--k", "20",
              "--select", "30", "--candidates", "100", "--device", "cpu"]


def test_val_thresholds_and_score_threshold_auto(world_stores, tmp_path):
    runner = CliRunner()
    out = tmp_path / "head"
    res = runner.invoke(cli, ["train-head", world_stores["train"], "--out", str(out),
                              *SMALL_ARGS, "--val", world_stores["test"], "--tpr", "0.9"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "thresholds.json").read_text())
    assert record["tpr"] == 0.9 and set(record["thresholds"]) == \
        {"mcm", "msp", "maxlogit", "energy", "head"}
    assert all(v >= 0.9 for v in record["id_tpr"].values())

    scores = tmp_path / "s.csv"
    res = runner.invoke(cli, ["score", world_stores["test"], "--head", str(out), "--scores",
                              "head,mcm", "--threshold", "auto", "--device", "cpu", "--out",
                              str(scores)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(scores)))
    t = record["thresholds"]["head"]
    flags = np.array([float(r["is_ood"]) for r in rows])
    np.testing.assert_array_equal(flags, [float(float(r["head"]) < t) for r in rows])
    assert 1 - flags.mean() >= 0.9  # the calibration store keeps >= the requested TPR

    res = runner.invoke(cli, ["score", world_stores["test"], "--scores", "knn", "--train",
                              world_stores["train"], "--threshold", "auto", "--device", "cpu",
                              "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 2 and "--threshold auto reads the thresholds stored with --head" \
        in res.output
