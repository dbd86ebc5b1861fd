"""Synthesis and kNN on CUDA equal their CPU results (torch engine, faiss GPU indexes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from npos.synthesize import KnnIndex, SynthesisConfig, synthesize
from npos.knn.kth import kth_largest_

pytestmark = pytest.mark.cuda


def _banks(n_classes=5, queue=160, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn((n_classes, 1, dim), generator=g)
    spread = torch.rand((n_classes, 1, dim), generator=g) * 0.5 + 0.1
    banks = centres + spread * torch.randn((n_classes, queue, dim), generator=g)
    return 10 * banks / banks.norm(dim=-1, keepdim=True).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_largest_on_cuda_is_kthvalue_and_exact(dtype):
    # On CUDA the select is torch.kthvalue (the CPU path is numpy's partition).
    x = torch.rand((3, 70, 300), device="cuda").to(dtype)
    expected = x.float().sort(dim=-1).values[..., 300 - 41]
    got = kth_largest_(x.clone(), 41)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert torch.equal(got.float(), expected)


@pytest.mark.parametrize("method,space", [("npos", "sphere"), ("npos", "raw"),
                                          ("gaussian", "sphere"), ("vos", "sphere")])
@pytest.mark.parametrize("budget", [256 * 2**20, 2**18])  # one chunk / many chunks + blocks
def test_engine_on_cuda_equals_cpu(method, space, budget):
    banks = _banks()
    cfg = SynthesisConfig(method=method, noise_space=space, k=20, select=60, pick=3,
                          candidates=64, keep=2, backend="torch")
    ready = torch.tensor([True, False, True, True, True])
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = synthesize(banks.to(device), cfg, ready=ready,
                                  generator=torch.Generator().manual_seed(7),
                                  memory_budget=budget, return_stats=method != "vos")
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu.outliers.device.type == "cuda"
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    if method == "npos":
        # Boundary sets equal (order inside a set may differ only between exact ties).
        assert torch.equal(gpu.stats.boundary.cpu().sort(dim=1).values,
                           cpu.stats.boundary.sort(dim=1).values)
        torch.testing.assert_close(gpu.stats.bank_distance.cpu(), cpu.stats.bank_distance,
                                   atol=2e-5, rtol=1e-5)
    if method != "vos":
        assert torch.equal(gpu.source_index.cpu(), cpu.source_index)
    torch.testing.assert_close(gpu.outliers.cpu(), cpu.outliers, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.knn_distance.cpu(), cpu.knn_distance, atol=2e-5, rtol=1e-5)


def test_engine_on_cuda_with_a_cuda_generator_is_seeded():
    banks = _banks().cuda()
    cfg = SynthesisConfig(k=20, select=60, pick=2, candidates=32, keep=2)
    a, b = (synthesize(banks, cfg, generator=torch.Generator("cuda").manual_seed(3))
            for _ in range(2))
    assert torch.equal(a.outliers, b.outliers) and torch.isfinite(a.outliers).all()


def test_torch_knn_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(3000, 48, generator=g), torch.randn(200, 48, generator=g)
    cpu_d, cpu_i = KnnIndex("torch").fit(bank).search(queries, 10)
    index = KnnIndex("torch").fit(bank.cuda())
    assert index.on_gpu_
    gpu_d, gpu_i = index.search(queries.cuda(), 10)
    torch.testing.assert_close(gpu_d.cpu(), cpu_d, atol=1e-5, rtol=1e-5)
    assert (gpu_i.cpu() == cpu_i).float().mean() > 0.99
    kth = index.kth_distance(bank.cuda(), 10, exclude_self=True)
    ref = KnnIndex("torch").fit(bank).kth_distance(bank, 10, exclude_self=True)
    torch.testing.assert_close(kth.cpu(), ref, atol=1e-5, rtol=1e-5)


def _faiss_gpu():
    faiss = pytest.importorskip("faiss", reason="faiss is not installed")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0:
        pytest.skip("faiss has no GPU support here (faiss.get_num_gpus() == 0); "
                    'install the GPU build: pip install "npos[gpu]"')
    return faiss


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf"])
def test_faiss_gpu_index_equals_cpu(backend):
    _faiss_gpu()
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(50, 64, generator=g), dim=1)
    bank = centres[torch.arange(20000) % 50] + 0.05 * torch.randn(20000, 64, generator=g)
    queries = centres[torch.arange(300) % 50] + 0.05 * torch.randn(300, 64, generator=g)
    params = {"nlist": 64, "nprobe": 64} if backend == "faiss-ivf" else {}  # IVF, exhaustive
    gpu = KnnIndex(backend, **params).fit(bank)
    cpu = KnnIndex(backend, device="cpu", **params).fit(bank)
    assert gpu.on_gpu_ and not cpu.on_gpu_
    gpu_d, gpu_i = gpu.search(queries, 20)
    cpu_d, cpu_i = cpu.search(queries, 20)
    torch.testing.assert_close(gpu_d, cpu_d, atol=1e-4, rtol=1e-4)
    assert (gpu_i == cpu_i).float().mean() > 0.98


def test_faiss_gpu_ivf_tuned_nprobe_reaches_its_recall():
    _faiss_gpu()
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(100, 64, generator=g), dim=1)
    bank = centres[torch.arange(50000) % 100] + 0.08 * torch.randn(50000, 64, generator=g)
    index = KnnIndex("faiss-ivf", target_recall=0.95).fit(bank)
    assert index.on_gpu_
    index.search(bank[:10], 10)
    assert index.recall_[10] >= 0.95
    exact = KnnIndex("faiss-flat").fit(bank).kth_distance(bank[:500], 10)
    approx = index.kth_distance(bank[:500], 10)
    assert (approx >= exact - 1e-5).all()  # approximate neighbours are never nearer


@pytest.mark.parametrize("scope", ["class", "global"])
def test_all_rows_synthesis_on_cuda_equals_cpu(scope, tmp_path, make_store):
    # --bank all / --scope global: the bank and its index on the GPU, same boundary and
    # outliers as on the CPU (the noise is drawn on the CPU in both cases).
    from npos.synthesize.offline import synthesize_store

    banks = _banks(n_classes=3, queue=150)
    labels = torch.arange(3).repeat_interleave(150)
    store = make_store(tmp_path / "f.zarr", banks.reshape(-1, banks.shape[-1]).numpy(),
                        labels.numpy(), chunk_rows=64)
    cfg = SynthesisConfig(k=10, select=40, pick=3, candidates=60, keep=2)
    kwargs = {"bank": "all", "scope": scope, "count": 9 if scope == "global" else None}
    cpu = synthesize_store(store, cfg, device="cpu", **kwargs)
    gpu = synthesize_store(store, cfg, device="cuda", **kwargs)
    for name, part in cpu.banks.items():
        assert set(gpu.banks[name].boundary.tolist()) == set(part.boundary.tolist())
    assert gpu.outliers.device.type == "cpu" and torch.equal(gpu.labels, cpu.labels)
    torch.testing.assert_close(gpu.outliers, cpu.outliers, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.knn_distance, cpu.knn_distance, atol=1e-4, rtol=1e-4)
