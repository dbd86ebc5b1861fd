"""Faults while writing stores at fsspec URLs: a fault-injecting file system (``faulty://``)
fails the n-th write (or the write past n bytes) with ENOSPC, EIO or EROFS. Each command
exits 2 with one line naming the store and its flag; once the fault is lifted, re-running
(the command's resume contract) gives a store identical to a clean run."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest



def _fault_then_rerun(faulty, c, args_for, *, code, rerun_extra=(), fraction=0.5,
                      by_bytes=False, flag):
    """Run clean into ``clean.zarr``; run with a fault into ``x.zarr`` (half way through the
    clean run's writes or bytes); re-run without it; both stores must be identical."""
    clean, out = args_for("clean.zarr"), args_for("x.zarr")
    result = c.run(*clean[0])
    assert result.exit_code == 0, result.output
    writes, written = faulty.writes, faulty.written
    if by_bytes:
        faulty.fail(code, after_bytes=int(written * fraction))
    else:
        faulty.fail(code, after_writes=max(2, int(writes * fraction)))
    line = c.assert_one_line_error(c.run(*out[0]), f"cannot write store '{out[1]}' ({flag})",
                                 f": {os.strerror(code)}")
    faulty.reset()
    result = c.run(*out[0], *rerun_extra)
    assert result.exit_code == 0, result.output
    c.same_store(clean[1], out[1])
    return line


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.normal(size=(100, 8)).astype(np.float32))
    np.save(tmp_path / "lab.npy", (np.arange(100) % 3).astype(np.int64))
    return tmp_path


def test_store_import_disk_full_then_rerun_continues(faulty, cli_checks, arrays):
    def args(name):
        url = f"faulty://{arrays}/{name}"
        return (["store", "import", "--embeddings", arrays / "emb.npy", "--labels",
                 arrays / "lab.npy", "--chunk-rows", "16", "--out", url], url)

    line = _fault_then_rerun(faulty, cli_checks, args, code=errno.ENOSPC, flag="store import --out")
    assert "re-run the same command to continue" in line


def test_store_import_io_error_after_n_bytes(faulty, cli_checks, arrays):
    def args(name):
        url = f"faulty://{arrays}/{name}"
        return (["store", "import", "--embeddings", arrays / "emb.npy", "--chunk-rows", "16",
                 "--out", url], url)

    _fault_then_rerun(faulty, cli_checks, args, code=errno.EIO, by_bytes=True, fraction=0.6,
                      flag="store import --out")


def test_extract_read_only_file_system_then_rerun_repairs(faulty, cli_checks, images, tmp_path):
    def args(name):
        url = f"faulty://{tmp_path}/{name}"
        return (["extract", images, "--model", "npos-tiny", "--workers", "0", "--dtype",
                 "float32", "--chunk-rows", "4", "--batch-size", "4", "--device", "cpu",
                 "--out", url], url)

    line = _fault_then_rerun(faulty, cli_checks, args, code=errno.EROFS, flag="extract --out")
    assert "re-run the same command" in line


def test_synthesize_disk_full_then_overwrite(faulty, cli_checks, world, tmp_path):
    def args(name):
        url = f"faulty://{tmp_path}/{name}"
        return (["synthesize", world["train"], "--queue", "30", "--k", "10", "--select", "20",
                 "--candidates", "50", "--seed", "3", "--device", "cpu", "--out", url], url)

    line = _fault_then_rerun(faulty, cli_checks, args, code=errno.ENOSPC,
                             rerun_extra=["--overwrite"], flag="synthesize --out")
    assert "--overwrite" in line


def test_score_zarr_io_error_then_overwrite(faulty, cli_checks, world, tmp_path):
    def args(name):
        url = f"faulty://{tmp_path}/{name}"
        return (["score", world["test"], "--train", world["train"], "--knn-k", "5",
                 "--device", "cpu", "--out", url], url)

    _fault_then_rerun(faulty, cli_checks, args, code=errno.EIO, rerun_extra=["--overwrite"],
                      flag="score --out")


def test_fault_at_the_probe_stops_before_any_work(faulty, cli_checks, world, tmp_path):
    """The first write is the writability probe: the command stops before computing and
    without a resume hint; nothing is created."""
    url = f"faulty://{tmp_path}/o.zarr"
    faulty.fail(errno.EROFS, after_writes=0)
    result = cli_checks.run("synthesize", world["train"], "--queue", "30", "--k", "10",
                            "--select", "20", "--candidates", "50", "--out", url)
    line = cli_checks.assert_one_line_error(
        result, f"cannot write store '{url}' (synthesize --out): "
                                         "Read-only file system")
    assert "re-run" not in line and "outliers x" not in result.output
    assert not (tmp_path / "o.zarr").exists()
