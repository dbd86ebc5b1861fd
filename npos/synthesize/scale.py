"""Offline NPOS over **all** rows of a store: ``--bank all`` (per class) and ``--scope global``
(class-agnostic, for unlabeled stores). ``--bank sample`` (the paper's seeded per-class sample)
stays in :mod:`npos.synthesize.offline`.

For one *bank* (a class's valid rows, or every valid row of the store):

1. how the bank is searched (:mod:`npos.synthesize.bank_search`): the store's persisted
   :class:`~npos.knn.StoreIndex` when there is one (``--scope global``; ``--bank all`` for a
   class ``auto`` sends to IVF, filtered to the class), else one :class:`~npos.knn.KnnIndex`
   over the bank's rows in memory (:func:`fit_bank_index`; ``auto`` is
   :func:`npos.knn.resolve_knn_backend` for the bank size: exact torch for small banks,
   faiss-flat, then faiss-ivf at scale);
2. ``d_K`` of **every** bank row: its K-th nearest *other* row (search K+1, drop the row's own
   id), computed in fixed query chunks; through a whole CPU store index, list by list
   (:mod:`npos.knn.store_index_lists`: one matrix product per IVF list, ~25x faster than a
   faiss search per row at 1M rows);
3. boundary: the ``select`` rows with the largest ``d_K``;
4. sources: ``S`` boundary positions drawn from a seeded permutation of the boundary, cycled
   when ``S > select`` (``--scope class``: ``S = pick`` per class; ``--scope global``:
   ``S = ceil(count / keep)``, the output cut to ``count``);
5. ``candidates`` noise draws around each source (``sphere`` or ``raw``, as the engine), scored
   by their K-th-NN distance to the whole bank (one search per batch of sources, the batch
   sized by the budget); the ``keep`` farthest kept per source.

Randomness: the source permutation of a bank comes from a generator seeded by
``(seed, key)`` and the noise of source ``j`` from one seeded by ``(seed, key, j)`` (key: the
class id, or -1 for the global bank; :func:`seeded`). So no rank has to draw another rank's
noise, and the output does not depend on the number of processes or on the memory budget
(with a store index's list-by-list pass a smaller budget splits long lists into query blocks,
which may change ``d_K`` in the last float bits).

Under ``torchrun`` (:class:`Ranks`) the query chunks (or IVF lists) of step 2 and the source
chunks of step 5 are dealt round-robin to the ranks and gathered on every rank; chunk sizes
depend on the budget and the bank, never on the world size, so W processes compute exactly
what one does.

Memory: ``--scope class`` streams the store once per *group* of classes whose float32 rows
fit ``memory_budget`` (never all classes at once); ``--scope global`` without a store index
needs every valid row in float32 (the in-memory index holds them) and refuses a budget below
that; with one it streams the store block by block and holds ``d_K`` (4 bytes a row), the
index and one block.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from npos.knn.index import KnnIndex
from npos.knn.ivf import KnnCache
from npos.knn.kth import (DEFAULT_MEMORY_BUDGET, kth_largest_, one_torch_thread,
                          similarity_to_distance, thread_pool)
from npos.synthesize.bank_search import IndexedBank, MemoryBank
from npos.synthesize.config import SynthesisConfig
from npos.synthesize.engine import _finish, _perturb

GLOBAL_KEY = -1
#: A searched bank (:mod:`npos.synthesize.bank_search`).
Bank = MemoryBank | IndexedBank


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


def bank_kth_distance(bank: Bank, k: int, *, chunk: int, ranks: Ranks = ONE_PROCESS,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """(N,) float32 distance of every bank row to its K-th nearest other row (CPU): list by
    list when the bank is a whole CPU store index (:meth:`IndexedBank.pass_lists`, the ranks
    sharing the lists), else by searches of ``chunk`` query rows (the ranks sharing them)."""
    n = bank.n
    if isinstance(bank, IndexedBank) and (lists := bank.pass_lists(memory_budget)):
        mine = bank.kth_of_lists(ranks.mine(range(lists)), k, memory_budget)
        joined = ranks.merge({ranks.rank: mine})
        out = torch.empty(n)
        for r in range(ranks.world):
            positions, dist = joined[r]
            out[torch.from_numpy(positions)] = dist
        return out
    part = {s: bank.kth_of_rows(s, min(n, s + chunk), k)
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


def _draw_noise(js: range, shape: tuple[int, int], seed: int, key: int) -> torch.Tensor:
    """(len(js), *shape) standard normal noise, source j's from ``seeded(seed, key, j)``,
    drawn in place by the CPU threads (each source has its own generator, so the values do
    not depend on the thread count; at 1500 x 512 per source the draws are a large share of
    global synthesis)."""
    noise = torch.empty((len(js), *shape))

    def draw(i: int) -> None:
        torch.randn(shape, generator=seeded(seed, key, js[i]), out=noise[i])

    workers = max(1, min(len(js), torch.get_num_threads()))
    if workers == 1:
        for i in range(len(js)):
            draw(i)
    else:
        list(thread_pool(workers).map(draw, range(len(js))))
    return noise


#: Per-thread scratch tensors of :func:`_one_source`, reused from source to source. Why:
#: fresh multi-megabyte blocks per source, freed on worker threads, fragmented glibc's
#: per-thread heaps: peak RSS grew by ~0.1 MB per source (+3.6 GB for 50,000 sources at 1M
#: rows, measured); with the blocks reused it stays flat.
_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensors = _SCRATCH.__dict__.setdefault("tensors", {})
    if name not in tensors or tensors[name].shape != shape:
        tensors[name] = torch.empty(shape)
    return tensors[name]


def _one_source(center: torch.Tensor, near: torch.Tensor, j: int, cfg: SynthesisConfig,
                seed: int, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates around one raw ``center`` (D,), scored against the unit rows ``near``
    (depth, D) of its neighbourhood: (kept outliers (keep, D), their distances, candidate
    distances (m,)). The noise is source j's (:func:`_draw_noise`'s stream). Candidate
    ``v = c + sigma eps`` (``c``: the unit source for ``sphere``, the raw row for ``raw``,
    as :func:`~npos.synthesize.engine._perturb`) is never formed: with ``p = eps @ [near;
    c].T``, ``v.x = c.x + sigma p_x`` and ``|v|^2 = |c|^2 + 2 sigma p_c + sigma^2 |eps|^2``,
    so the noise matrix is written once, read by one product and one norm, in cache."""
    sigma, m, depth = cfg.resolved_sigma, cfg.candidates, near.shape[0]
    eps = torch.randn((m, center.numel()), generator=seeded(seed, key, j),
                      out=_scratch("eps", (m, center.numel())))
    scale = None
    c = center
    if cfg.noise_space == "sphere":
        scale = center.norm()
        c = center / scale.clamp_min(1e-12)
    w = torch.cat([near, c[None]], out=_scratch("w", (depth + 1, center.numel())))
    p = torch.mm(eps, w.T, out=_scratch("p", (m, depth + 1)))
    norm2 = torch.linalg.vector_norm(eps, dim=1).square_().mul_(sigma * sigma)
    norm2.add_(p[:, -1], alpha=2 * sigma).add_(c.dot(c))
    sims = _scratch("sims", (m, depth)).copy_(p[:, :-1])
    sims.mul_(sigma).add_(near @ c).div_(norm2.sqrt_().clamp_min_(1e-12)[:, None])
    cand = similarity_to_distance(kth_largest_(sims, cfg.k))
    kept_d, kept = cand.topk(cfg.keep)
    v = eps[kept].mul_(sigma).add_(c)  # the engine's candidate vectors, for the kept only
    return (v if scale is None else _finish(v, scale)), kept_d, cand


