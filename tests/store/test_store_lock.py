"""One writer at a time: lock files, a second writer refused, stale locks taken over, and
--overwrite leaving nothing of the old store."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.errors import LockError
from npos.store import FeatureStore, WriterLock, lock_path

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, numpy as np
from npos.store import FeatureStore
store = FeatureStore.create(sys.argv[1], n_rows=10, dim=2, chunk_rows=5,
                            attrs={"model": "m", "pretrained": None, "preprocess": None})
print("ready", flush=True)
if sys.argv[2] == "wait":
    sys.stdin.readline()
"""


def _child(url, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(url), mode], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _create(url, n=10, chunk_rows=5, **kw):
    return FeatureStore.create(str(url), n_rows=n, dim=2, chunk_rows=chunk_rows,
                               attrs={"model": "m", "pretrained": None, "preprocess": None},
                               **kw)


def test_second_writer_refused_then_stale_lock_taken_over(tmp_path):
    url = tmp_path / "s.zarr"
    child = _child(url, "wait")
    try:
        assert child.stdout.readline().strip() == "ready"
        info = json.loads(lock_path(url).read_text())
        assert info["pid"] == child.pid and info["host"] == socket.gethostname()
        assert "started" in info and str(url) in info["command"]
        with pytest.raises(LockError, match=rf"store '{url}' is being written by another "
                                            rf"process \(pid {child.pid} on "):
            _create(url, resume=True)
        with pytest.raises(LockError, match="is being written"):
            FeatureStore.open(str(url), mode="r+")
        assert FeatureStore.open(str(url)).n_rows == 10  # readers are never locked out
        os.kill(child.pid, signal.SIGKILL)  # the holder dies without releasing
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert lock_path(url).exists()
    with pytest.warns(UserWarning, match=rf"taking over the stale lock of store '{url}' "
                                         rf"\(pid {child.pid} on .*that process is gone\)"):
        store = _create(url, resume=True)
    assert json.loads(lock_path(url).read_text())["pid"] == os.getpid()
    store.close()
    assert not lock_path(url).exists()


def test_cli_writer_refused_in_one_line(tmp_path, rng):
    np.save(tmp_path / "e.npy", rng.normal(size=(10, 2)).astype(np.float32))
    url = tmp_path / "s.zarr"
    child = _child(url, "wait")
    try:
        assert child.stdout.readline().strip() == "ready"
        result = CliRunner().invoke(cli, ["store", "import", "--embeddings",
                                          str(tmp_path / "e.npy"), "--out", str(url),
                                          "--overwrite"])
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert f"is being written by another process (pid {child.pid} on" in result.output
        assert FeatureStore.open(str(url)).n_rows == 10  # untouched
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait()
    assert child.returncode == 0 and not lock_path(url).exists()  # released at exit


def test_lock_released_at_exit_and_by_close(tmp_path):
    child = _child(tmp_path / "a.zarr", "exit")
    assert child.stdout.readline().strip() == "ready"
    assert child.wait() == 0 and not lock_path(tmp_path / "a.zarr").exists()
    with _create(tmp_path / "b.zarr") as store:
        assert lock_path(tmp_path / "b.zarr").exists() and store.writable
    assert not lock_path(tmp_path / "b.zarr").exists() and not store.writable


def test_output_folder_lock_api(tmp_path):
    target = tmp_path / "reports" / "run1"
    with WriterLock(target, what="report", command="npos evaluate ...") as lock:
        assert lock.path == tmp_path / "reports" / ".run1.lock"
        assert json.loads(lock.path.read_text())["command"] == "npos evaluate ..."
        foreign = {"host": "elsewhere", "pid": 1, "started": "then", "command": "x"}
    assert not lock.path.exists()
    lock.path.write_text(json.dumps(foreign))
    with pytest.raises(LockError, match=r"report '.*run1' is being written by another process "
                                        r"\(pid 1 on elsewhere, since then: x\); wait for it"):
        WriterLock(target, what="report").acquire()


def test_overwrite_removes_the_old_store_entirely(tmp_path):
    url = tmp_path / "s.zarr"
    with _create(url, n=50, chunk_rows=5) as store:  # 10 chunks
        store.add_array("extra", (), "float32")
        store.write_all(embeddings=np.ones((50, 2)), labels=np.zeros(50, int))
    with _create(url, n=7, chunk_rows=5, overwrite=True) as store:  # 2 chunks
        store.write_all(embeddings=np.ones((7, 2)))
    files = sorted(str(p.relative_to(url)) for p in url.rglob("*") if p.is_file())
    assert files == sorted(["zarr.json", *(f"{name}/zarr.json" for name in
                                           ("embeddings", "labels", "ids", "done")),
                            "embeddings/c/0/0", "embeddings/c/1/0", "labels/c/0",
                            "labels/c/1", "ids/c/0", "ids/c/1", "done/c/0", "done/c/1"])
    assert FeatureStore.open(str(url)).verify() == []


def test_unwritable_folder_is_one_line_naming_the_target(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(LockError, match=r"cannot write store '.*file/s\.zarr': .* \(while "
                                        r"creating its lock file '.*file/\.s\.zarr\.lock'\)$"):
        _create(tmp_path / "file" / "s.zarr")
