"""The data side of ``train-head``: labeled rows of a store as tensors, the class-count check,
the initial head, and the batch source of cached features (shuffled by index permutation,
on the device when they fit)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from npos.errors import ParameterError, StoreError
from npos.train_head.config import HeadConfig
from npos.train_head.model import HeadModel


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


def load_one_class(store) -> LabeledFeatures:
    """Every valid row of an unlabeled store as the single class ``"id"`` (``y = 0``): the
    data of a one-class detector (``--outliers`` with ``--id-loss none``), whose classifier
    is trivial (one prototype, accuracy 1) and whose OOD head is what is trained."""
    z = torch.from_numpy(store.read("embeddings"))
    return LabeledFeatures(z, torch.zeros(z.shape[0], dtype=torch.int64), ["id"], None)


def check_class_counts(data: LabeledFeatures, config: HeadConfig, store_url: str, *,
                       online: bool = True) -> None:
    """Every class needs labeled rows, and with online synthesis (``online``) at least
    ``queue`` of them (else its queue never fills and synthesis never starts)."""
    counts = torch.bincount(data.y, minlength=len(data.class_names))
    c = int(counts.argmin())
    if int(counts[c]) == 0:
        raise StoreError(f"class {data.class_names[c]!r} has no labeled rows in training store "
                         f"{store_url!r}")
    if online and config.ood_weight > 0 and int(counts[c]) < config.queue:
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
        rbf: Any = model.head  # an RbfHead (typed nn.Module on HeadModel)
        rbf.init_from_data(z, data.y, generator=torch.Generator().manual_seed(config.seed))
    return model, means


def head_record(config: HeadConfig, data: LabeledFeatures, *, train_store: str,
                fingerprint: dict[str, Any], val_store: str | None = None) -> dict[str, Any]:
    """What a head's ``config.json`` says about how it was made: every hyperparameter, the
    classes, the classifier kind and the encoder identity (``fingerprint``) of its inputs."""
    return {**config.to_dict(), "dim": data.z.shape[1], "num_classes": len(data.class_names),
            "class_names": data.class_names,
            "classifier": "text" if data.text is not None else "prototypes",
            "classifier_trainable": data.text is None or config.train_text,
            "fingerprint": fingerprint, "train_store": train_store,
            "train_rows": int(data.y.numel()), "val_store": val_store}


def _place(z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the feature matrix to ``device`` when it fits comfortably (half the free
    memory); otherwise keep it in pinned host memory and move batches as they are used."""
    if device.type != "cuda":
        return z
    free, _ = torch.cuda.mem_get_info(device)
    if z.numel() * z.element_size() < free // 2:
        return z.to(device)
    return z.pin_memory()


class FeatureBatches:
    """The batch source of ``train-head``: cached features, reshuffled every epoch.

    The whole feature matrix lives on the device when it fits (no DataLoader); an epoch is
    one ``randperm`` of the rows (drawn from the trainer's generator) cut into batches.

    Parameters
    ----------
    z : Tensor of shape (N, D)
        Embeddings in their stored dtype; batches are float32.
    y : Tensor of shape (N,)
    batch_size : int
    device : torch.device
    """

    def __init__(self, z: torch.Tensor, y: torch.Tensor, batch_size: int,
                 device: torch.device) -> None:
        self.z, self.y = _place(z, device), y.to(device)
        self.batch_size, self.device = batch_size, device
        self.n_rows = int(self.z.shape[0])
        self.steps_per_epoch = math.ceil(self.n_rows / batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(z, y)`` batches of one epoch in the order ``generator`` draws."""
        order = torch.randperm(self.z.shape[0], generator=generator)
        for start in range(0, order.numel(), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield (self.z[idx.to(self.z.device)].to(self.device, torch.float32,
                                                    non_blocking=True),
                   self.y[idx.to(self.y.device)].to(self.device, non_blocking=True))


class OutlierDraws:
    """Pre-synthesized outliers (``train-head --outliers``): each step draws ``per_step`` of
    them without replacement (``randperm`` by the objective's generator, so a resumed run
    draws the same ones).

    Parameters
    ----------
    z : Tensor of shape (M, D)
        Outliers in the (frozen) embedding space of the training store.
    per_step : int
        Outliers per step (at most M).
    device : torch.device
    """

    def __init__(self, z: torch.Tensor, per_step: int, device: torch.device) -> None:
        self.z = _place(z.float(), device)
        self.per_step = min(int(per_step), int(z.shape[0]))
        self.device = device

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """(per_step, D) float32 outliers on the device."""
        order = torch.randperm(self.z.shape[0], generator=generator, device=generator.device)
        idx = order[:self.per_step].to(self.z.device)
        return self.z[idx].to(self.device, non_blocking=True)


def load_outliers(url: str, train_store, config: HeadConfig, data: LabeledFeatures,
                  per_step: int | None, device: torch.device, *,
                  one_class: bool = False) -> OutlierDraws:
    """The outliers store ``url`` (kind ``outliers``, the training store's encoder) as
    per-step draws: ``per_step`` of them, by default what online synthesis gives per step with
    every class ready (``classes x pick x keep``), or one batch for a one-class store."""
    from npos.store import FeatureStore

    if config.ood_weight <= 0:
        raise ParameterError("--outliers trains the OOD head: it needs --ood-weight > 0 "
                             "(e.g. --ood-weight 0.1)")
    store = FeatureStore.open(url, kinds=("outliers",), what="train-head --outliers")
    store.check_compatible(train_store.fingerprint(),
                           what=f"training store {train_store.url!r}")
    z = store.read("embeddings", as_torch=True)
    if z.shape[0] == 0 or z.shape[1] != data.z.shape[1]:
        raise StoreError(f"outliers store {url!r} has shape {tuple(z.shape)}; train-head needs "
                         f"rows of dimension {data.z.shape[1]}")
    if per_step is None:
        per_step = (config.batch_size if one_class else
                    len(data.class_names) * config.synthesis.pick * config.synthesis.keep)
    return OutlierDraws(z, per_step, device)


@torch.no_grad()
def accuracy(model: HeadModel, z: torch.Tensor, y: torch.Tensor, device: torch.device, *,
             batch_size: int = 65536) -> float:
    """Top-1 accuracy of the cosine classifier on (N, D) embeddings."""
    correct = 0
    for start in range(0, z.shape[0], batch_size):
        logits = model.logits(z[start:start + batch_size].to(device, torch.float32))
        correct += int((logits.argmax(1).cpu() == y[start:start + batch_size]).sum())
    return correct / max(z.shape[0], 1)


__all__ = ["FeatureBatches", "LabeledFeatures", "OutlierDraws", "accuracy", "build_head",
           "check_class_counts", "head_record", "load_labeled", "load_one_class", "load_outliers"]
