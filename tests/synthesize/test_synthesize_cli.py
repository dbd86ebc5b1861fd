import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import npos
from npos.cli import cli
from npos.store import FeatureStore
from npos.synthesize import SynthesisConfig
from npos.synthesize.offline import class_banks, synthesize_store

NAMES = ["cat", "dog", "fox", "owl", "eel"]
FAST = ["--k", "10", "--select", "30", "--candidates", "100", "--queue", "100"]


@pytest.fixture
def features(tmp_path, make_store, rng):
    centres = rng.normal(size=(5, 16))
    y = np.repeat(np.arange(5), 100)[:-60]  # eel has 40 rows only
    x = (centres[y] + 0.4 * rng.normal(size=(y.size, 16))) * 10
    make_store(tmp_path / "f.zarr", x, y, class_names=NAMES,
               attrs={"preprocess": {"size": 224}, "token_layer": 10})
    return str(tmp_path / "f.zarr")


def _run(*args):
    return CliRunner().invoke(cli, ["synthesize", *args])


def test_command_writes_outliers_store(features, tmp_path):
    out = str(tmp_path / "o.zarr")
    result = _run(features, "--out", out, *FAST, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "24 outliers from 4 classes (npos: k=10 select=30 pick=3 candidates=100 keep=2 " \
           "noise=sphere sigma=0.01 queue=100 seed=3)" in result.output
    assert "skipped 1 classes with fewer than 100 rows: eel (40)" in result.output
    assert "acceptance ratio: 0.02" in result.output
    lines = result.output.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("class"))) + 1:]
    assert [row.split()[0] for row in table[:5]] == ["all", "cat", "dog", "fox", "owl"]
    assert all(len(row.split()) == 12 for row in table[:5])  # name rows 3x3 quantiles outward

    src, store = FeatureStore.open(features), FeatureStore.open(out)
    assert store.kind == "outliers" and store.n_rows == 4 * 3 * 2
    src.check_compatible(store.fingerprint(), what="outliers store")
    assert store.attrs["token_layer"] == 10 and store.attrs["synthesis"]["seed"] == 3
    assert store.attrs["synthesis"] == {**SynthesisConfig(k=10, select=30, candidates=100)
                                        .to_dict(), "queue": 100, "seed": 3}
    assert store.class_names == NAMES and store.has("knn_distance")
    labels = store.read("labels")
    assert labels.tolist() == sum(([c] * 6 for c in range(4)), [])
    # Banks are whole classes (100 rows each, queue 100): recompute the distances and
    # check each outlier against the source row named in its id.
    x, y, ids = src.read(dtype="float32"), src.read("labels"), list(src.read("ids"))
    emb, dist = store.read(), store.read("knn_distance")
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    for row, (c, out_id) in enumerate(zip(labels, store.read("ids"))):
        bank = unit(x[y == c])
        d = np.sort(np.linalg.norm(bank - unit(emb[row]), axis=1))[9]
        assert abs(d - dist[row]) < 1e-4
        src_row = ids.index(out_id.split("#")[0])
        assert y[src_row] == c
        assert abs(np.linalg.norm(x[src_row]) - np.linalg.norm(emb[row])) < 1e-3


def test_stats_only_and_overwrite(features, tmp_path):
    out = tmp_path / "o.zarr"
    result = _run(features, "--out", str(out), *FAST, "--stats-only", "--method", "vos")
    assert result.exit_code == 0, result.output
    assert "(vos: k=10 pick=3 candidates=100 keep=2 noise=sphere queue=100 seed=0)" \
        in result.output
    assert "nothing written" in result.output and not out.exists()
    assert _run(features, *FAST, "--stats-only", "--method", "gaussian").exit_code == 0
    assert _run(features, "--out", str(out), *FAST).exit_code == 0
    first = FeatureStore.open(str(out)).read()
    result = _run(features, "--out", str(out), *FAST, "--seed", "1")
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert np.array_equal(FeatureStore.open(str(out)).read(), first)
    assert _run(features, "--out", str(out), *FAST, "--seed", "1", "--overwrite").exit_code == 0
    assert not np.array_equal(FeatureStore.open(str(out)).read(), first)


def test_command_errors(features, tmp_path):
    result = _run(features, *FAST)
    assert result.exit_code == 2 and "--out is required (or pass --stats-only)" in result.output
    result = _run(features, "--stats-only", "--queue", "500")
    assert result.exit_code == 2
    assert "no class of" in result.output and "at least --queue=500 rows (the largest has 100)" \
        in result.output
    result = _run(features, "--stats-only", "--queue", "100")
    # Every conflict in one message, in flags, defaults marked, values that fit proposed.
    assert result.exit_code == 2 and "--k 400 (default) must be an int in the range [1, 100)" \
        in result.output
    assert "--select 300 (default) must be" in result.output
    assert "try --k 33 --select 66" in result.output and "'k'" not in result.output
    result = _run(features, "--stats-only", *FAST, "--pick", "31")
    assert result.exit_code == 2 and "--pick 31 must be an int in the range [1, 30]" \
        in result.output
    result = _run(str(tmp_path / "missing.zarr"), "--stats-only")
    assert result.exit_code == 2 and "no feature store at" in result.output
    assert "Traceback" not in result.output


def test_offline_synthesis_is_seeded(features):
    cfg = SynthesisConfig(k=10, select=30, candidates=50)
    a = synthesize_store(features, cfg, queue=60, seed=4)
    b = synthesize_store(features, cfg, queue=60, seed=4)
    c = synthesize_store(features, cfg, queue=60, seed=5)
    assert torch.equal(a.result.outliers, b.result.outliers)
    assert torch.equal(a.banks.rows, b.banks.rows)
    assert not torch.equal(a.banks.rows, c.banks.rows)
    assert a.banks.classes.tolist() == [0, 1, 2, 3] and a.banks.skipped == {4: 40}


def test_class_banks_sampling():
    x = torch.arange(20, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.tensor([0, 1, 2, -1] * 5)
    banks = class_banks(x, y, 4, generator=torch.Generator().manual_seed(0), num_classes=4)
    assert banks.classes.tolist() == [0, 1, 2] and banks.skipped == {3: 0}
    assert banks.counts == {0: 5, 1: 5, 2: 5, 3: 0}
    for r, c in enumerate(banks.classes.tolist()):
        rows = banks.rows[r]
        assert (y[rows] == c).all() and len(set(rows.tolist())) == 4
        assert (rows.diff() > 0).all()  # kept in input order
        assert torch.equal(banks.banks[r], x[rows])
    whole = class_banks(x, y, 5, generator=torch.Generator(), num_classes=3)
    assert whole.rows.tolist() == [[0, 4, 8, 12, 16], [1, 5, 9, 13, 17], [2, 6, 10, 14, 18]]


def test_command_module_does_not_import_torch():
    # `npos --help` must stay fast: the synthesize command and its options import torch lazily.
    root = str(Path(npos.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = ("import sys, npos.commands.synthesize, npos.commands._synthesis_options; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
