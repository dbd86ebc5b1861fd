"""NPOS outlier synthesis, batched over classes, plus the ``vos`` and ``gaussian`` controls.

NPOS (Tao, Du, Zhu, Li — *Non-parametric Outlier Synthesis*, ICLR 2023), for every ready
class ``c`` with bank ``B_c`` of Q points (distances are Euclidean between L2-normalized
vectors, ``|a - b|^2 = 2 - 2 a.b``):

1. ``d_K(x)``: distance of each bank point to its K-th nearest *other* bank point;
2. boundary: the ``select`` bank points with the largest ``d_K`` (by decreasing ``d_K``);
3. pick ``pick`` boundary points uniformly without replacement;
4. around each picked ``b`` draw ``candidates`` points, ``eps ~ N(0, I)`` independently per
   class and picked point: ``sphere``: ``|b| normalize(b/|b| + sigma eps)``; ``raw``:
   ``b + sigma eps``;
5. score each candidate by its K-th-NN distance to ``B_c`` and keep, *per picked point*, the
   ``keep`` candidates with the largest distance.

Unlike the public research code, a point is not its own neighbour, noise is independent
per class and picked point, and rejection is per picked point (also when pick or keep is 1).

All classes run together: banks are stacked (C, Q, D), similarities come from batched matrix
products, k-th values from an in-place select (:func:`npos.knn.kth.kth_largest_`),
and classes are processed in chunks so the working memory stays under ``memory_budget``.

Backends (:mod:`npos.knn`): ``torch`` is this batched engine; every other registered backend
(``faiss-flat``, ``faiss-ivf``, or one added with :func:`npos.knn.register_backend`) runs one
:class:`~npos.knn.KnnIndex` per class bank. ``auto`` follows the one policy of
:func:`npos.knn.resolve_knn_backend` for the per-class bank size Q. A ``knn_cache`` owned by
the caller keeps what a backend learns across calls (``faiss-ivf``: trained lists, tuned
nprobe per k), keyed by class, so a training loop trains and tunes once per class.

Randomness — one ``torch.Generator``, consumed in this documented order (so a plain
per-class loop can reproduce the output exactly, and chunking never changes it):

* ``npos``: ``keys = torch.rand((R, select))`` for the R ready classes (ascending class id);
  the picked boundary positions are ``keys.argsort(dim=1)[:, :pick]``. Then, for each ready
  class in ascending order, ``torch.randn((pick, candidates, D))``.
* ``gaussian``: ``keys = torch.rand((R, Q))``, picked bank positions
  ``keys.argsort(dim=1)[:, :pick]``; then per class ``torch.randn((pick, keep, D))``.
* ``vos``: per class ``torch.randn((pick * candidates, D))``.

Draws happen on ``generator.device`` in float32 and are then moved to the banks' device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from npos.errors import ParameterError
from npos.knn import resolve_knn_backend
from npos.knn.ivf import KnnCache
from npos.knn.kth import DEFAULT_MEMORY_BUDGET, kth_similarity  # noqa: F401 - old import path
from npos.synthesize.config import SynthesisConfig
from npos.synthesize.scorers import Scorers

#: VOS covariance ridge, relative to the mean per-dimension variance.
VOS_RIDGE = 1e-4


@dataclass
class SynthesisStats:
    """Diagnostics of one synthesis call, for tuning (``return_stats=True``).

    Attributes
    ----------
    classes : Tensor of shape (R,)
        Ids of the ready classes, ascending; row r of every other field is class
        ``classes[r]``.
    bank_distance : Tensor of shape (R, Q)
        K-th-NN distance of each bank point to the other points of its bank.
    boundary : Tensor of shape (R, select) or None
        Bank positions of the boundary points, by decreasing distance (``npos`` only).
    sources : Tensor of shape (R, pick) or None
        Bank positions of the picked points (``npos``, ``gaussian``).
    candidate_distance : Tensor of shape (R, pick, n)
        K-th-NN distance of every candidate (n = ``candidates``; ``keep`` for ``gaussian``,
        whose draws are all kept).
    candidates : Tensor of shape (R, pick, n, D) or None
        Every candidate vector, as an outlier would be (``npos`` with
        ``return_candidates=True`` only: for pictures of what the rejection keeps; memory
        grows with ``pick * candidates * D`` per class).
    """

    classes: torch.Tensor
    bank_distance: torch.Tensor
    boundary: torch.Tensor | None
    sources: torch.Tensor | None
    candidate_distance: torch.Tensor
    candidates: torch.Tensor | None = None


@dataclass
class SynthesisResult:
    """Outliers of one synthesis call, ordered by class, then picked point, then rank.

    Attributes
    ----------
    outliers : Tensor of shape (M, D)
        Raw vectors, in the space and dtype of the banks (``sphere``: the source point's norm).
    labels : Tensor of shape (M,)
        int64 source class.
    knn_distance : Tensor of shape (M,)
        float32 K-th-NN distance of each outlier to its class bank (normalized vectors).
    source_index : Tensor of shape (M,) or None
        int64 position, in its class bank, of the point the outlier was drawn around
        (-1 for ``vos``). Always set by :func:`synthesize`.
    stats : SynthesisStats or None
        Diagnostics when asked for with ``return_stats=True``.
    """

    outliers: torch.Tensor
    labels: torch.Tensor
    knn_distance: torch.Tensor
    source_index: torch.Tensor | None = None
    stats: SynthesisStats | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def draw_positions(n_classes: int, population: int, count: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct positions in ``range(population)`` per class, uniformly at random.

    Returns a (n_classes, count) int64 tensor on ``generator.device``: the first ``count``
    entries of ``torch.rand((n_classes, population)).argsort(dim=1)``.
    """
    keys = torch.rand((n_classes, population), generator=generator, device=generator.device)
    return keys.argsort(dim=1)[:, :count]


def draw_noise(n_classes: int, shape: tuple[int, ...], generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """Standard normal noise of shape (n_classes, *shape): one ``torch.randn(shape)`` per class.

    Drawing class by class makes the stream independent of how classes are chunked.
    """
    noise = torch.empty((n_classes, *shape), device=generator.device)
    for i in range(n_classes):
        torch.randn(shape, generator=generator, out=noise[i])
    return noise.to(device)


def _check_inputs(banks: torch.Tensor, ready: torch.Tensor | None,
                  generator: torch.Generator) -> torch.Tensor:
    """Validate banks/ready/generator; return the ready class ids (ascending, CPU int64)."""
    if not isinstance(banks, torch.Tensor) or banks.dim() != 3:
        shape = tuple(banks.shape) if isinstance(banks, torch.Tensor) else type(banks).__name__
        raise ParameterError(f"banks must be a tensor of shape (classes, queue, dim); got {shape}")
    if not banks.is_floating_point():
        raise ParameterError(f"banks must be floating point; got {banks.dtype}")
    if not isinstance(generator, torch.Generator):
        raise ParameterError("synthesize needs a torch.Generator (generator=...) for its noise")
    n_classes = banks.shape[0]
    if ready is None:
        ready = torch.ones(n_classes, dtype=torch.bool)
    ready = torch.as_tensor(ready).to("cpu")
    if ready.dtype != torch.bool or tuple(ready.shape) != (n_classes,):
        raise ParameterError(
            f"ready must be a bool tensor of shape ({n_classes},); got {ready.dtype} "
            f"{tuple(ready.shape)}")
    return ready.nonzero().flatten()


def _class_chunk(banks: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """float32 copy of the banks of classes ``cls``, checked finite (per chunk, so that the
    check never copies all the banks at once)."""
    raw = banks[cls].float()
    if not torch.isfinite(raw).all():
        raise ParameterError("banks of ready classes contain NaN or Inf values")
    return raw


def _perturb(centers: torch.Tensor, noise: torch.Tensor, sigma: float, space: str):
    """Candidates around centers (c, p, D) with noise (c, p, n, D), built in ``noise``'s memory.

    Returns ``(v, scale)``: ``v`` (c, p, n, D) are the vectors to score (un-normalized) and the
    outlier for candidate v is ``scale * v / |v|`` (``sphere``: scale = |b|) or ``v`` itself
    (``raw``: scale None).
    """
    if space == "sphere":
        norms = centers.norm(dim=-1, keepdim=True)
        v = noise.mul_(sigma).add_((centers / norms.clamp_min(1e-12)).unsqueeze(2))
        return v, norms.unsqueeze(2)  # (c, p, 1, 1)
    return noise.mul_(sigma).add_(centers.unsqueeze(2)), None


def _finish(v: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return v
    return v * (scale / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def _chunk_size(n_ready: int, per_class_fixed: int, per_class_sims: int,
                budget_elements: int) -> tuple[int, int]:
    """Classes per chunk and the similarity-block bound, for a working-memory budget."""
    chunk = max(1, min(n_ready, budget_elements // max(1, per_class_fixed + per_class_sims)))
    max_sims = max(budget_elements - chunk * per_class_fixed, 1)
    return chunk, max_sims


def synthesize(banks: torch.Tensor, config: SynthesisConfig, *,
               ready: torch.Tensor | None = None, generator: torch.Generator,
               memory_budget: int = DEFAULT_MEMORY_BUDGET,
               return_stats: bool = False,
               knn_cache: KnnCache | None = None,
               return_candidates: bool = False) -> SynthesisResult:
    """Synthesize virtual outliers for every ready class.

    Parameters
    ----------
    banks : Tensor of shape (C, Q, D)
        Per-class banks of raw ID embeddings (e.g. :attr:`ClassQueues.banks`), any device.
    config : SynthesisConfig
        Validated against Q first (``k < Q``, ``select <= Q``, ...).
    ready : bool Tensor of shape (C,), optional
        Classes to synthesize for (e.g. :attr:`ClassQueues.ready`); None means all.
    generator : torch.Generator
        Drives all randomness, in the order documented in this module.
    memory_budget : int
        Bound, in bytes, on the working memory (classes are processed in chunks).
    return_stats : bool
        Also return per-class diagnostics (:class:`SynthesisStats`).
    knn_cache : KnnCache, optional
        Kept by the caller across calls: per-class kNN state (``faiss-ivf``: trained lists
        and tuned nprobe) is then built once, not on every call. Without it every call
        fits its indexes from scratch.
    return_candidates : bool
        ``npos`` only, implies ``return_stats``: also return every candidate vector
        (:attr:`SynthesisStats.candidates`), e.g. to draw the rejected ones.

    Returns
    -------
    SynthesisResult
        ``pick * keep`` outliers per ready class (none when no class is ready).
    """
    classes = _check_inputs(banks, ready, generator)
    _, q, dim = banks.shape
    config.validate(bank_size=q)
    runner = {"npos": _npos, "gaussian": _gaussian, "vos": _vos}[config.method]
    if return_candidates:
        if config.method != "npos":
            raise ParameterError("return_candidates needs method 'npos' (gaussian keeps every "
                                 f"draw, vos has no per-point candidates); got {config.method!r}")
        runner, return_stats = functools.partial(_npos, with_candidates=True), True
    budget = max(1, int(memory_budget) // 4)
    backend = resolve_knn_backend(config.backend, q, on_gpu=banks.device.type == "cuda")
    if knn_cache is not None and not isinstance(knn_cache, KnnCache):
        raise ParameterError(f"knn_cache must be a KnnCache or None; got "
                             f"{type(knn_cache).__name__}")
    with torch.no_grad():
        parts, stats = runner(banks, classes.to(banks.device), config, generator, budget,
                              return_stats, Scorers(backend, config.k, knn_cache))
    if parts:
        outliers, labels, distance, source = (torch.cat(column)
                                              for column in zip(*parts, strict=True))
    else:
        outliers = banks.new_empty((0, dim))
        labels = torch.empty(0, dtype=torch.int64, device=banks.device)
        distance = torch.empty(0, dtype=torch.float32, device=banks.device)
        source = torch.empty(0, dtype=torch.int64, device=banks.device)
    return SynthesisResult(outliers.to(banks.dtype), labels, distance.float(), source, stats)


def _outputs(classes, v_kept, scale, distance, source, keep):
    """Flatten (c, p, keep, ...) selections into result parts."""
    c, p = v_kept.shape[:2]
    outliers = _finish(v_kept, scale).reshape(c * p * keep, -1)
    labels = classes.view(c, 1).expand(c, p * keep).reshape(-1)
    sources = source.view(c, p, 1).expand(c, p, keep).reshape(-1)
    return outliers, labels, distance.reshape(-1), sources


def _run_chunks(classes: torch.Tensor, chunk: int, body, return_stats: bool, make_stats):
    """Call ``body(start, chunk_classes) -> (part, stat_tuple)`` per chunk of classes.

    Each chunk's buffers are locals of ``body``, so they are freed before the next chunk
    allocates its own: the working memory is one chunk's, not two.
    """
    parts, stat_parts = [], []
    for start in range(0, classes.numel(), chunk):
        part, stat = body(start, classes[start:start + chunk])
        parts.append(part)
        if return_stats:
            stat_parts.append(stat)
    stats = (make_stats(*(torch.cat(x) for x in zip(*stat_parts, strict=True)))
             if return_stats else None)
    return parts, stats


def _npos(banks, classes, cfg, generator, budget, return_stats, scorers, with_candidates=False):
    n_ready = classes.numel()
    _, q, dim = banks.shape
    p, m = cfg.pick, cfg.candidates
    if n_ready == 0:
        return [], None
    picks = draw_positions(n_ready, cfg.select, p, generator).to(banks.device)
    # per class: raw + unit bank, candidates; then the larger of the (Q, Q) and (p m, Q) blocks
    chunk, max_sims = _chunk_size(n_ready, 2 * q * dim + p * m * dim + q,
                                  max(q * q, p * m * q), budget)

    def body(start, cls):
        c = cls.numel()
        raw = _class_chunk(banks, cls)
        scorer = scorers.fit(F.normalize(raw, dim=-1), cls, max_sims)
        bank_d = scorer.bank()
        boundary = bank_d.topk(cfg.select, dim=1).indices  # by decreasing distance
        source = boundary.gather(1, picks[start:start + c])  # (c, p)
        centers = raw.gather(1, source.unsqueeze(-1).expand(c, p, dim))
        noise = draw_noise(c, (p, m, dim), generator, banks.device)
        v, scale = _perturb(centers, noise, cfg.resolved_sigma, cfg.noise_space)
        cand_d = scorer.queries(v.view(c, p * m, dim)).view(c, p, m)
        kept_d, kept = cand_d.topk(cfg.keep, dim=-1)  # per picked point
        v_kept = v.gather(2, kept.unsqueeze(-1).expand(c, p, cfg.keep, dim))
        stat: tuple = (bank_d, boundary, source, cand_d)
        if with_candidates:  # as outliers would be (sphere: rescaled); _finish copies
            stat = (*stat, _finish(v, scale))
        return _outputs(cls, v_kept, scale, kept_d, source, cfg.keep), stat

    return _run_chunks(classes, chunk, body, return_stats,
                       lambda *s: SynthesisStats(classes, *s))


def _gaussian(banks, classes, cfg, generator, budget, return_stats, scorers):
    """Plain Gaussian control: noise around uniformly drawn bank points, all draws kept."""
    n_ready = classes.numel()
    _, q, dim = banks.shape
    p, keep = cfg.pick, cfg.keep
    if n_ready == 0:
        return [], None
    picks = draw_positions(n_ready, q, p, generator).to(banks.device)
    chunk, max_sims = _chunk_size(n_ready, 2 * q * dim + p * keep * dim + q,
                                  max(q * q if return_stats else 0, p * keep * q), budget)

    def body(start, cls):
        c = cls.numel()
        raw = _class_chunk(banks, cls)
        scorer = scorers.fit(F.normalize(raw, dim=-1), cls, max_sims)
        source = picks[start:start + c]
        centers = raw.gather(1, source.unsqueeze(-1).expand(c, p, dim))
        noise = draw_noise(c, (p, keep, dim), generator, banks.device)
        v, scale = _perturb(centers, noise, cfg.resolved_sigma, cfg.noise_space)
        dist = scorer.queries(v.view(c, p * keep, dim)).view(c, p, keep)
        stat = (scorer.bank(), source, dist) if return_stats else None
        return _outputs(cls, v, scale, dist, source, keep), stat

    return _run_chunks(classes, chunk, body, return_stats,
                       lambda bank_d, source, dist: SynthesisStats(classes, bank_d, None,
                                                                   source, dist))


def fit_shared_gaussian(banks: torch.Tensor, classes: torch.Tensor, space: str, *,
                        chunk: int = 16):
    """Class means and the Cholesky factor of the pooled (shared) covariance, as in VOS.

    Parameters
    ----------
    banks : Tensor of shape (C, Q, D)
    classes : Tensor of shape (R,)
        The classes to fit (read ``chunk`` classes at a time).
    space : {"sphere", "raw"}
        ``sphere`` fits the unit vectors, ``raw`` the embeddings as they are.

    Returns
    -------
    means : Tensor of shape (R, D)
    chol : Tensor of shape (D, D)
        Lower Cholesky factor of ``cov + VOS_RIDGE * mean_variance * I``, where ``cov`` is
        the within-class covariance pooled over classes (divisor ``R * (Q - 1)``). The ridge
        keeps it positive definite when R * Q is not much larger than D.
    """
    _, q, dim = banks.shape
    n_classes = classes.numel()
    means, scatter = [], torch.zeros((dim, dim), dtype=torch.float64, device=banks.device)
    for start in range(0, n_classes, chunk):
        x = _class_chunk(banks, classes[start:start + chunk]).double()
        if space == "sphere":
            x = F.normalize(x, dim=-1)
        mu = x.mean(dim=1, keepdim=True)
        centred = (x - mu).reshape(-1, dim)
        scatter += centred.T @ centred
        means.append(mu.squeeze(1))
    cov = scatter / (n_classes * (q - 1))
    ridge = VOS_RIDGE * torch.diagonal(cov).mean().clamp_min(1e-12)
    chol = torch.linalg.cholesky(cov + ridge * torch.eye(dim, dtype=cov.dtype,
                                                          device=cov.device))
    return torch.cat(means).float(), chol.float()


def _vos(banks, classes, cfg, generator, budget, return_stats, scorers):
    """Parametric control (VOS-style): per-class Gaussians with a shared covariance.

    A sample ``x = mu_c + L eps`` has Mahalanobis distance ``|eps|^2`` under the shared
    covariance ``L L^T``, so the lowest-likelihood samples are those with the largest
    ``|eps|``: of ``pick * candidates`` draws per class the ``pick * keep`` largest are kept
    (ordered by decreasing ``|eps|``). In ``sphere`` space the Gaussians are fit to unit
    vectors and outliers are put at the class's mean embedding norm.
    """
    n_ready = classes.numel()
    _, q, dim = banks.shape
    total, kept_n = cfg.pick * cfg.candidates, cfg.pick * cfg.keep
    if n_ready == 0:
        return [], None
    means, chol = fit_shared_gaussian(banks, classes, cfg.noise_space)
    scored = total if return_stats else kept_n
    chunk, max_sims = _chunk_size(n_ready, 2 * q * dim + 2 * total * dim + q,
                                  max(q * q if return_stats else 0, scored * q), budget)

    def body(start, cls):
        c = cls.numel()
        raw = _class_chunk(banks, cls)
        scorer = scorers.fit(F.normalize(raw, dim=-1), cls, max_sims)
        eps = draw_noise(c, (total, dim), generator, banks.device)
        order = eps.square().sum(dim=-1).topk(kept_n, dim=1).indices  # lowest likelihood first
        x = means[start:start + c].unsqueeze(1) + eps @ chol.T  # (c, total, D)
        x_kept = x.gather(1, order.unsqueeze(-1).expand(c, kept_n, dim))
        scale = None
        if cfg.noise_space == "sphere":
            scale = raw.norm(dim=-1).mean(dim=1).view(c, 1, 1, 1)
        dist = scorer.queries(x_kept).view(c, cfg.pick, cfg.keep)
        source = torch.full((c, cfg.pick), -1, dtype=torch.int64, device=banks.device)
        stat = None
        if return_stats:
            stat = (scorer.bank(), scorer.queries(x).view(c, cfg.pick, cfg.candidates))
        return (_outputs(cls, x_kept.view(c, cfg.pick, cfg.keep, dim), scale, dist, source,
                         cfg.keep), stat)

    return _run_chunks(classes, chunk, body, return_stats,
                       lambda bank_d, all_d: SynthesisStats(classes, bank_d, None, None, all_d))
