"""``npos score`` on CUDA equals the CPU result (head, knn with the torch backend, mcm)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from npos.cli import cli
from npos.synthesize import SynthesisConfig
from npos.train_head import HeadConfig, train_head

pytestmark = pytest.mark.cuda


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: np.array([float(r[key]) for r in rows]) for key in ("head", "knn", "mcm")}


@pytest.mark.parametrize("knn_backend", ["torch", "auto"])
def test_score_on_cuda_equals_cpu(feature_world, tmp_path, knn_backend):
    head = tmp_path / "head"
    train_head(feature_world["train"], str(head),
               HeadConfig(epochs=1, batch_size=128, queue=64, seed=0,
                          synthesis=SynthesisConfig(k=8, select=20, pick=2, candidates=32,
                                                    keep=2)), device="cpu")
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = tmp_path / f"{device}.csv"
        result = CliRunner().invoke(cli, [
            "score", feature_world["ood"], "--head", str(head), "--train",
            feature_world["train"], "--scores", "head,knn,mcm", "--knn-k", "10",
            "--knn-backend", knn_backend, "--device", device, "--batch-size", "64",
            "--out", str(out[device])])
        assert result.exit_code == 0, result.output
    cpu, gpu = _read(out["cpu"]), _read(out["cuda"])
    for name in ("head", "knn", "mcm"):
        scale = max(1.0, float(np.abs(cpu[name]).max()))
        np.testing.assert_allclose(gpu[name], cpu[name], atol=1e-3 * scale, rtol=1e-3,
                                   err_msg=name)
