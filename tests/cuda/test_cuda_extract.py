"""Extraction on CUDA (autocast, pinned host memory, asynchronous copies) against float32
on the CPU, and extraction under torchrun with the nccl backend."""

from __future__ import annotations

import subprocess
import textwrap

import numpy as np
import pytest
import torch

from npos.extract import FeatureExtractor, extract_features
from npos.store import FeatureStore

pytestmark = pytest.mark.cuda

#: Largest accepted relative error (row norm of the difference / row norm of the float32
#: reference) of autocast extraction; bfloat16 keeps 8 significant bits (~0.4 % per value).
MAX_RELATIVE_ERROR = 0.05


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.fixture(scope="module")
def cpu_store(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu") / "cpu.zarr"
    return extract_features(image_folder, str(out), device="cpu", tokens_layer=2, chunk_rows=8,
               batch_size=4, model="npos-tiny", dtype="float32", workers=0, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_autocast_extraction_matches_float32_cpu(cpu_store, image_folder, tmp_path, tiny,
                                                      workers):
    tiny["workers"] = workers  # workers > 0: pinned batches from worker processes
    extractor = FeatureExtractor(device="cuda", tokens_layer=2, chunk_rows=8, batch_size=4,
                                 **tiny).run(image_folder, str(tmp_path / "gpu.zarr"))
    gpu = extractor.store_
    assert gpu.is_complete and gpu.attrs["model"] == "npos-tiny"
    np.testing.assert_array_equal(gpu.array("ids")[:], cpu_store.array("ids")[:])
    errors = {name: _relative_error(np.asarray(gpu.array(name)[:]),
                                    np.asarray(cpu_store.array(name)[:]))
              for name in ("embeddings", "tokens")}
    errors["text_embeddings"] = _relative_error(gpu.read_extra("text_embeddings"),
                                                cpu_store.read_extra("text_embeddings"))
    print(f"CUDA autocast vs CPU float32, max relative error per row: {errors}")
    for name, error in errors.items():
        assert error < MAX_RELATIVE_ERROR, (
            f"{name}: max relative error {error:.4g} of CUDA autocast extraction against "
            f"CPU float32 exceeds {MAX_RELATIVE_ERROR}")


def test_cuda_float16_store_is_finite(image_folder, tmp_path, tiny):
    tiny["dtype"] = "float16"
    store = extract_features(image_folder, str(tmp_path / "s16"), device="cuda",
                             chunk_rows=8, **tiny)
    assert store.array("embeddings").dtype == np.float16
    assert np.isfinite(store.read("embeddings", dtype="float32")).all()


def _torchrun_extract(nproc: int, folder, out, chunk_rows: int, env, python) -> FeatureStore:
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "npos", "extract", str(folder), "--out", str(out), "--model",
               "npos-tiny", "--dtype", "float32", "--chunk-rows", str(chunk_rows),
               "--batch-size", "4", "--workers", "0", "--device", "cuda"]
    result = subprocess.run(command, env=env(OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return FeatureStore.open(str(out))


def test_torchrun_one_gpu_equals_plain_run(image_folder, tmp_path, tiny, child_env, python):
    plain = extract_features(image_folder, str(tmp_path / "plain"), device="cuda",
                             chunk_rows=8, batch_size=4, **tiny)
    run = _torchrun_extract(1, image_folder, tmp_path / "run", 8, child_env, python)
    np.testing.assert_allclose(run.read("embeddings"), plain.read("embeddings"), rtol=1e-4,
                               atol=1e-4)


def test_nccl_collectives_used_by_npos_work_under_torchrun(tmp_path, child_env, python):
    """The nccl calls npos makes under torchrun (process group, object broadcast, barrier),
    in a 1-GPU group (with one GPU npos itself runs a world of 1 without a group)."""
    script = tmp_path / "nccl_check.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        torch.cuda.set_device(0)
        dist.init_process_group("nccl")
        box = [{"rank": dist.get_rank()}]
        dist.broadcast_object_list(box, src=0)
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        dist.barrier()
        print("nccl ok", dist.get_backend(), box[0], float(t.sum()))
        dist.destroy_process_group()
    """))
    result = subprocess.run([python, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "1", str(script)], env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nccl ok nccl {'rank': 0} 4.0" in result.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for 2 nccl ranks")
def test_torchrun_two_gpus_equals_one(image_folder, tmp_path, tiny, child_env, python):
    plain = extract_features(image_folder, str(tmp_path / "plain"), device="cuda",
                             chunk_rows=4, batch_size=4, **tiny)
    two = _torchrun_extract(2, image_folder, tmp_path / "two", 4, child_env, python)
    np.testing.assert_allclose(two.read("embeddings"), plain.read("embeddings"), atol=1e-5)
