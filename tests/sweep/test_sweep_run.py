"""`npos sweep` end to end: the numbers equal train-head + evaluate by hand; resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.evaluate import evaluate
from npos.store import FeatureStore
from npos.synthesize import SynthesisConfig
from npos.synthesize.offline import synthesize_store, write_outliers
from npos.train_head import HeadConfig, train_head

GRID = "sigma=0.01,0.05 k=5,10"  # 4 points, + the ablation


def _run(args):
    result = CliRunner().invoke(cli, ["sweep", *args])
    assert result.exit_code == 0, result.output
    return result


def _points(out: Path) -> dict[tuple[float, int, float, int], dict]:
    docs = [json.loads(p.read_text()) for p in (out / "points").glob("*.json")]
    return {(d["point"]["sigma"] or 0.0, d["point"]["k"], d["point"]["ood_weight"], d["seed"]): d
            for d in docs}


@pytest.fixture(scope="module")
def swept(data, small, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "sweep"
    _run([*data, "--out", str(out), "--grid", GRID, "--seeds", "2", "--seed", "3",
          *small])
    return out


def test_one_point_equals_train_head_and_evaluate_by_hand(world, swept, tmp_path):
    point = _points(swept)[0.05, 10, 0.1, 4]  # the second seed: --seed 3 + 1
    synthesis = SynthesisConfig(k=10, select=20, pick=2, candidates=20, keep=2, sigma=0.05)
    config = HeadConfig(epochs=2, id_loss="none", queue=50, synthesis=synthesis, seed=4)
    made = synthesize_store(world["train"], synthesis, queue=50, seed=4, device="cpu")
    write_outliers(made, str(tmp_path / "o.zarr"), source=FeatureStore.open(world["train"]))
    train_head(world["train"], str(tmp_path / "head"), config, device="cpu",
               outliers=str(tmp_path / "o.zarr"))
    by_hand = evaluate(world["test"], {"held": world["ood/held-out"],
                                       "off": world["ood/off-manifold"]},
                       scores="head", head=str(tmp_path / "head"), device="cpu")
    assert point["offline"] is True
    assert point["id_accuracy"] == by_hand.id_accuracy
    for name in ("held", "off", "average"):
        for metric in ("auroc", "fpr95"):
            assert point["metrics"]["head"][name][metric] == pytest.approx(
                by_hand.metrics["head"][name][metric], abs=0, rel=1e-12)


def test_rows_are_the_mean_and_std_over_seeds(swept):
    points = _points(swept)
    rows = {r["point_id"]: r for r in json.loads((swept / "results.json").read_text())["rows"]}
    assert len(rows) == 5 + 2  # 4 points, the ablation, frozen knn and mcm
    kinds = sorted(r["kind"] for r in rows.values())
    assert kinds == ["ablation", "baseline", "baseline", "point", "point", "point", "point"]
    runs = [points[0.05, 10, 0.1, s] for s in (3, 4)]
    row = rows[runs[0]["point_id"]]
    values = [r["metrics"]["head"]["average"]["auroc"] for r in runs]
    assert row["head/average/auroc_mean"] == pytest.approx(np.mean(values), rel=1e-12)
    assert row["head/average/auroc_std"] == pytest.approx(np.std(values), rel=1e-12)
    with open(swept / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["point_id"] for r in table] == list(rows)  # same rows, same (sorted) order
    means = [float(r["head/average/auroc_mean"]) for r in table if r["kind"] != "baseline"]
    assert means == sorted(means, reverse=True)
    report = (swept / "report.md").read_text()
    assert "ablation (ood-weight 0)" in report and "frozen knn" in report
    assert report.splitlines()[2].startswith("Synthesis")
    assert {p.name for p in (swept / "plots").iterdir()} == {"sigma.png", "k.png"}
    assert (swept / "boundary.png").stat().st_size > 0
    # one outliers store per synthesis setting and seed: 4 settings x 2 seeds
    assert len(list((swept / "outliers").glob("*.zarr"))) == 8


@pytest.mark.slow
def test_resume_after_kill_skips_finished_points(data, small, swept, tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "npos", "sweep", *data, "--out", str(out),
            "--grid", GRID, "--seeds", "2", "--seed", "3", *small]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "points").glob("*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    assert 1 <= len(finished) < 10
    again = CliRunner().invoke(cli, ["sweep", *args[4:]])
    assert again.exit_code == 2 and "--resume" in again.output  # no silent reuse
    _run([*args[4:], "--resume", "--jobs", "2"])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")
            if p.name in finished} == finished  # finished points were not run again
    resumed, fresh = _points(out), _points(swept)
    assert resumed.keys() == fresh.keys()
    for key, doc in fresh.items():
        assert resumed[key]["metrics"] == doc["metrics"]
        assert resumed[key]["id_accuracy"] == doc["id_accuracy"]


def test_holdout_classes_split_the_training_cache(world, small, tmp_path):
    out = tmp_path / "sweep"
    _run([world["train"], "--holdout-classes", "1", "--out", str(out), "--grid",
          "ood-weight=0.05,0.1", "--seeds", "1", "--baselines", "knn", *small, "--queue", "40"])
    train, test, held = (FeatureStore.open(str(out / "data" / f"{n}.zarr"))
                         for n in ("train", "test", "heldout"))
    source = FeatureStore.open(world["train"])
    assert train.fingerprint() == test.fingerprint() == held.fingerprint() == source.fingerprint()
    assert len(train.class_names) == 3 and train.class_names == test.class_names
    assert train.n_rows + test.n_rows + held.n_rows == source.n_rows == 240
    assert held.n_rows == 60 and test.n_rows == 3 * 12
    assert (held.read("labels") == -1).all()
    assert train.read_extra("text_embeddings").shape == (3, 16)
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["split"]["ood"]) == ["heldout"]
    assert len(doc["rows"]) == 2 + 1 + 1  # two ood-weights, the ablation, frozen knn
    # the two points differ only in ood-weight: one outliers store serves both
    assert len(list((out / "outliers").glob("*.zarr"))) == 1


def _point(**changes):
    """A full train-head point (the command's defaults, the small settings, ``changes``)."""
    from npos.commands.train_head import command as train_head_command
    from npos.sweep.grid import build_grid

    fixed = {p.name: p.default for p in train_head_command.params if p.name}
    fixed.update(id_loss="none", queue=50, k=10, select=20, pick=2, candidates=20, keep=2,
                 epochs=2, **changes)
    return build_grid("", train_head_command, fixed).points[0]


def test_parallel_jobs_synthesize_shared_outliers_once(world, tmp_path, monkeypatch):
    import threading

    import npos.synthesize.offline as offline_module
    from npos.sweep.holdout import Split
    from npos.sweep.run import _offline_outliers, head_config

    calls = []
    real = offline_module.synthesize_store

    def slow(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # both jobs are inside at once unless one waits
        return real(*args, **kwargs)

    monkeypatch.setattr(offline_module, "synthesize_store", slow)
    split = Split(world["train"], world["test"], {})
    config = head_config(_point(ood_weight=0.1), 0)
    urls = []

    def job(i):
        work = tmp_path / f"work{i}"
        work.mkdir()
        urls.append(_offline_outliers(split, config, 0, work, "cpu", tmp_path / "outliers"))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(urls)) == 1
    assert FeatureStore.open(urls[0]).n_rows > 0


def test_parallel_runs_put_each_synthesis_ahead_of_its_reuses():
    from npos.sweep.run import _synthesis_first

    a, b = _point(ood_weight=0.05), _point(ood_weight=0.1)  # same outliers
    c = _point(ood_weight=0.1, sigma=0.5)                    # other outliers
    ablation = _point(ood_weight=0.0)                        # no outliers
    tasks = [(a, 0), (a, 1), (b, 0), (b, 1), (c, 0), (ablation, 0)]
    ordered = _synthesis_first(tasks, "train.zarr")
    assert ordered == [(a, 0), (a, 1), (c, 0), (ablation, 0), (b, 0), (b, 1)]
