"""Offline NPOS over **all** rows of a store: ``--bank all`` (per class) and ``--scope global``
(class-agnostic, for unlabeled stores). ``--bank sample`` (the paper's seeded per-class sample)
stays in :mod:`npos.synthesize.offline`.

For one *bank* (a class's valid rows, or every valid row of the store):

1. one :class:`~npos.knn.KnnIndex` over the bank (:func:`fit_bank_index`; ``auto`` is
   :func:`npos.knn.resolve_knn_backend` for the bank size: exact torch for small banks,
   faiss-flat, then faiss-ivf at scale);
2. ``d_K`` of **every** bank row: its K-th nearest *other* row (search K+1, drop the row's own
   id), computed in fixed query chunks;
3. boundary: the ``select`` rows with the largest ``d_K``;
4. sources: ``S`` boundary positions drawn from a seeded permutation of the boundary, cycled
   when ``S > select`` (``--scope class``: ``S = pick`` per class; ``--scope global``:
   ``S = ceil(count / keep)``, the output cut to ``count``);
5. ``candidates`` noise draws around each source (``sphere`` or ``raw``, as the engine), scored
   by their K-th-NN distance to the whole bank; the ``keep`` farthest kept per source.

Randomness: the source permutation of a bank comes from a generator seeded by
``(seed, key)`` and the noise of source ``j`` from one seeded by ``(seed, key, j)`` (key: the
class id, or -1 for the global bank; :func:`seeded`). So no rank has to draw another rank's
noise, and the output does not depend on the number of processes or on the memory budget.

Under ``torchrun`` (:class:`Ranks`) the query chunks of step 2 and the source chunks of step 5
are dealt round-robin to the ranks and gathered on every rank; chunk sizes depend on the
budget and the bank, never on the world size, so W processes compute exactly what one does.

Memory: ``--scope class`` streams the store once per *group* of classes whose float32 rows
fit ``memory_budget`` (never all classes at once); ``--scope global`` needs every valid row in
float32 (the index holds them) and refuses a budget below that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from npos.knn.index import KnnIndex
from npos.knn.ivf import KnnCache
from npos.synthesize.config import SynthesisConfig
from npos.synthesize.engine import _finish, _perturb

GLOBAL_KEY = -1


@dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    def mine(self, items: range) -> range:
        """This rank's share of ``items`` (round-robin)."""
        return items[self.rank::self.world]

    def merge(self, part: dict[int, Any]) -> dict[int, Any]:
        """Every rank's ``{chunk start: result}`` joined, on every rank."""
        if self.world == 1:
            return part
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, part)
        return {k: v for p in parts for k, v in p.items()}


#: The rank of a run without ``torchrun``.
ONE_PROCESS = Ranks()


