"""resolve_device: one set of spellings for every API and command."""

import pytest
import torch

from npos.device import resolve_device
from npos.errors import ParameterError


def test_auto_and_none_pick_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_auto_picks_cuda_when_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_spellings(spec):
    assert resolve_device(spec) == torch.device("cpu")


def test_cuda_index_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")


def test_cuda_index_beyond_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ParameterError, match=r"--device cuda:3: only 1 CUDA GPU"):
        resolve_device("cuda:3")


def test_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParameterError, match="no CUDA GPU is visible"):
        resolve_device("cuda")


@pytest.mark.parametrize("spec", ["gpu", "cpu:1", "cuda:x", "mps", 3])
def test_unknown_spellings(spec):
    with pytest.raises(ParameterError, match=r"--device must be one of auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_every_command_refuses_a_bad_device_in_one_line(tmp_path):
    from click.testing import CliRunner

    from npos.cli import cli

    store, out = str(tmp_path / "x.zarr"), str(tmp_path / "out")
    for args in (["extract", str(tmp_path), "--model", "npos-tiny"],
                 ["synthesize", store], ["train-head", store], ["finetune", store,
                 "--model", "npos-tiny"], ["evaluate", "--id", store, "--ood", f"o={store}"],
                 ["score", store], ["demo"]):
        result = CliRunner().invoke(cli, [*args, "--out", out, "--device", "gpu"])
        assert result.exit_code == 2, (args, result.output)
        assert result.output.strip().splitlines()[-1] == (
            "Error: --device must be one of auto, cpu, cuda or cuda:N; got 'gpu'"), args