def _score_locally(bank, src, js, cfg, seed, key):
    """:func:`_score_sources` for a bank that scores candidates in their source's
    neighbourhood (:meth:`IndexedBank.neighbours`): one source per single-threaded
    worker (:func:`~npos.knn.kth.one_torch_thread`), so each source's noise
    stays in cache and no result depends on the thread count or the batch."""
    centers = bank.rows(src)
    workers = max(1, min(len(js), torch.get_num_threads()))

    def one(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        near = bank.neighbours(int(src[i]))  # a view: no (s, depth, D) copy per batch
        return _one_source(centers[i], near, js[i], cfg, seed, key)

    with one_torch_thread():
        parts = list(thread_pool(workers).map(one, range(len(js))))
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.stack([p[2] for p in parts]))


def _score_sources(bank, src, js, cfg, seed, key, max_elements):
    """Candidates around the bank rows ``src`` (s,) (noise of source j from
    ``seeded(seed, key, j)``), scored against the bank: (kept outliers (s*keep, D), their
    distances, candidate distances (s, m))."""
    if bank.scores_locally:
        return _score_locally(bank, src, js, cfg, seed, key)
    centers = bank.rows(src)
    s, dim = centers.shape
    noise = _draw_noise(js, (cfg.candidates, dim), seed, key).to(bank.device)
    v, scale = _perturb(centers[None], noise[None], cfg.resolved_sigma, cfg.noise_space)
    cand = bank.candidate_kth(v[0], src, cfg.k, max_elements)
    kept_d, kept = cand.topk(cfg.keep, dim=1)
    v_kept = v[0].gather(1, kept.to(v.device)[..., None].expand(s, cfg.keep, dim))
    out = _finish(v_kept[None], scale).reshape(s * cfg.keep, dim).cpu()
    return out, kept_d.reshape(-1), cand


