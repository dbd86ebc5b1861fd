"""Training a head on cached features with online outlier synthesis.

The work is split in two so that another feature producer (the fine-tuning stage's encoder
tail) can reuse the objective:

* :class:`HeadObjective` — given a batch of embeddings ``z`` (any differentiable producer)
  and labels, computes the ID loss, pushes the projected embeddings into per-class queues,
  synthesizes outliers from them when due, and adds the OOD head's outlier loss.
* :func:`run_epoch` — the loop over batches: learning-rate schedule, AMP, backward,
  optimizer step, running statistics and the progress bar.

:func:`train_head` wires both to a feature store: it loads the rows onto the device,
shuffles by permutation, validates, checkpoints each epoch for ``resume``, and writes the
final head atomically.
"""

from __future__ import annotations

import datetime as _dt
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from npos import __version__
from npos.device import resolve_device
from npos.errors import IncompatibleStoreError, NposError, ParameterError, StoreError
from npos.synthesize import ClassQueues, synthesize
from npos.train_head.checkpoint import (FORMAT, CheckpointError,
                                        CheckpointExistsError, read_checkpoint_dir,
                                        write_checkpoint_dir)
from npos.train_head.config import HeadConfig
from npos.train_head.losses import CiderLoss, logitnorm_loss, outlier_loss
from npos.train_head.model import HeadModel

STATE_FORMAT = "npos.head-state/1"


@dataclass
class StepOutput:
    """What one objective step produced. ``loss`` carries the graph; the rest is detached."""

    loss: torch.Tensor
    id_loss: torch.Tensor
    outlier_loss: torch.Tensor | None
    correct: torch.Tensor
    synthesized: bool


