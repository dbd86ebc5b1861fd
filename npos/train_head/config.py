"""`HeadConfig`: every hyperparameter of a head training run, validated in one place.

Kept free of torch so the command line can read its defaults cheaply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from npos.validation import all_violations, check_choice, check_float, check_int
from npos.synthesize.config import SynthesisConfig

OPTIMIZERS = ("sgd", "adamw")
PROJECTIONS = ("linear", "mlp")
HEADS = ("mlp", "rbf")
ID_LOSSES = ("ce", "logitnorm", "cider", "none")


@dataclass(frozen=True)
class HeadConfig:
    """Every hyperparameter of a head training run (what ``config.json`` records).

    Parameters
    ----------
    epochs, batch_size : int
    lr : float
        Learning rate of the projection and classifier; the OOD head uses
        ``lr * head_lr_scale``. Follows a per-step cosine schedule down to 0.
    optimizer : {"sgd", "adamw"}
        SGD with ``momentum`` or AdamW; both with ``weight_decay``.
    momentum, weight_decay, head_lr_scale : float
    projection : {"linear", "mlp"}
        The D→D map ``P`` (identity at init).
    temperature : float
        Cosine-logit temperature τ of the classifier (and of LogitNorm/CIDER).
    train_text : bool
        Learn the class text embeddings (fixed by default). Without text embeddings in the
        store the classifier uses learned prototypes regardless.
    id_loss : {"ce", "logitnorm", "cider", "none"}
    head : {"mlp", "rbf"}
        OOD head: the paper's ReLU MLP ``D -> head_hidden -> 1`` or the distance-shaped RBF.
    head_hidden, rbf_centres : int
        Hidden width of the MLP head; centres per class of the RBF head.
    detach_head : bool
        The OOD head sees ``h.detach()``, so its loss does not move the projection.
    ood_weight : float
        Weight λ of the outlier loss; 0 disables synthesis entirely (the ablation).
    start_epoch : int
        First epoch (0-based) that synthesizes outliers.
    synth_every : int
        Synthesize every this many steps; steps in between reuse the last outliers.
    queue : int
        Capacity Q of each class's ring buffer of projected embeddings.
    synthesis : SynthesisConfig
        The synthesis engine's parameters (``method``, ``k``, ``select``, ...).
    seed : int
        Seeds initialization, shuffling and synthesis: same seed, same CPU result.
    amp : bool
        bfloat16 autocast for the forward pass on CUDA; on the CPU, bfloat16 inputs with
        float32 results for the training step's matrix products where the CPU has native
        bfloat16 (:func:`npos.device.cpu_matmul_precision`).
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    head_lr_scale: float = 10.0
    projection: str = "linear"
    temperature: float = 0.1
    train_text: bool = False
    id_loss: str = "ce"
    head: str = "rbf"
    head_hidden: int = 32
    rbf_centres: int = 16
    detach_head: bool = True
    ood_weight: float = 0.1
    start_epoch: int = 0
    synth_every: int = 1
    queue: int = 1000
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    seed: int = 0
    amp: bool = True

    def validate(self) -> None:
        """Raise one :class:`~npos.errors.ParameterError` listing every invalid parameter."""
        with all_violations():
            check_int("epochs", self.epochs, 1, owner="train_head")
            check_int("batch_size", self.batch_size, 1, owner="train_head")
            check_float("lr", self.lr, 0.0, low_open=True, owner="train_head")
            check_choice("optimizer", self.optimizer, OPTIMIZERS, owner="train_head")
            check_float("momentum", self.momentum, 0.0, low_open=False, high=1.0,
                        owner="train_head")
            check_float("weight_decay", self.weight_decay, 0.0, low_open=False,
                        owner="train_head")
            check_float("head_lr_scale", self.head_lr_scale, 0.0, low_open=True,
                        owner="train_head")
            check_choice("projection", self.projection, PROJECTIONS, owner="train_head")
            check_float("temperature", self.temperature, 0.0, low_open=True, owner="train_head")
            check_choice("id_loss", self.id_loss, ID_LOSSES, owner="train_head")
            check_choice("head", self.head, HEADS, owner="train_head")
            check_int("head_hidden", self.head_hidden, 1, owner="train_head")
            check_int("rbf_centres", self.rbf_centres, 1, owner="train_head")
            check_float("ood_weight", self.ood_weight, 0.0, low_open=False,
                        owner="train_head")
            check_int("start_epoch", self.start_epoch, 0, self.epochs - 1, owner="train_head")
            check_int("synth_every", self.synth_every, 1, owner="train_head")
            check_int("queue", self.queue, 2, owner="train_head")
            check_int("seed", self.seed, 0, owner="train_head")
        if self.ood_weight > 0:
            # The engine validates its own parameters against the bank size (the queue).
            self.synthesis.validate(self.queue, bank_name="queue")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``synthesis`` nested, with its ``resolved_sigma``)."""
        return {**dataclasses.asdict(self), "synthesis": self.synthesis.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HeadConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (e.g. a full config.json)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        if isinstance(kwargs.get("synthesis"), Mapping):
            synth_names = {f.name for f in dataclasses.fields(SynthesisConfig)}
            kwargs["synthesis"] = SynthesisConfig(
                **{k: v for k, v in kwargs["synthesis"].items() if k in synth_names})
        return cls(**kwargs)
