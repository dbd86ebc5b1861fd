"""The trainable pieces of a head: projection ``P``, cosine classifier and OOD head.

``h = P(z)`` maps a cached embedding ``z`` (D,) to the trained space; the classifier scores
``cos(h, w_c) / temperature`` against class embeddings ``w_c`` (the store's text embeddings,
or learned prototypes when it has none); the OOD head maps ``h`` to one logit, higher = more
in-distribution (the npos score convention).

Both projections start as the identity, so an untrained model reproduces the frozen
embedding space (its cosine logits are the zero-shot / nearest-prototype logits).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from npos.train_head.config import HEADS, PROJECTIONS
from npos.train_head.rbf import RbfWorkspace, rbf_logsumexp


class Projection(nn.Module):
    """``h = P(z)``, a D→D map that is the identity at initialization.

    Parameters
    ----------
    dim : int
        Embedding dimension D.
    kind : {"linear", "mlp"}
        ``linear``: ``h = W z + b`` with ``W = I``, ``b = 0`` at init. ``mlp``: the residual
        ``h = z + W2 relu(W1 z + b1) + b2`` with ``W2 = 0``, ``b2 = 0`` at init (``W1`` keeps
        PyTorch's default init so the hidden layer is not dead).
    """

    def __init__(self, dim: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in PROJECTIONS:
            raise ValueError(f"unknown projection {kind!r}; expected one of {PROJECTIONS}")
        self.kind = kind
        if kind == "linear":
            self.linear = nn.Linear(dim, dim)
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(dim))
                self.linear.bias.zero_()
        else:
            self.fc1 = nn.Linear(dim, dim)
            self.fc2 = nn.Linear(dim, dim)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    @torch.no_grad()
    def is_identity(self) -> bool:
        """Whether this map is exactly ``h = z`` (as at init), so it may be skipped."""
        if self.kind == "linear":
            eye = torch.eye(self.linear.weight.shape[0], device=self.linear.weight.device)
            return bool(torch.equal(self.linear.weight, eye)
                        and not self.linear.bias.any())
        return not (self.fc2.weight.any() or self.fc2.bias.any())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D), un-normalized."""
        if self.kind == "linear":
            return self.linear(z)
        return z + self.fc2(F.relu(self.fc1(z)))


class CosineClassifier(nn.Module):
    """Cosine logits ``cos(h, w_c) / temperature`` over C class embeddings.

    Parameters
    ----------
    weight : Tensor of shape (C, D)
        Initial class embeddings (normalized inside the forward pass, so their norms do not
        matter).
    temperature : float
        Divides the cosines; small values make the softmax sharp (CLIP uses 0.01).
    trainable : bool
        Learn ``weight`` (a parameter) or keep it fixed (a buffer, still saved with the model
        so a checkpoint is self-contained).
    """

    def __init__(self, weight: torch.Tensor, *, temperature: float, trainable: bool) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.trainable = bool(trainable)
        weight = weight.detach().clone().float()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def cosines(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C) float32 cosine similarities in [-1, 1].

        Always float32, also under autocast: bfloat16 carries 8 significant bits, so a
        cosine near 0.9 is off by up to ~0.002, which the temperature (0.01 for CLIP) turns
        into ~0.2 of logit noise. The product is (N, D) x (D, C): cheap in float32.
        """
        with torch.autocast(device_type=h.device.type, enabled=False):
            return F.normalize(h.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).T

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C) logits ``cos / temperature``."""
        return self.cosines(h) / self.temperature


class MlpHead(nn.Module):
    """The paper's OOD head: ``D -> hidden -> 1`` with a ReLU, on ``h`` as it is."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) logit, higher = more in-distribution."""
        return self.fc2(F.relu(self.fc1(h))).squeeze(-1)


class RbfHead(nn.Module):
    """A distance-shaped OOD head on the unit sphere.

    ``logit(h) = logsumexp_j(-‖ĥ - μ_j‖² / (2 s²)) + b`` with ``ĥ = h / ‖h‖``, centres
    ``μ_j`` (``centres_per_class`` per class, learnable), a learnable width ``s`` and bias
    ``b``. Unlike a ReLU MLP, whose logit grows linearly along most rays and so can rate
    points far from all data as confidently ID, this logit falls off with the distance to
    the nearest centre in every direction.

    Parameters
    ----------
    dim : int
    num_classes : int
    centres_per_class : int
    """

    def __init__(self, dim: int, num_classes: int, centres_per_class: int = 4) -> None:
        super().__init__()
        self.num_classes, self.centres_per_class = int(num_classes), int(centres_per_class)
        self.centres = nn.Parameter(torch.zeros(num_classes * centres_per_class, dim))
        self.log_width = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.workspace = RbfWorkspace()  # the training step's (N, M) matrix, reused

    @torch.no_grad()
    def init_from_data(self, h: torch.Tensor, y: torch.Tensor, *,
                       generator: torch.Generator) -> None:
        """Centres = random samples of each class (normalized); width and bias so that a
        typical training point sits at logit ≈ 0.

        Parameters
        ----------
        h : Tensor of shape (N, D)
        y : Tensor of shape (N,)
            Labels 0..C-1; every class must occur.
        """
        per_class = self.centres_per_class
        hn = F.normalize(h.float(), dim=-1)
        picks = []
        for c in range(self.num_classes):
            rows = torch.nonzero(y == c).squeeze(1)
            order = torch.randperm(rows.numel(), generator=generator)
            # Fewer points than centres: reuse them (the centres separate during training).
            picks.append(rows[order[torch.arange(per_class) % rows.numel()]])
        self.centres.copy_(hn[torch.cat(picks)])
        # The nearest-centre squared distance of a typical point sets the width: such a
        # point gets logit = -1/2 + bias, and bias = 1/2 centres it at 0. Points that are
        # centres themselves (distance 0) are left out.
        sample = torch.randperm(hn.shape[0], generator=generator)[:4096]
        d2 = torch.cdist(hn[sample], self.centres).pow(2)
        d2 = d2.masked_fill(d2 < 1e-8, float("inf")).min(dim=1).values
        scale = d2[torch.isfinite(d2)].median().clamp_min(1e-4)
        self.log_width.fill_(0.5 * torch.log(scale).item())
        self.bias.fill_(0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) logit, higher = closer to a centre = more in-distribution."""
        # Always float32: ‖a‖² + ‖b‖² - 2a·b cancels badly in bfloat16 under autocast. (The
        # CPU's --amp rounds only the product's inputs: float32 results, ~2e-4 off.)
        with torch.autocast(device_type=h.device.type, enabled=False):
            hn = F.normalize(h.float(), dim=-1)
            return rbf_logsumexp(hn, self.centres.float(), self.log_width,
                                 workspace=self.workspace) + self.bias


class HeadModel(nn.Module):
    """Projection + cosine classifier + OOD head.

    Parameters
    ----------
    class_weight : Tensor of shape (C, D)
        Initial class embeddings (text embeddings or prototypes).
    projection : {"linear", "mlp"}
    head : {"mlp", "rbf"}
    temperature : float
    train_classifier : bool
        Whether the class embeddings are learnable.
    head_hidden : int
        Hidden width of the ``mlp`` head.
    rbf_centres : int
        Centres per class of the ``rbf`` head.
    """

    def __init__(self, class_weight: torch.Tensor, *, projection: str = "linear",
                 head: str = "mlp", temperature: float = 0.1, train_classifier: bool = False,
                 head_hidden: int = 32, rbf_centres: int = 4) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        num_classes, dim = class_weight.shape
        self.dim, self.num_classes = int(dim), int(num_classes)
        self.projection = Projection(dim, projection)
        self.classifier = CosineClassifier(class_weight, temperature=temperature,
                                           trainable=train_classifier)
        self.head = (MlpHead(dim, head_hidden) if head == "mlp"
                     else RbfHead(dim, num_classes, rbf_centres))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings -> (N, D) projected ``h`` (un-normalized)."""
        return self.projection(z)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C) cosine logits ``cos(h, w_c) / temperature``."""
        return self.classifier(self.project(z))

    def ood_logit(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) OOD-head logit, higher = more in-distribution."""
        return self.head(self.project(z))