def _sync(device: torch.device) -> None:
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
                 device: torch.device | str = "cpu", profile: bool = False) -> None:
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.profile = profile
        self.cider = None
        if config.id_loss == "cider":
            if cider_prototypes is None:
                raise ParameterError("id_loss='cider' needs initial prototypes")
            self.cider = CiderLoss(cider_prototypes, temperature=config.temperature).to(device)
        self.queues = None
        if config.ood_weight > 0:
            self.queues = ClassQueues(model.num_classes, config.queue, model.dim, device=device)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.outliers: torch.Tensor | None = None
        self.steps = 0
        self._queues_full = False
        self.timings = {"queue": 0.0, "synthesis": 0.0}
        if config.id_loss == "none":
            self.model.projection.requires_grad_(False)

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
        loss = self.cider(h, y) if kind == "cider" else h.new_zeros((), dtype=torch.float32)
        if self.model.classifier.trainable:
            # cider/none do not train the class embeddings: fit them on the (detached)
            # embeddings so the cosine logits, and MCM, stay meaningful.
            loss = loss + F.cross_entropy(self.model.classifier(h.detach()).float(), y)
        return loss

    def _maybe_synthesize(self, epoch: int) -> bool:
        if epoch < self.config.start_epoch or self.steps % self.config.synth_every:
            return False
        # Queues never empty again once full: stop asking (each ask syncs a GPU).
        self._queues_full = self._queues_full or self.queues.all_ready()
        if not self._queues_full:
            return False
        if self.profile:
            _sync(self.device)
        start = time.perf_counter()
        # Nearest-neighbour ranks need float32: keep autocast's bfloat16 out of synthesis.
        with torch.autocast(device_type=self.device.type, enabled=False):
            result = synthesize(self.queues.banks, self.config.synthesis,
                                ready=self.queues.ready, generator=self.generator)
        self.outliers = result.outliers
        if self.profile:
            _sync(self.device)
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
        h = self.model.project(z)
        logits = self.model.classifier(h)
        id_loss = self._id_loss(h, logits, y)
        loss = id_loss
        out_loss, synthesized = None, False
        if self.queues is not None:
            h_detached = h.detach().float()
            if self.profile:
                _sync(self.device)
            start = time.perf_counter()
            self.queues.push(h_detached, y)
            self.timings["queue"] += time.perf_counter() - start
            synthesized = self._maybe_synthesize(epoch)
            if self.outliers is not None and epoch >= self.config.start_epoch:
                id_in = h_detached if self.config.detach_head else h
                outlier_logit = self.model.head(self.outliers)
                out_loss = outlier_loss(self.model.head(id_in).float(), outlier_logit.float())
                loss = loss + self.config.ood_weight * out_loss
        self.steps += 1
        correct = (logits.detach().argmax(dim=1) == y).sum()
        return StepOutput(loss, id_loss.detach(), None if out_loss is None else out_loss.detach(),
                          correct, synthesized)

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


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` at step 0 to 0 at step ``total``."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@dataclass
class EpochStats:
    """Running sums of one epoch (kept on the device; read once at the end)."""

    id_loss: float = 0.0
    outlier_loss: float = 0.0
    outlier_steps: int = 0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    synth_steps: int = 0

    def summary(self) -> dict[str, float]:
        return {"id_loss": self.id_loss / max(self.steps, 1),
                "outlier_loss": (self.outlier_loss / self.outlier_steps
                                 if self.outlier_steps else None),
                "accuracy": self.correct / max(self.seen, 1),
                "synth_steps": self.synth_steps}


def run_epoch(objective: HeadObjective, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              optimizer: torch.optim.Optimizer, *, epoch: int, lr_at: Callable[[int], float],
              first_step: int, amp: bool = False, progress: Any = None) -> EpochStats:
    """Train on one epoch of ``(z, y)`` batches.

    Parameters
    ----------
    objective : HeadObjective
    batches : iterable of (Tensor (B, D), Tensor (B,))
        Embeddings and labels on the objective's device. ``z`` may come from any
        differentiable producer whose parameters are in ``optimizer``.
    optimizer : torch.optim.Optimizer
        Every group carries ``base_lr``; each step sets ``lr = base_lr * lr_at(step)``.
    epoch : int
    lr_at : callable
        Global step -> learning-rate factor (e.g. a cosine schedule).
    first_step : int
        Global index of this epoch's first step.
    amp : bool
        bfloat16 autocast on CUDA.
    progress : tqdm or None
        A bar to advance and annotate with ID loss, outlier loss and accuracy.
    """
    device = objective.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # id, outlier, correct, seen
    stats = EpochStats()
    use_amp = amp and device.type == "cuda"
    for i, (z, y) in enumerate(batches):
        factor = lr_at(first_step + i)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = objective(z, y, epoch=epoch)
        if out.loss.requires_grad:  # else nothing trains yet (id_loss none before synthesis)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        sums[0] += out.id_loss
        sums[2] += out.correct
        sums[3] += y.shape[0]
        if out.outlier_loss is not None:
            sums[1] += out.outlier_loss
            stats.outlier_steps += 1
        stats.synth_steps += int(out.synthesized)
        stats.steps += 1
        if progress is not None:
            progress.update(1)
            if i % 20 == 0:
                values = sums.tolist()
                progress.set_postfix(
                    id_loss=f"{values[0] / stats.steps:.3f}",
                    ood_loss=(f"{values[1] / stats.outlier_steps:.3f}"
                              if stats.outlier_steps else "-"),
                    acc=f"{values[2] / max(values[3], 1):.3f}", refresh=False)
    values = sums.tolist()
    stats.id_loss, stats.outlier_loss = values[0], values[1]
    stats.correct, stats.seen = int(values[2]), int(values[3])
    if not (math.isfinite(stats.id_loss) and math.isfinite(stats.outlier_loss)):
        raise NposError(f"training diverged in epoch {epoch}: the loss is not finite; "
                        "lower the learning rate (--lr)")
    return stats


# ---------------------------------------------------------------------- data
@dataclass
class LabeledFeatures:
    """Labeled rows of a store, as tensors: ``z`` (N, D) in the stored float dtype, ``y`` (N,)."""

    z: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    text: torch.Tensor | None


def load_labeled(store, *, what: str = "training store") -> LabeledFeatures:
    """Read the labeled rows (label >= 0) of a :class:`~npos.store.FeatureStore`."""
    names = store.class_names
    labels = store.read("labels")
    keep = labels >= 0
    if names is None or not keep.any():
        raise StoreError(f"{what} {store.url!r} has no labeled rows; train-head needs class "
                         "labels (import them with 'npos store import --labels')")
    if labels.max() >= len(names):
        raise StoreError(f"{what} {store.url!r} has labels up to {int(labels.max())} but only "
                         f"{len(names)} class names")
    z = torch.from_numpy(store.read("embeddings")[keep])
    y = torch.from_numpy(labels[keep].astype("int64"))
    text = (store.read_extra("text_embeddings", dtype="float32", as_torch=True)
            if store.has("text_embeddings") else None)
    return LabeledFeatures(z, y, names, text)


def _place(z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the feature matrix to ``device`` when it fits comfortably (half the free
    memory); otherwise keep it in pinned host memory and move batches as they are used."""
    if device.type != "cuda":
        return z
    free, _ = torch.cuda.mem_get_info(device)
    if z.numel() * z.element_size() < free // 2:
        return z.to(device)
    return z.pin_memory()


def _batches(z: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int,
             device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, order.numel(), batch_size):
        idx = order[start:start + batch_size]
        yield (z[idx.to(z.device)].to(device, torch.float32, non_blocking=True),
               y[idx.to(y.device)].to(device, non_blocking=True))


@torch.no_grad()
def accuracy(model: HeadModel, z: torch.Tensor, y: torch.Tensor, device: torch.device, *,
             batch_size: int = 65536) -> float:
    """Top-1 accuracy of the cosine classifier on (N, D) embeddings."""
    correct = 0
    for start in range(0, z.shape[0], batch_size):
        logits = model.logits(z[start:start + batch_size].to(device, torch.float32))
        correct += int((logits.argmax(1).cpu() == y[start:start + batch_size]).sum())
    return correct / max(z.shape[0], 1)


# ---------------------------------------------------------------------- optimizer state I/O
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors for safetensors, JSON-ready rest)."""
    sd = optimizer.state_dict()
    tensors, meta = {}, {}
    for pid, entry in sd["state"].items():
        meta[str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                meta[str(pid)][name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": meta}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                          meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state[int(pid)][name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------------- the stage
@dataclass
class TrainResult:
    """What :func:`train_head` did.

    Attributes
    ----------
    out_dir : str
    history : list of dict
        Per epoch: ``epoch``, ``id_loss``, ``outlier_loss``, ``accuracy``, ``val_accuracy``,
        ``synth_steps``, ``seconds``.
    resumed_from : int
        Epochs already done when the run started (0 unless resumed).
    timings : dict
        Seconds spent in the queues, synthesis and the rest of the steps.
    """

    out_dir: str
    history: list[dict[str, Any]]
    resumed_from: int
    timings: dict[str, float]


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


def _run_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a run's config that must agree for ``resume`` to continue it."""
    return {k: v for k, v in config.items()
            if k not in ("history", "created", "npos_version", "format", "epochs_done",
                         "optimizer_state", "objective_state")}


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_class_counts(data: LabeledFeatures, config: HeadConfig, store_url: str) -> None:
    """Every class needs labeled rows, and with synthesis at least ``queue`` of them (else
    its queue never fills and synthesis never starts)."""
    counts = torch.bincount(data.y, minlength=len(data.class_names))
    c = int(counts.argmin())
    if int(counts[c]) == 0:
        raise StoreError(f"class {data.class_names[c]!r} has no labeled rows in training store "
                         f"{store_url!r}")
    if config.ood_weight > 0 and int(counts[c]) < config.queue:
        raise ParameterError(
            f"class {data.class_names[c]!r} has {int(counts[c])} labeled rows, fewer than "
            f"queue={config.queue}: its queue would never fill and synthesis never start; "
            "lower --queue")


def build_head(data: LabeledFeatures, config: HeadConfig) -> tuple[HeadModel, torch.Tensor]:
    """A freshly initialized head for ``data``, seeded by ``config.seed`` without touching
    the global RNG: class weights from the text embeddings (else the normalized class means),
    RBF centres from the data.

    Returns the model (on the CPU) and the normalized class means (CIDER's prototypes).
    """
    num_classes, dim = len(data.class_names), data.z.shape[1]
    z = data.z.float()
    counts = torch.bincount(data.y, minlength=num_classes)
    means = torch.zeros(num_classes, dim).index_add_(0, data.y, F.normalize(z, dim=-1))
    means = F.normalize(means / counts.clamp_min(1).unsqueeze(1), dim=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = HeadModel(data.text if data.text is not None else means,
                          projection=config.projection, head=config.head,
                          temperature=config.temperature,
                          train_classifier=data.text is None or config.train_text,
                          head_hidden=config.head_hidden, rbf_centres=config.rbf_centres)
    if config.head == "rbf":
        model.head.init_from_data(z, data.y, generator=torch.Generator().manual_seed(config.seed))
    return model, means


def make_optimizer(groups: list[dict[str, Any]], config: HeadConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over parameter groups, as ``config.optimizer`` says."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def train_head(train_store_url: str, out_dir: str, config: HeadConfig | None = None, *,
               val: str | None = None, device: str | torch.device = "cpu",
               resume: bool = False, overwrite: bool = False, progress: bool = False,
               profile: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a projection, classifier and OOD head on a labeled feature store.

    Parameters
    ----------
    train_store_url : str
        Feature store with labels (and optionally ``text_embeddings``).
    out_dir : str
        Output directory: ``model.safetensors`` + ``config.json``, written atomically when
        training ends. The resumable state of the last finished epoch is kept in
        ``<out_dir>.partial/`` meanwhile.
    config : HeadConfig, optional
    val : str, optional
        A labeled store of the same encoder and classes: accuracy reported per epoch.
    device : str or torch.device
    resume : bool
        Continue from ``<out_dir>.partial/`` (same config required); the result equals an
        uninterrupted run. Without a partial state the run starts from scratch.
    overwrite : bool
        Replace an existing head at ``out_dir``.
    progress : bool
        Show a progress bar per epoch.
    profile : bool
        Synchronize CUDA around timed sections so ``TrainResult.timings`` are exact.
    log : callable, optional
        Receives one line per epoch (e.g. ``click.echo``).

    Returns
    -------
    TrainResult
    """
    from tqdm.auto import tqdm

    from npos.store import FeatureStore

    config = config or HeadConfig()
    config.validate()
    device = resolve_device(device)
    out_path = Path(out_dir)
    partial = _partial_dir(out_path)
    if out_path.exists() and not overwrite:
        raise CheckpointExistsError(
            f"{str(out_path)!r} already exists; pass --overwrite (overwrite=True) to replace it")
    if partial.exists() and not (resume or overwrite):
        raise CheckpointExistsError(
            f"an interrupted run left {str(partial)!r}; pass --resume to continue it or "
            "--overwrite to start over")

    store = FeatureStore.open(train_store_url)
    data = load_labeled(store)
    check_class_counts(data, config, store.url)
    num_classes, dim = len(data.class_names), data.z.shape[1]
    val_data = None
    if val is not None:
        val_store = FeatureStore.open(val)
        val_store.check_compatible(store.fingerprint(), what=f"training store {store.url!r}")
        val_data = load_labeled(val_store, what="validation store")
        if val_data.class_names != data.class_names:
            raise IncompatibleStoreError(f"validation store {val!r} has other classes than "
                                         f"training store {store.url!r}")

    record: dict[str, Any] = {
        "format": FORMAT, **config.to_dict(),
        "dim": dim, "num_classes": num_classes, "class_names": data.class_names,
        "classifier": "text" if data.text is not None else "prototypes",
        "classifier_trainable": data.text is None or config.train_text,
        "fingerprint": store.fingerprint(), "train_store": store.url,
        "train_rows": int(data.y.numel()), "val_store": val,
    }

    model, means = build_head(data, config)
    model.to(device)
    objective = HeadObjective(model, config, cider_prototypes=means, device=device,
                              profile=profile)
    optimizer = make_optimizer(objective.parameter_groups(config.lr), config)
    shuffle_gen = torch.Generator().manual_seed(config.seed + 2)

    history: list[dict[str, Any]] = []
    first_epoch = 0
    if resume and partial.exists():
        tensors, saved = read_checkpoint_dir(partial, device=device, what="partial run",
                                             format=STATE_FORMAT)
        diff = _differences(_run_identity(saved), _run_identity(record))
        if diff:
            raise CheckpointError(
                f"cannot resume from {str(partial)!r}: it was started with other settings "
                f"({', '.join(diff[:5])} differ); pass --overwrite to start over")
        split = split_prefixes(tensors)
        model.load_state_dict(split["model"], strict=True)
        load_optimizer_state(optimizer, split["optimizer"], saved["optimizer_state"])
        objective.load_state(split["objective"], saved["objective_state"])
        shuffle_gen.set_state(split["rng"]["shuffle"].cpu())
        history = list(saved["history"])
        first_epoch = int(saved["epochs_done"])
        if log:
            log(f"resuming {str(out_path)!r} after epoch {first_epoch}/{config.epochs}")

    z_all, y_all = _place(data.z, device), data.y.to(device)
    steps_per_epoch = math.ceil(z_all.shape[0] / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    timings = {"steps": 0.0}
    for epoch in range(first_epoch, config.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(z_all.shape[0], generator=shuffle_gen)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   unit="step", disable=not progress, leave=False)
        with bar:
            stats = run_epoch(objective, _batches(z_all, y_all, order, config.batch_size, device),
                              optimizer, epoch=epoch,
                              lr_at=lambda step: cosine_lr(1.0, step, total_steps),
                              first_step=epoch * steps_per_epoch, amp=config.amp,
                              progress=bar if progress else None)
        if profile:
            _sync(device)
        seconds = time.perf_counter() - started
        timings["steps"] += seconds
        model.eval()
        entry = {"epoch": epoch + 1, **stats.summary(),
                 "val_accuracy": (accuracy(model, val_data.z, val_data.y, device)
                                  if val_data is not None else None),
                 "seconds": round(seconds, 3)}
        history.append(entry)
        if log:
            log(_format_epoch(entry, config.epochs))
        save_partial(partial, {"model": model}, optimizer, objective, shuffle_gen,
                     {**record, "history": history, "epochs_done": epoch + 1})

    final = {**record, "history": history, "npos_version": __version__,
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_checkpoint_dir(out_path, model.state_dict(), final)
    if partial.exists():
        shutil.rmtree(partial)
    timings.update(objective.timings)
    return TrainResult(str(out_path), history, first_epoch, timings)


def _format_epoch(entry: Mapping[str, Any], epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}", f"id_loss {entry['id_loss']:.4f}"]
    if entry["outlier_loss"] is not None:
        parts.append(f"outlier_loss {entry['outlier_loss']:.4f}")
    parts.append(f"acc {entry['accuracy']:.4f}")
    if entry["val_accuracy"] is not None:
        parts.append(f"val_acc {entry['val_accuracy']:.4f}")
    parts.append(f"{entry['seconds']:.1f}s")
    return "  ".join(parts)


def split_prefixes(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Undo :func:`save_partial`'s ``prefix/name`` flattening."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        prefix, rest = key.split("/", 1)
        out.setdefault(prefix, {})[rest] = value
    return out


def save_partial(path: Path, modules: Mapping[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, objective: HeadObjective,
                 shuffle_gen: torch.Generator, record: Mapping[str, Any], *,
                 format: str = STATE_FORMAT) -> None:
    """Write the resumable state of a run (module weights, optimizer, objective incl. its
    queues, shuffling RNG) atomically; ``record`` goes to its config.json."""
    opt_tensors, opt_meta = optimizer_state(optimizer)
    obj_tensors, obj_meta = objective.state()
    tensors = {**{f"{name}/{k}": v for name, module in modules.items()
                  for k, v in module.state_dict().items()},
               **{f"optimizer/{k}": v for k, v in opt_tensors.items()},
               **{f"objective/{k}": v for k, v in obj_tensors.items()},
               "rng/shuffle": shuffle_gen.get_state()}
    write_checkpoint_dir(path, tensors, {**record, "format": format,
                                         "optimizer_state": opt_meta,
                                         "objective_state": obj_meta})


__all__ = ["HeadConfig", "HeadObjective", "StepOutput", "TrainResult", "run_epoch",
           "train_head", "load_labeled", "accuracy", "cosine_lr"]
