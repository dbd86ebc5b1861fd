"""``benchmarks/gpu_check.py``: runs with --quick on a CPU, reports every check as ok, failed
or not run (with the reason), and keeps going when a check fails or lacks a dependency."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import npos

REPO = Path(npos.__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("npos_gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _statuses_are_explained(checks):
    for check in checks:
        assert check["status"] in ("ok", "failed", "not run"), check
        if check["status"] == "not run":
            assert check["reason"].startswith("not run, because "), check
        if check["status"] == "failed":
            assert check["error"] and check["traceback"], check


@pytest.mark.slow
def test_quick_run_on_cpu_writes_both_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu",
                             "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    names = [c["name"] for c in data["checks"]]
    assert names == ["cuda-tests", "extraction", "synthesis-in100", "synthesis-in1k",
                     "ivf-vs-flat", "train-head", "finetune-step", "score"]
    _statuses_are_explained(data["checks"])
    for key in ("date", "torch", "torch_cuda", "npos", "open_clip", "faiss", "python"):
        assert key in data["environment"]
    # Everything this suite needs is installed here: every check runs, and measures ratios.
    assert [c["name"] for c in data["checks"] if c["status"] != "ok"] == []
    assert all(c["ratios"] for c in data["checks"] if c["name"] != "cuda-tests")
    assert "skipped" in data["checks"][0]["results"]["summary"]  # no GPU: cuda tests skip
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert "Quick sizes" in report


def test_missing_dependency_is_reported_and_the_rest_runs(gpu_check, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == "faiss" else real(name, *a))
    gpu_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path),
                    "--only", "ivf-vs-flat", "synthesis-in100"])
    checks = {c["name"]: c for c in
              json.loads((tmp_path / "gpu_check.json").read_text())["checks"]}
    assert checks["ivf-vs-flat"]["status"] == "not run"
    assert checks["ivf-vs-flat"]["reason"] == "not run, because faiss is missing"
    synth = checks["synthesis-in100"]
    assert synth["status"] == "ok"  # the torch engine is measured without faiss
    assert synth["results"]["loop_note"] == "per-class loop not run, because faiss is missing"
    assert [r["name"] for r in synth["ratios"]] == ["engine / bare bmm floor"]
    assert "not run, because faiss is missing" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_or_slow_check_is_reported_and_never_raises(gpu_check):
    def boom(ctx):
        raise RuntimeError("something\nbroke")

    def slow(ctx):
        time.sleep(5)
        return {"ratios": []}

    ctx = {"device": gpu_check.torch.device("cpu"), "quick": True, "sizes": gpu_check.QUICK,
           "limit": 1}
    failed = gpu_check.run_check(gpu_check.Check("boom", "x", (), 1, boom), ctx)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: something broke"
    assert "Traceback" in failed["traceback"]
    late = gpu_check.run_check(gpu_check.Check("slow", "x", (), 1, slow), ctx)
    assert late["status"] == "failed" and late["error"] == "ran past its time limit of 1 s"
    assert late["seconds"] < 4
    gpu = gpu_check.run_check(gpu_check.Check("gpu", "x", ("cuda",), 1, slow),
                              dict(ctx, quick=False))
    assert gpu["status"] == "not run" and "CUDA GPU" in gpu["reason"]