def memory_bank(raw: torch.Tensor, config: SynthesisConfig, *, seed: int, memory_budget: int,
                cache: KnnCache | None = None, key: int) -> MemoryBank:
    """float32 rows ``raw`` with their own index (:func:`fit_bank_index`)."""
    return MemoryBank(raw, fit_bank_index(raw, config, seed=seed, memory_budget=memory_budget,
                                          cache=cache, key=key))


def synthesize_bank(bank: Bank, config: SynthesisConfig, *, sources: int, key: int, seed: int,
                    memory_budget: int, ranks: Ranks = ONE_PROCESS) -> BankOutliers:
    """NPOS over a whole bank (see the module docstring).

    Parameters
    ----------
    bank : MemoryBank or IndexedBank
        The bank and how it is searched (:mod:`npos.synthesize.bank_search`).
    config : SynthesisConfig
        ``k < N`` and ``select <= N`` are the caller's checks.
    sources : int
        Boundary points to draw candidates around.
    key : int
        Separates the random streams of banks (class id, or :data:`GLOBAL_KEY`).
    """
    k = config.k
    bank_d = bank_kth_distance(bank, k, chunk=bank.query_block(k, memory_budget), ranks=ranks,
                               memory_budget=memory_budget)
    boundary = bank_d.topk(config.select).indices
    src = boundary[_source_order(config.select, sources, seeded(seed, key))]
    bank.prepare(src, k)
    # per candidate: its noise/vector, the unit copy searched, the (k + 1) results, and a
    # share of the similarity block (bounded separately by max_elements)
    per_candidate = 12 * bank.dim + 12 * (k + 1)
    per = max(1, min(sources, memory_budget // (2 * config.candidates * per_candidate)))
    max_elements = max(1, memory_budget // 8)
    # the outputs are allocated once and filled batch by batch: per-batch results kept
    # between the batches' transient blocks fragmented the heap (peak RSS grew with sources)
    keep = config.keep
    outliers, distance = torch.empty((sources * keep, bank.dim)), torch.empty(sources * keep)
    part = {}
    for s0 in ranks.mine(range(0, sources, per)):
        js = range(s0, min(sources, s0 + per))
        out, kept_d, cand = _score_sources(bank, src[s0:js.stop], js, config, seed, key,
                                           max_elements)
        outliers[s0 * keep:js.stop * keep].copy_(out)
        distance[s0 * keep:js.stop * keep].copy_(kept_d)
        # the sources' d_K come from the every-row pass, never recomputed
        outward = int((cand > bank_d[src[s0:js.stop]][:, None]).sum())
        part[s0] = (out, kept_d, outward) if ranks.world > 1 else (None, None, outward)
    merged = ranks.merge(part)
    for s, (out, kept_d, _) in merged.items():  # other ranks' batches
        if out is not None:
            stop = min(sources, s + per)
            outliers[s * keep:stop * keep].copy_(out)
            distance[s * keep:stop * keep].copy_(kept_d)
    outward = sum(merged[s][2] for s in range(0, sources, per)) / (sources * config.candidates)
    return BankOutliers(outliers, distance, src.repeat_interleave(config.keep), bank_d,
                        boundary, outward, bank.backend)
