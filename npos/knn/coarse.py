"""The coarse quantizer of a CPU store index build: k-means and the list assignment of every
row, on torch products instead of faiss's.

Why: at 1,000,000 x 512 rows and 4,096 lists these two were 150 of a 225 s build on a
2-core CPU (faiss k-means 93 s, list assignment in ``add`` 54-70 s, both float32 BLAS whose
OpenMP threads slowed 1.5-3x whenever another job shared the cores). The products here run
in bfloat16 (AMX/AVX512-BF16 where the CPU has them, ~6x float32 measured on the build box),
one single-threaded worker per row block (:func:`~npos.knn.kth.one_torch_thread`):

* :func:`assign` is **exact** (float32) nevertheless: the bfloat16 scores only shortlist
  :data:`SHORTLIST` centroids per row, which are rescored in float32; a row's list is its
  nearest centroid unless the true nearest falls outside the shortlist;
* :func:`kmeans` assigns in bfloat16 alone (Lloyd's iterations tolerate a rare near-tie
  flipping; the nprobe tuned afterwards measures the lists it gives), seeded.
"""

from __future__ import annotations

import numpy as np
import torch

from npos.knn.kth import one_torch_thread, thread_pool

#: Centroids per row rescored in float32 after the bfloat16 product.
SHORTLIST = 4
#: Rows per worker block (a (rows, nlist) bfloat16 score block: 32 MiB at 4,096 lists).
BLOCK_ROWS = 4096


#: Extra columns of the augmented bfloat16 operands (the bias column, padded so the inner
#: dimension stays a multiple of 32 when D is).
_PAD = 32


def _augmented(c: torch.Tensor) -> torch.Tensor:
    """bfloat16 ``[c, -|c|^2 / 2, 0...]`` (nlist, D + _PAD): with rows ``[x, 1, 0...]`` one
    product gives ``x.c - |c|^2 / 2``, whose argmax is the nearest centroid in L2."""
    bias = c.square().sum(1, keepdim=True).mul_(-0.5)
    return torch.cat([c, bias, c.new_zeros((c.shape[0], _PAD - 1))], 1).to(torch.bfloat16)


def _scores(x: torch.Tensor, c_aug: torch.Tensor) -> torch.Tensor:
    """(rows, nlist) bfloat16 ``x.c - |c|^2 / 2`` (one product, no float32 pass over the
    block: the bias is the augmented column)."""
    x_aug = torch.cat([x, x.new_ones((x.shape[0], 1)), x.new_zeros((x.shape[0], _PAD - 1))], 1)
    return torch.mm(x_aug.to(torch.bfloat16), c_aug.T)


def _map_blocks(fn, n: int) -> list:
    starts = range(0, n, BLOCK_ROWS)
    workers = max(1, min(len(starts), torch.get_num_threads()))
    with one_torch_thread():
        return list(thread_pool(workers).map(fn, starts))


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) int64 nearest centroid (L2) of each row of ``x`` (n, D) float32: bfloat16
    shortlist of :data:`SHORTLIST`, float32 rescoring."""
    xt, c = torch.from_numpy(x), torch.from_numpy(centroids)
    c_aug, half = _augmented(c), c.square().sum(1).mul_(0.5)
    short = min(SHORTLIST, c.shape[0])

    def block(start: int) -> torch.Tensor:
        rows = xt[start:start + BLOCK_ROWS]
        top = _scores(rows, c_aug).topk(short, dim=1).indices  # (b, short)
        exact = torch.bmm(c[top], rows[:, :, None])[..., 0] - half[top]
        return top.gather(1, exact.argmax(dim=1, keepdim=True))[:, 0]

    return torch.cat(_map_blocks(block, len(x))).numpy()


def kmeans(x: np.ndarray, nlist: int, *, niter: int, seed: int) -> np.ndarray:
    """(nlist, D) float32 centroids of ``x`` (n >= nlist rows): seeded random rows, then
    ``niter`` Lloyd iterations with bfloat16 assignment; an empty list is re-seeded with a
    random row."""
    xt = torch.from_numpy(x)
    g = torch.Generator().manual_seed(seed)
    c = xt[torch.randperm(len(x), generator=g)[:nlist]].clone()
    for _ in range(niter):
        c_aug = _augmented(c)
        def nearest(start: int, c_aug: torch.Tensor = c_aug) -> torch.Tensor:
            # max(dim).indices: 2.7x faster than argmax here
            return _scores(xt[start:start + BLOCK_ROWS], c_aug).max(dim=1).indices

        labels = torch.cat(_map_blocks(nearest, len(x)))
        counts = torch.bincount(labels, minlength=nlist)
        c = torch.zeros_like(c).index_add_(0, labels, xt).div_(counts.clamp_min(1)[:, None])
        empty = torch.nonzero(counts == 0)[:, 0]
        if empty.numel():
            c[empty] = xt[torch.randperm(len(x), generator=g)[:empty.numel()]]
    return c.numpy()
