"""Runs in child processes: a SIGKILLed extraction resumed, and a 2-process torchrun run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from npos.extract import FeatureExtractor, extract_features
from npos.store import FeatureStore


def _done_chunks(url) -> int:
    # Polls the files of the done flags directly: cheap enough to poll every few ms.
    folder = os.path.join(url, "done", "c")
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, folder_factory, tiny, child,
                                                     same_store):
    # 60 images, 30 chunks of 2: enough chunks that the kill lands between the first and the
    # last even when the box is idle and the tiny encoder fast (24 images raced past it)
    per_class = 20
    root = folder_factory(tmp_path / "data", per_class=per_class)
    args = ["extract", str(root), "--model", "npos-tiny", "--dtype", "float32",
            "--chunk-rows", "2", "--batch-size", "2", "--workers", "1", "--tokens-layer", "1"]
    reference = extract_features(root, str(tmp_path / "ref"), chunk_rows=2, batch_size=2,
                                 tokens_layer=1, **tiny)
    killed_url = str(tmp_path / "killed")
    for attempt in range(3):
        # A new session so the kill reaches the DataLoader worker too.
        proc = subprocess.Popen(child.npos(*args, "--out", killed_url, "--overwrite"),
                                env=child.env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _done_chunks(killed_url) == 0 and proc.poll() is None:
            assert time.monotonic() < deadline, "no chunk was written in time"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = FeatureStore.open(killed_url).done_mask()
        if 0 < done.sum() < done.size:
            break
    else:
        pytest.fail("could not kill the extraction between its first and last chunk")
    assert proc.returncode == -signal.SIGKILL

    # The re-run (in this process, to save an interpreter start) does only what is missing.
    rerun = FeatureExtractor(chunk_rows=2, batch_size=2, tokens_layer=1, **tiny).run(
        root, killed_url)
    assert rerun.stats_.rows == 3 * per_class - 2 * int(done.sum())
    same_store(rerun.store_, reference)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, folder_factory, tiny, child, same_store):
    root = folder_factory(tmp_path / "data", per_class=5)
    (root / "dog" / "broken.jpg").write_text("not an image")
    single = extract_features(root, str(tmp_path / "one"), chunk_rows=4, batch_size=3,
                              tokens_layer=2, **tiny)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "npos", "extract", str(root),
               "--out", str(tmp_path / "two"), "--model", "npos-tiny", "--dtype", "float32",
               "--chunk-rows", "4", "--batch-size", "3", "--workers", "0",
               "--tokens-layer", "2", "--max-failed", "0.1"]
    result = subprocess.run(command, env=child.env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1/2:" in result.stdout and "rank 0/2:" in result.stdout
    two = FeatureStore.open(str(tmp_path / "two"))
    assert two.attrs["failed"] == [{"id": "dog/broken.jpg",
                                    "reason": "not an image (unknown format)"}]
    same_store(two, single)
    assert np.isnan(two.array("tokens")[:][~two.array("valid")[:]]).all()
