"""Negative-label detectors from a text bank: ``neglabel`` and ``csp``.

Both read the raw image embeddings ``z`` (the encoder space, also when a head is given: the
text bank lives in the encoder's space), the ID class text embeddings ``y_k`` (K, D) of the
store (or the train store), and a **text bank** (``--text-bank``: word embeddings ``w_i``
made once per encoder by ``npos text-bank``); all rows are L2-normalized.

``neglabel`` — Jiang et al., "Negative Label Guided OOD Detection with Pretrained
Vision-Language Models", ICLR 2024:

1. *NegMining*. For each candidate word, ``q_i = Quantile_eta({cos(w_i, y_k)}_k)``
   (``--neg-quantile`` eta = 0.95, numpy's linear interpolation) — the paper's
   eta-percentile of the negative cosine distances, written as similarities. Within each part
   of speech (nouns, adjectives; rows without one form their own group) keep the
   ``floor(fraction * n_pos)`` words with the smallest ``q_i`` (``--neg-fraction``, 0.15);
   of their union keep the ``M`` smallest (``--neg-count``, 10,000). Ties are broken by
   row order, so the selection is a pure function of the bank and the classes.
2. *Grouping*. A permutation of the ``M`` negatives drawn with
   ``numpy.random.default_rng(seed)`` is split into ``G`` near-equal groups
   (``numpy.array_split``; ``--neg-groups``, 100; ``G <= M``).
3. *Score*. With ``s_k = cos(z, y_k) / T`` and ``t_j = cos(z, w_j) / T`` (``T = 0.01``)::

       score(z) = (1/G) sum_g  sum_k e^{s_k} / (sum_k e^{s_k} + sum_{j in g} e^{t_j})

   the softmax mass on the ID labels over [ID labels; group g], averaged over the groups
   (as ``sigmoid(LSE_k s_k - LSE_{j in g} t_j)``: float32 log-sum-exps, float64 sigmoid
   and mean; memory is bounded by row blocks of ``2^25 / (K + M)`` rows).

``csp`` — Chen et al., "Conjugated Semantic Pool Improves OOD Detection with Pre-trained
Vision-Language Models", NeurIPS 2024. The candidate pool is the bank's nouns and adjectives
plus its *conjugated* rows: for each adjective, the mean (normalized) of the prompt-ensemble
embeddings of ``"<adjective> <superclass>"`` over the superclass words (``npos text-bank``
makes them; ours are object, thing, item, creature, animal, plant, place, scene — a choice
documented in docs/evaluate.md). Candidates whose largest cosine to an ID class exceeds
``--csp-threshold`` (0.95) are excluded (near-synonyms of ID classes); the rest go through
the same NegMining (per part of speech, the conjugated rows being a third group), grouping
and score as ``neglabel``.

The chosen negatives (their ids) are reported by ``facts()``, hence saved in
``metrics.json`` under ``settings.detectors`` and in score files' settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from npos.errors import ParameterError
from npos.evaluate.detectors.base import Detector, as_tensor, register_detector, to_numpy
from npos.validation import check_float, check_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from npos.evaluate.config import ScoringConfig
    from npos.textbank import TextBank

#: Bound on the logits held at once (rows x labels) while scoring.
_BLOCK_ELEMENTS = 2 ** 25


def word_quantiles(class_text: np.ndarray, words: np.ndarray, quantile: float,
                   *, block: int = 4096) -> np.ndarray:
    """``q_i``: the ``quantile`` of each word's cosines to the classes. (M0,) float64."""
    out = np.empty(len(words))
    for start in range(0, len(words), block):
        sims = words[start:start + block].astype(np.float64) @ class_text.astype(np.float64).T
        out[start:start + block] = np.quantile(sims, quantile, axis=1)
    return out


