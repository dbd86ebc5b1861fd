import json

import numpy as np
import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.store import FeatureStore


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def npy(tmp_path, rng):
    np.save(tmp_path / "e.npy", rng.normal(size=(300, 6)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 300))
    (tmp_path / "names.txt").write_text("cat\ndog\nfox\n")
    np.save(tmp_path / "t.npy", rng.normal(size=(3, 6)).astype(np.float32))
    return tmp_path


def _import(runner, d, *extra):
    return runner.invoke(cli, ["store", "import", "--embeddings", str(d / "e.npy"),
                               "--labels", str(d / "y.npy"), "--class-names",
                               str(d / "names.txt"), "--text-embeddings", str(d / "t.npy"),
                               "--out", str(d / "s.zarr"), "--chunk-rows", "100", *extra])


def test_help_and_version(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("extract", "synthesize", "train-head", "finetune", "evaluate", "score",
                 "demo", "store"):
        assert name in result.output
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and "npos" in result.output


def test_import_info_verify(runner, npy):
    result = _import(runner, npy)
    assert result.exit_code == 0, result.output
    assert "300 rows x 6" in result.output
    result = runner.invoke(cli, ["store", "info", str(npy / "s.zarr"), "--json"])
    info = json.loads(result.output)
    assert info["rows"] == 300 and info["classes"] == 3 and info["chunks_done"] == 3
    assert "text_embeddings" in info["arrays"]
    result = runner.invoke(cli, ["store", "verify", str(npy / "s.zarr")])
    assert result.exit_code == 0 and "ok" in result.output


def test_verify_fails_on_deleted_chunk_file(runner, npy):
    assert _import(runner, npy).exit_code == 0
    (npy / "s.zarr" / "embeddings" / "c" / "1" / "0").unlink()
    result = runner.invoke(cli, ["store", "verify", str(npy / "s.zarr")])
    assert result.exit_code == 1
    assert "problem: 100 rows with NaN/Inf" in result.output
    (npy / "s.zarr" / "done" / "c" / "2").unlink()
    result = runner.invoke(cli, ["store", "verify", str(npy / "s.zarr"), "--no-values"])
    assert result.exit_code == 1 and "chunks not done: 2" in result.output


def test_existing_output_refused_and_untouched(runner, npy):
    assert _import(runner, npy).exit_code == 0
    before = FeatureStore.open(str(npy / "s.zarr")).read()
    np.save(npy / "e.npy", np.zeros((300, 6), np.float32))
    result = _import(runner, npy)
    assert result.exit_code == 2
    assert "already exists; pass --overwrite" in result.output
    assert "Traceback" not in result.output
    np.testing.assert_array_equal(FeatureStore.open(str(npy / "s.zarr")).read(), before)
    assert _import(runner, npy, "--overwrite").exit_code == 0
    assert not FeatureStore.open(str(npy / "s.zarr")).read().any()


def test_missing_file_is_one_line_exit_2(runner, tmp_path):
    result = runner.invoke(cli, ["store", "import", "--embeddings", str(tmp_path / "no.npy"),
                                 "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "embeddings file not found" in result.output
    result = runner.invoke(cli, ["store", "info", str(tmp_path / "no.zarr")])
    assert result.exit_code == 2 and "no feature store at" in result.output


def test_debug_shows_traceback(runner, tmp_path):
    result = runner.invoke(cli, ["--debug", "store", "info", str(tmp_path / "no.zarr")])
    assert result.exit_code != 0 and isinstance(result.exception, FileNotFoundError)
