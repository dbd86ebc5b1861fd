import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import npos
from npos.cli import cli
from npos.errors import MissingDependencyError
from npos.evaluate import OODScorer, score_store
from npos.store import FeatureStore

SCORES = "mcm,energy,mahalanobis"


@pytest.fixture
def runner():
    return CliRunner()


def _expected(world, ids_store):
    """Scores computed directly from the arrays, in the store's order."""
    scorer = OODScorer(SCORES.split(","), text_embeddings=world["text"], device="cpu")
    scorer.fit(world["z_train"], world["y_train"])
    return scorer.score(ids_store.astype(np.float32))


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_score_cli_csv(runner, world):
    out = world["tmp"] / "s.csv"
    result = runner.invoke(cli, ["score", world["near"], "--train", world["train"], "--scores",
                                 SCORES, "--out", str(out), "--device", "cpu",
                                 "--batch-size", "60"])
    assert result.exit_code == 0, result.output
    assert "scored 90 rows (mcm, energy, mahalanobis)" in result.output
    assert "rows/s" in result.output
    header, rows = _read_csv(out)
    assert header == ["id", "mcm", "energy", "mahalanobis"]
    assert [r[0] for r in rows] == [f"row{i}" for i in range(90)]
    want = _expected(world, world["z_near"])
    for j, name in enumerate(header[1:], start=1):
        np.testing.assert_allclose([float(r[j]) for r in rows], want[name], rtol=1e-6)
    result = runner.invoke(cli, ["score", world["near"], "--train", world["train"],
                                 "--out", str(out)])
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output


def test_score_parquet_and_zarr_match_csv(world, make_store):
    pq = pytest.importorskip("pyarrow.parquet")
    ids = [f"img/{i},x.jpg" for i in range(150)]  # commas and slashes survive every format
    store = make_store(world["tmp"] / "ids.zarr", world["z_test"], world["y_test"], ids=ids,
                       chunk_rows=32, text_embeddings=world["text"])
    kw = dict(scores=SCORES, train=world["train"], device="cpu", batch_size=64)
    score_store(store, world["tmp"] / "a.csv", **kw)
    score_store(store, world["tmp"] / "a.parquet", **kw)
    summary = score_store(store, world["tmp"] / "a.zarr", **kw)
    assert summary.rows == 150 and summary.format == "zarr"
    header, rows = _read_csv(world["tmp"] / "a.csv")
    table = pq.read_table(world["tmp"] / "a.parquet")
    assert table.column_names == header
    assert table.column("id").to_pylist() == ids == [r[0] for r in rows]
    zs = FeatureStore.open(str(world["tmp"] / "a.zarr"))
    assert zs.kind == "scores" and zs.attrs["score_names"] == header[1:]
    assert zs.chunk_rows == 32 and zs.read("ids").tolist() == ids
    np.testing.assert_array_equal(zs.read("labels"), world["y_test"])
    matrix = zs.read()
    for j, name in enumerate(header[1:]):
        col = np.array([float(r[j + 1]) for r in rows])
        np.testing.assert_array_equal(table.column(name).to_numpy(), col)
        np.testing.assert_allclose(matrix[:, j], col, rtol=1e-6)
    assert zs.attrs["source_store"]["fingerprint"] == store.fingerprint()


def test_score_zarr_refuses_existing_and_overwrites(world):
    kw = dict(scores="mcm", device="cpu")
    out = world["tmp"] / "s.zarr"
    score_store(world["test"], out, **kw)
    from npos.evaluate import OutputExistsError

    with pytest.raises(OutputExistsError, match="already exists"):
        score_store(world["test"], out, **kw)
    score_store(world["test"], out, scores="mcm,energy", device="cpu", overwrite=True)
    assert FeatureStore.open(str(out)).attrs["score_names"] == ["mcm", "energy"]


def test_score_invalid_rows_are_skipped_in_tables_and_nan_in_zarr(world, make_store):
    store = make_store(world["tmp"] / "in.zarr", world["z_test"][:40], chunk_rows=16,
                       text_embeddings=world["text"])
    store = FeatureStore.open(store.url, mode="r+")
    valid = np.ones(40, bool)
    valid[[3, 17]] = False
    store.add_array("valid", (), "bool", fill_value=True)
    store.array("valid")[:] = valid
    score_store(store, world["tmp"] / "v.csv", scores="mcm", device="cpu")
    _, rows = _read_csv(world["tmp"] / "v.csv")
    assert [r[0] for r in rows] == [f"row{i}" for i in range(40) if valid[i]]
    score_store(store, world["tmp"] / "v.zarr", scores="mcm", device="cpu")
    zs = FeatureStore.open(str(world["tmp"] / "v.zarr"))
    raw = np.asarray(zs.array("embeddings")[:])[:, 0]
    assert np.isnan(raw[[3, 17]]).all() and np.isfinite(raw[valid]).all()
    np.testing.assert_allclose(zs.read()[:, 0], [float(r[1]) for r in rows], rtol=1e-6)


def test_score_output_errors(world, monkeypatch):
    from npos.errors import ParameterError

    with pytest.raises(ParameterError, match="cannot tell the output format"):
        score_store(world["test"], world["tmp"] / "s.txt", scores="mcm", device="cpu")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "npos\[parquet\]"'):
        score_store(world["test"], world["tmp"] / "s.parquet", scores="mcm", device="cpu")
    assert not (world["tmp"] / "s.parquet").exists()


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".zarr"])
def test_score_torchrun_two_processes_equals_one(world, suffix):
    root = Path(npos.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    base = ["score", world["test"], "--train", world["train"], "--scores", SCORES,
            "--device", "cpu", "--batch-size", "32"]
    one = world["tmp"] / f"one{suffix}"
    two = world["tmp"] / f"two{suffix}"
    score_store(world["test"], one, scores=SCORES, train=world["train"], device="cpu",
                batch_size=32)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "npos", *base, "--out", str(two)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scored 150 rows") == 1  # one summary, from rank 0
    assert "2 processes" in proc.stdout
    if suffix == ".csv":
        assert one.read_text() == two.read_text()
    else:
        a, b = FeatureStore.open(str(one)), FeatureStore.open(str(two))
        assert b.is_complete
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.read("ids").tolist() == b.read("ids").tolist()