def mine_negatives(q: np.ndarray, pos: np.ndarray, *, fraction: float, count: int,
                   allowed: np.ndarray | None = None) -> np.ndarray:
    """NegMining: indices of the chosen negatives, ordered by ``(q, index)``.

    Per part of speech the ``floor(fraction * n)`` smallest ``q`` (of the ``allowed`` rows);
    of their union the ``count`` smallest.
    """
    rows = np.arange(len(q)) if allowed is None else np.flatnonzero(allowed)
    chosen = []
    for tag in np.unique(pos[rows]):
        members = rows[pos[rows] == tag]
        keep = int(np.floor(fraction * len(members)))
        chosen.append(members[np.lexsort((members, q[members]))][:keep])
    union = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return union[np.lexsort((union, q[union]))][:count]


def negative_groups(n: int, groups: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of ``range(n)`` split into ``groups`` near-equal parts."""
    if groups > n:
        raise ParameterError(f"--neg-groups {groups} is more than the {n} negatives chosen; "
                             "lower --neg-groups or raise --neg-count/--neg-fraction")
    return np.array_split(np.random.default_rng(seed).permutation(n), groups)


def grouped_labels(class_text: Any, negatives: Any, groups: list[np.ndarray],
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[class_text; negatives in group order]`` with each group padded to the largest
    (zero rows), and the (G, L) additive mask that is -inf on the padding."""
    import torch

    class_text, negatives = as_tensor(class_text), as_tensor(negatives, class_text.device)
    size = max(len(g) for g in groups)
    order = torch.zeros(len(groups) * size, dtype=torch.long)
    mask = torch.full((len(groups), size), float("-inf"))
    for i, g in enumerate(groups):
        order[i * size:i * size + len(g)] = torch.as_tensor(g, dtype=torch.long)
        mask[i, :len(g)] = 0.0
    rows = negatives[order.to(negatives.device)] * (mask.reshape(-1, 1) == 0).to(negatives)
    return torch.cat([class_text, rows]), mask.to(class_text.device)


def grouped_id_mass(z: Any, class_text: Any, negatives: Any, groups: list[np.ndarray], *,
                    temperature: float = 0.01, labels: Any = None) -> np.ndarray:
    """The NegLabel score (step 3 of the module docstring) of rows ``z`` (N, D). (N,).

    Per group, ``sum_k e^{s_k} / (sum_k e^{s_k} + sum_g e^{t_j}) = sigmoid(LSE_k s_k -
    LSE_g t_j)``: log-sum-exps in float32 cannot underflow, the sigmoid and the mean are
    float64. ``labels`` is :func:`grouped_labels`' output, when precomputed.
    """
    import torch

    z = torch.nn.functional.normalize(as_tensor(z), dim=1)
    matrix, mask = labels if labels is not None else grouped_labels(
        as_tensor(class_text, z.device), negatives, groups)
    k, n_groups = len(class_text), mask.shape[0]
    scaled = matrix.T / temperature  # (D, K + G*L): one pass fewer over the logits
    padded = bool(torch.isinf(mask).any())  # equal groups (M divisible by G) need no mask
    out = []
    block = max(1, _BLOCK_ELEMENTS // len(matrix))
    for start in range(0, len(z), block):
        logits = z[start:start + block] @ scaled
        ids = logits[:, :k].logsumexp(dim=1, keepdim=True)
        neg = logits[:, k:].reshape(len(logits), n_groups, -1)
        neg = (neg + mask if padded else neg).logsumexp(dim=2)
        out.append(torch.sigmoid((ids - neg).double()).mean(dim=1))
    return to_numpy(torch.cat(out)) if out else np.zeros(0)


@register_detector("neglabel")
class NegLabelScore(Detector):
    """NegLabel (Jiang et al. 2024): ID softmax mass against mined negative labels."""

    input = "embeddings"
    needs_text_bank: ClassVar[bool] = True
    #: Parts of speech taken from the bank (0 noun, 1 adjective, 2 conjugated, -1 none).
    pool: ClassVar[tuple[int, ...]] = (0, 1, -1)
    #: Whether ``from_config`` passes ``csp_threshold`` as ``exclude_above``.
    excludes_synonyms: ClassVar[bool] = False

    def __init__(self, *, count: int = 10000, groups: int = 100, quantile: float = 0.95,
                 fraction: float = 0.15, temperature: float = 0.01, seed: int = 0,
                 exclude_above: float | None = None):
        check_int("neg_count", count, 1, owner=self.name)
        check_int("neg_groups", groups, 1, owner=self.name)
        check_float("neg_quantile", quantile, 0.0, 1.0, owner=self.name)
        check_float("neg_fraction", fraction, 0.0, 1.0, low_open=True, owner=self.name)
        check_float("neg_temperature", temperature, 0.0, low_open=True, owner=self.name)
        check_int("seed", seed, 0, owner=self.name)
        check_float("csp_threshold", exclude_above, -1.0, 1.0, allow_none=True,
                    owner=self.name)
        self.count, self.groups, self.quantile = count, groups, quantile
        self.fraction, self.temperature, self.seed = fraction, temperature, seed
        self.exclude_above = exclude_above

    @classmethod
    def from_config(cls, config: ScoringConfig, *, device: str) -> NegLabelScore:
        return cls(count=config.neg_count, groups=config.neg_groups,
                   quantile=config.neg_quantile, fraction=config.neg_fraction,
                   temperature=config.neg_temperature, seed=config.seed,
                   exclude_above=config.csp_threshold if cls.excludes_synonyms else None)

    def attach(self, *, class_text: np.ndarray, bank: TextBank, device: str = "cpu") -> None:
        """Choose the negatives of ``bank`` for the ID classes ``class_text`` (K, D)."""
        import torch

        class_text = class_text / np.linalg.norm(class_text, axis=1, keepdims=True).clip(1e-12)
        allowed = np.isin(bank.pos, self.pool)
        if self.exclude_above is not None:
            top = np.concatenate([(bank.embeddings[s:s + 4096] @ class_text.T).max(axis=1)
                                  for s in range(0, len(bank.embeddings), 4096)])
            allowed &= top <= self.exclude_above
        q = word_quantiles(class_text, bank.embeddings, self.quantile)
        chosen = mine_negatives(q, bank.pos, fraction=self.fraction, count=self.count,
                                allowed=allowed)
        self.negative_ids_ = [bank.ids[i] for i in chosen]
        self.groups_ = negative_groups(len(chosen), self.groups, self.seed)
        self.class_text_ = torch.as_tensor(class_text, dtype=torch.float32, device=device)
        self.negatives_ = torch.as_tensor(bank.embeddings[chosen], dtype=torch.float32,
                                          device=device)
        self.labels_ = grouped_labels(self.class_text_, self.negatives_, self.groups_)
        self.bank_url_ = bank.url

    def score(self, embeddings: Any) -> np.ndarray:
        """Scores (N,) of raw image embeddings (N, D)."""
        if not hasattr(self, "negatives_"):
            raise ParameterError(f"{self.name} has no negatives: attach() a text bank first")
        return grouped_id_mass(as_tensor(embeddings, str(self.negatives_.device)), self.class_text_,
                               self.negatives_, self.groups_, temperature=self.temperature,
                               labels=self.labels_)

    def facts(self) -> dict[str, Any]:
        if not hasattr(self, "negatives_"):
            return {}
        return {"text_bank": self.bank_url_, "negatives": len(self.negative_ids_),
                "groups": len(self.groups_), "negative_ids": self.negative_ids_}


@register_detector("csp")
class CSPScore(NegLabelScore):
    """CSP (Chen et al. 2024): NegLabel over nouns, adjectives and conjugated
    adjective-superclass labels, ID near-synonyms excluded."""

    pool = (0, 1, 2, -1)
    excludes_synonyms = True
