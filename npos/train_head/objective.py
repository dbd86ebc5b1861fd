"""The training objective of one step: :class:`HeadObjective`.

Given a batch of embeddings ``z`` (from any differentiable producer: cached features in
``train-head``, the encoder tail in ``finetune``) and labels, it computes the ID loss, pushes
the projected embeddings into per-class queues, synthesizes outliers from them when due, and
adds the OOD head's outlier loss. :class:`~npos.train_head.trainer.Trainer` drives it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from npos.device import cpu_matmul_precision
from npos.errors import ParameterError
from npos.knn import KnnCache
from npos.synthesize import ClassQueues, synthesize
from npos.train_head.config import HeadConfig
from npos.train_head.data import OutlierDraws
from npos.train_head.losses import CiderLoss, logitnorm_loss, outlier_loss
from npos.train_head.model import HeadModel


@dataclass
class StepOutput:
    """What one objective step produced. ``loss`` carries the graph; the rest is detached."""

    loss: torch.Tensor
    id_loss: torch.Tensor
    outlier_loss: torch.Tensor | None
    correct: torch.Tensor
    synthesized: bool


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so wall-clock timings are exact."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HeadObjective:
    """The training objective of one step, independent of where the embeddings come from.

    Parameters
    ----------
    model : HeadModel
    config : HeadConfig
    cider_prototypes : Tensor of shape (C, D), optional
        Initial CIDER prototypes (required when ``config.id_loss == "cider"``), e.g. the class
        means of the training embeddings.
    device : torch.device
        Where the queues and the synthesis generator live.
    profile : bool
        Synchronize CUDA around the timed sections so ``timings`` are exact.
    offline_outliers : OutlierDraws, optional
        Pre-synthesized outliers (``train-head --outliers``) instead of online synthesis: no
        queues; from ``start_epoch`` on, each step draws a batch of them (with this
        objective's generator) and passes it through the projection like the ID rows.

    Attributes
    ----------
    queues : ClassQueues or None
        Per-class ring buffers of detached ``h`` (None when ``ood_weight == 0``).
    outliers : Tensor of shape (M, D) or None
        The most recent synthesized outliers.
    steps : int
        Steps taken so far (drives ``synth_every``).
    timings : dict
        Seconds spent pushing to the queues and synthesizing.
    """

    def __init__(self, model: HeadModel, config: HeadConfig, *,
                 cider_prototypes: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", profile: bool = False,
                 offline_outliers: OutlierDraws | None = None) -> None:
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.profile = profile
        self.cider: CiderLoss | None = None
        if config.id_loss == "cider":
            if cider_prototypes is None:
                raise ParameterError("id_loss='cider' needs initial prototypes")
            self.cider = CiderLoss(cider_prototypes, temperature=config.temperature).to(device)
        self.queues: ClassQueues | None = None
        self.offline = offline_outliers
        if config.ood_weight > 0 and offline_outliers is None:
            self.queues = ClassQueues(model.num_classes, config.queue, model.dim, device=device)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        # An approximate kNN backend's trained lists and tuned nprobe are reused within an
        # epoch and dropped at its end (the projected space drifts), so a resumed run,
        # which starts a fresh epoch, sees the same state as an uninterrupted one.
        self.knn_cache = KnnCache()
        self._cache_epoch = -1
        self.outliers: torch.Tensor | None = None
        self.steps = 0
        self._queues_full = False
        self.timings = {"queue": 0.0, "synthesis": 0.0}
        self._frozen_identity = False
        if config.id_loss == "none":
            self.model.projection.requires_grad_(False)
            # Frozen at its identity init: skip its D x D product on every row of every step.
            self._frozen_identity = self.model.projection.is_identity()

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: projection + classifier at ``lr``, the head at ``lr × scale``."""
        body = [p for p in (*self.model.projection.parameters(),
                            *self.model.classifier.parameters()) if p.requires_grad]
        groups = [{"params": body, "lr": lr, "base_lr": lr}] if body else []
        head_lr = lr * self.config.head_lr_scale
        groups.append({"params": list(self.model.head.parameters()), "lr": head_lr,
                       "base_lr": head_lr})
        return groups

    def _id_loss(self, h: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kind = self.config.id_loss
        if kind == "ce":
            return F.cross_entropy(logits.float(), y)
        if kind == "logitnorm":
            cosines = logits.float() * self.model.classifier.temperature
            return logitnorm_loss(cosines, y, self.config.temperature)
        loss = (self.cider(h, y) if self.cider is not None
                else h.new_zeros((), dtype=torch.float32))  # self.cider is set iff kind == cider
        if self.model.classifier.trainable:
            # cider/none do not train the class embeddings: fit them on the (detached)
            # embeddings so the cosine logits, and MCM, stay meaningful.
            loss = loss + F.cross_entropy(self.model.classifier(h.detach()).float(), y)
        return loss

    def _maybe_synthesize(self, epoch: int) -> bool:
        if epoch < self.config.start_epoch or self.steps % self.config.synth_every:
            return False
        assert self.queues is not None  # online synthesis (ood_weight > 0) has queues
        # Queues never empty again once full: stop asking (each ask syncs a GPU).
        self._queues_full = self._queues_full or self.queues.all_ready()
        if not self._queues_full:
            return False
        if self.profile:
            sync_device(self.device)
        start = time.perf_counter()
        if epoch != self._cache_epoch:
            self.knn_cache.clear()
            self._cache_epoch = epoch
        # Nearest-neighbour ranks need float32: keep autocast's bfloat16 (and the CPU's
        # bfloat16 product inputs) out of synthesis.
        with torch.autocast(device_type=self.device.type, enabled=False), \
                cpu_matmul_precision(bf16=False):
            result = synthesize(self.queues.banks, self.config.synthesis,
                                ready=self.queues.ready, generator=self.generator,
                                knn_cache=self.knn_cache)
        self.outliers = result.outliers
        if self.profile:
            sync_device(self.device)
        self.timings["synthesis"] += time.perf_counter() - start
        return True

    def __call__(self, z: torch.Tensor, y: torch.Tensor, *, epoch: int) -> StepOutput:
        """Losses for a batch.

        Parameters
        ----------
        z : Tensor of shape (B, D)
            Embeddings, possibly carrying a graph into their producer.
        y : Tensor of shape (B,)
            Labels 0..C-1 (int64).
        epoch : int
            Current epoch (0-based), compared with ``start_epoch``.
        """
        h = self._project(z)
        logits = self.model.classifier(h)
        id_loss = self._id_loss(h, logits, y)
        loss = id_loss
        out_loss, synthesized = None, False
        if self.queues is not None:
            h_detached = h.detach().float()
            if self.profile:
                sync_device(self.device)
            start = time.perf_counter()
            self.queues.push(h_detached, y)
            self.timings["queue"] += time.perf_counter() - start
            synthesized = self._maybe_synthesize(epoch)
            if self.outliers is not None and epoch >= self.config.start_epoch:
                out_loss = self._outlier_loss(h, self.outliers)
        elif self.offline is not None and epoch >= self.config.start_epoch:
            # Offline outliers live in the frozen input space: project them like ID rows.
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.detach_head):
                out_h = self._project(self.offline.draw(self.generator))
            out_loss = self._outlier_loss(h, out_h)
        if out_loss is not None:
            loss = loss + self.config.ood_weight * out_loss
        self.steps += 1
        correct = (logits.detach().argmax(dim=1) == y).sum()
        return StepOutput(loss, id_loss.detach(), None if out_loss is None else out_loss.detach(),
                          correct, synthesized)

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        return z if self._frozen_identity else self.model.project(z)

    def _outlier_loss(self, h: torch.Tensor, outliers_h: torch.Tensor) -> torch.Tensor:
        """The head's BCE: ID rows ``h`` (detached with ``detach_head``) up, outliers down."""
        id_in = h.detach().float() if self.config.detach_head else h
        # One head call over both: one product against the head's weights, not two.
        logits = self.model.head(torch.cat([id_in.float(), outliers_h.float()])).float()
        return outlier_loss(logits[:id_in.shape[0]], logits[id_in.shape[0]:])

    # ------------------------------------------------------------------ resumable state
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON) needed to continue exactly where this objective is."""
        tensors = {"generator": self.generator.get_state()}
        if self.cider is not None:
            tensors["cider.prototypes"] = self.cider.prototypes
        if self.queues is not None:
            tensors.update({f"queues.{k}": v for k, v in self.queues.state_dict().items()})
        if self.outliers is not None:
            tensors["outliers"] = self.outliers
        return tensors, {"steps": self.steps}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state`."""
        self.generator.set_state(tensors["generator"].cpu())
        if self.cider is not None:
            self.cider.prototypes.copy_(tensors["cider.prototypes"])
        if self.queues is not None:
            self.queues.load_state_dict({k: tensors[f"queues.{k}"]
                                         for k in ("banks", "counts", "head")})
        self.outliers = tensors["outliers"].to(self.device) if "outliers" in tensors else None
        self.steps = int(meta["steps"])

__all__ = ["HeadObjective", "StepOutput", "sync_device"]
