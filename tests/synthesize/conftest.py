"""Fixtures and a plain reference implementation for the synthesis tests."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F


#: Classes and sizes of the :func:`labelled` store.
NAMES = ["cat", "dog", "fox"]
SIZES = (70, 95, 120)


@pytest.fixture
def labelled(tmp_path, make_store, rng):
    """Three classes of different sizes, interleaved, plus 15 unlabeled rows (label -1)."""
    centres = rng.normal(size=(3, 16))
    y = np.concatenate([np.repeat(np.arange(3), SIZES), np.full(15, -1)])
    y = y[rng.permutation(y.size)]
    x = (centres[np.maximum(y, 0)] + 0.5 * rng.normal(size=(y.size, 16))) * 8
    return make_store(tmp_path / "f.zarr", x, y, class_names=NAMES, chunk_rows=32)


def clustered_banks(n_classes=4, queue=60, dim=16, *, seed=0, scale=5.0):
    """Per-class banks: anisotropic Gaussian blobs around random centres, norms ~``scale``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn((n_classes, 1, dim), generator=g)
    spread = torch.rand((n_classes, 1, dim), generator=g) * 0.5 + 0.1
    banks = centres + spread * torch.randn((n_classes, queue, dim), generator=g)
    return scale * banks / banks.norm(dim=-1, keepdim=True).mean()


def reference_kth(queries, bank, k, *, exclude_self=False):
    """K-th-NN distance by brute force in float64 with a full sort."""
    d = torch.cdist(F.normalize(queries.double(), dim=-1), F.normalize(bank.double(), dim=-1))
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, k - 1]


def reference_npos(banks, cfg, seed, ready=None):
    """NPOS as a plain per-class loop, drawing randomness in the engine's documented order."""
    g = torch.Generator().manual_seed(seed)
    classes = range(banks.shape[0]) if ready is None else ready.nonzero().flatten().tolist()
    classes = list(classes)
    picks = torch.rand((len(classes), cfg.select), generator=g).argsort(dim=1)[:, :cfg.pick]
    sigma = cfg.resolved_sigma
    out, labels, dist, src = [], [], [], []
    for r, c in enumerate(classes):
        bank = banks[c].double()
        bank_d = reference_kth(bank, bank, cfg.k, exclude_self=True)
        boundary = bank_d.argsort(descending=True)[:cfg.select]
        noise = torch.randn((cfg.pick, cfg.candidates, banks.shape[2]), generator=g).double()
        for j in range(cfg.pick):
            b = bank[boundary[picks[r, j]]]
            if cfg.noise_space == "sphere":
                cand = b.norm() * F.normalize(b / b.norm() + sigma * noise[j], dim=-1)
            else:
                cand = b + sigma * noise[j]
            cand_d = reference_kth(cand, bank, cfg.k)
            top = cand_d.argsort(descending=True)[:cfg.keep]
            out.append(cand[top])
            labels += [c] * cfg.keep
            dist.append(cand_d[top])
            src += [int(boundary[picks[r, j]])] * cfg.keep
    return torch.cat(out), torch.tensor(labels), torch.cat(dist), torch.tensor(src)


def _perturb(b, noise, cfg):
    if cfg.noise_space == "sphere":
        return b.norm() * F.normalize(b / b.norm() + cfg.resolved_sigma * noise, dim=-1)
    return b + cfg.resolved_sigma * noise


def reference_gaussian(banks, cfg, seed):
    """The ``gaussian`` control as a plain per-class loop (all classes ready)."""
    g = torch.Generator().manual_seed(seed)
    n_classes, q, dim = banks.shape
    picks = torch.rand((n_classes, q), generator=g).argsort(dim=1)[:, :cfg.pick]
    out, dist = [], []
    for c in range(n_classes):
        bank = banks[c].double()
        noise = torch.randn((cfg.pick, cfg.keep, dim), generator=g).double()
        for j in range(cfg.pick):
            cand = _perturb(bank[picks[c, j]], noise[j], cfg)
            out.append(cand)
            dist.append(reference_kth(cand, bank, cfg.k))
    return torch.cat(out), torch.cat(dist), picks


def reference_vos(banks, cfg, seed):
    """The ``vos`` control as a plain per-class loop (all classes ready), in float64."""
    g = torch.Generator().manual_seed(seed)
    n_classes, q, dim = banks.shape
    x = banks.double()
    if cfg.noise_space == "sphere":
        x = F.normalize(x, dim=-1)
    means = x.mean(dim=1)
    centred = (x - means[:, None]).reshape(-1, dim)
    cov = centred.T @ centred / (n_classes * (q - 1))
    cov = cov + 1e-4 * torch.diagonal(cov).mean() * torch.eye(dim, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    out, dist = [], []
    for c in range(n_classes):
        eps = torch.randn((cfg.pick * cfg.candidates, dim), generator=g).double()
        order = eps.square().sum(dim=1).argsort(descending=True)[:cfg.pick * cfg.keep]
        kept = means[c] + eps[order] @ chol.T
        if cfg.noise_space == "sphere":
            kept = F.normalize(kept, dim=-1) * banks[c].double().norm(dim=-1).mean()
        out.append(kept)
        dist.append(reference_kth(kept, banks[c], cfg.k))
    return torch.cat(out), torch.cat(dist), means, cov


@pytest.fixture
def banks():
    return clustered_banks()


@pytest.fixture
def ref():
    """The reference helpers (test modules cannot import conftest under importlib mode)."""
    return SimpleNamespace(banks=clustered_banks, kth=reference_kth, npos=reference_npos,
                           gaussian=reference_gaussian, vos=reference_vos)


@pytest.fixture
def torchrun_pair():
    """:func:`synthesize_one_and_two_processes` (a fixture: test modules cannot import
    conftest)."""
    return synthesize_one_and_two_processes


def synthesize_one_and_two_processes(args, tmp_path):
    """Run ``npos`` with ``args`` in this process and under ``torchrun`` with 2 processes;
    the two output stores (one, two)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from npos.cli import cli
    from npos.store import FeatureStore

    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    one = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "one.zarr")])
    assert one.exit_code == 0, one.output
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "npos", *args, "--out", str(tmp_path / "two.zarr")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return (FeatureStore.open(str(tmp_path / "one.zarr")),
            FeatureStore.open(str(tmp_path / "two.zarr")))