def seeded(*key: int) -> torch.Generator:
    """A CPU generator seeded by the integers ``key`` (mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in key]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


def fit_bank_index(bank: torch.Tensor, config: SynthesisConfig, *, seed: int,
                   memory_budget: int, cache: KnnCache | None, key: int) -> KnnIndex:
    """THE index of a synthesis bank (one place, so a persisted store index can replace it)."""
    return KnnIndex(config.backend, seed=seed, memory_budget=memory_budget, cache=cache,
                    cache_key=("synthesize-all", key)).fit(bank)


def query_rows(index: KnnIndex, k: int, memory_budget: int) -> int:
    """Query rows per search call: the (rows, bank) similarity block of the torch backend,
    or the (rows, k + 1) results and the queries themselves for faiss, under the budget."""
    per_row = 4 * index.n_ if index.backend_ == "torch" else 12 * (k + 1) + 4 * index.dim_
    return int(min(65536, max(1, memory_budget // per_row)))


def _kth_other(index: KnnIndex, rows: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """K-th-NN distance of bank rows ``offset..`` to the *other* bank rows (search k + 1 and
    drop the row's own id, or the last column when a duplicate hid it)."""
    dist, ids = index.search(rows, k + 1)
    own = ids.cpu() == torch.arange(offset, offset + rows.shape[0])[:, None]
    early = own[:, :k].any(dim=1)
    return torch.where(early, dist.cpu()[:, k], dist.cpu()[:, k - 1])


def bank_kth_distance(index: KnnIndex, bank: torch.Tensor, k: int, *, chunk: int,
                      ranks: Ranks = ONE_PROCESS) -> torch.Tensor:
    """(N,) float32 distance of every bank row to its K-th nearest other row (CPU)."""
    n = bank.shape[0]
    part = {s: _kth_other(index, bank[s:s + chunk], s, k)
            for s in ranks.mine(range(0, n, chunk))}
    merged = ranks.merge(part)
    return torch.cat([merged[s] for s in range(0, n, chunk)])


@dataclass
class BankOutliers:
    """Outliers of one bank, ordered by source then rank.

    Attributes
    ----------
    outliers : Tensor of shape (M, D)
        Raw vectors (``sphere``: the source row's norm).
    distance : Tensor of shape (M,)
        K-th-NN distance of each outlier to the bank (normalized vectors).
    source : Tensor of shape (M,)
        Bank position of the row each outlier was drawn around.
    bank_distance : Tensor of shape (N,)
        ``d_K`` of every bank row.
    boundary : Tensor of shape (select,)
        Bank positions of the boundary, by decreasing ``d_K``.
    outward : float
        Share of the candidates farther from the bank than their source row.
    backend : str
        The index's concrete backend.
    """

    outliers: torch.Tensor
    distance: torch.Tensor
    source: torch.Tensor
    bank_distance: torch.Tensor
    boundary: torch.Tensor
    outward: float
    backend: str


def _source_order(select: int, sources: int, generator: torch.Generator) -> torch.Tensor:
    """``sources`` boundary positions: a seeded permutation of ``range(select)``, cycled."""
    rounds = math.ceil(sources / select)
    return torch.cat([torch.randperm(select, generator=generator)
                      for _ in range(rounds)])[:sources]


def _score_sources(raw, index, centers, js, cfg, seed, key):
    """Candidates around ``centers`` (s, D) (noise of source j from ``seeded(seed, key, j)``),
    scored against the bank: (kept outliers (s*keep, D), their distances, candidate distances
    (s, m))."""
    s, dim = centers.shape
    noise = torch.stack([torch.randn((cfg.candidates, dim), generator=seeded(seed, key, j))
                         for j in js]).to(raw.device)
    v, scale = _perturb(centers[None], noise[None], cfg.resolved_sigma, cfg.noise_space)
    cand = index.kth_distance(v.view(-1, dim), cfg.k).cpu().view(s, cfg.candidates)
    kept_d, kept = cand.topk(cfg.keep, dim=1)
    v_kept = v[0].gather(1, kept.to(v.device)[..., None].expand(s, cfg.keep, dim))
    out = _finish(v_kept[None], scale).reshape(s * cfg.keep, dim).cpu()
    return out, kept_d.reshape(-1), cand


def synthesize_bank(raw: torch.Tensor, config: SynthesisConfig, *, sources: int, key: int,
                    seed: int, memory_budget: int, cache: KnnCache | None = None,
                    ranks: Ranks = ONE_PROCESS) -> BankOutliers:
    """NPOS over a whole bank (see the module docstring).

    Parameters
    ----------
    raw : Tensor of shape (N, D)
        float32 bank rows (any device; the index lives there).
    config : SynthesisConfig
        ``k < N`` and ``select <= N`` are the caller's checks.
    sources : int
        Boundary points to draw candidates around.
    key : int
        Separates the random streams of banks (class id, or :data:`GLOBAL_KEY`).
    """
    n, dim = raw.shape
    index = fit_bank_index(raw, config, seed=seed, memory_budget=memory_budget, cache=cache,
                           key=key)
    bank_d = bank_kth_distance(index, raw, config.k,
                               chunk=query_rows(index, config.k, memory_budget), ranks=ranks)
    boundary = bank_d.topk(config.select).indices
    src = boundary[_source_order(config.select, sources, seeded(seed, key))]
    per = max(1, min(sources, memory_budget // (8 * config.candidates * dim)))
    part = {}
    for s0 in ranks.mine(range(0, sources, per)):
        js = range(s0, min(sources, s0 + per))
        out, kept_d, cand = _score_sources(raw, index, raw[src[s0:js.stop].to(raw.device)],
                                           js, config, seed, key)
        outward = int((cand > bank_d[src[s0:js.stop]][:, None]).sum())
        part[s0] = (out, kept_d, outward)
    merged = ranks.merge(part)
    starts = range(0, sources, per)
    outliers = torch.cat([merged[s][0] for s in starts])
    distance = torch.cat([merged[s][1] for s in starts]).float()
    outward = sum(merged[s][2] for s in starts) / (sources * config.candidates)
    return BankOutliers(outliers, distance, src.repeat_interleave(config.keep), bank_d,
                        boundary, outward, index.backend_)
