"""`ClassQueues`: per-class FIFO ring buffers of embeddings, for online synthesis."""

from __future__ import annotations

import torch

from npos.errors import ParameterError
from npos.validation import check_int


class ClassQueues:
    """Per-class FIFO ring buffers with a vectorized push (no per-sample Python loop).

    Each class keeps its ``capacity`` most recent embeddings. Slot order inside
    :attr:`banks` is the ring's storage order, not arrival order (synthesis does not care);
    :meth:`ordered` returns a class's contents oldest first.

    Parameters
    ----------
    num_classes : int
        C, the number of classes (labels 0..C-1).
    capacity : int
        Q, the queue length per class (the paper: 1000).
    dim : int
        D, the embedding dimension.
    device, dtype
        Where and how the buffers are stored.

    Attributes
    ----------
    banks : Tensor of shape (C, Q, D)
        The buffers; slots of queues that are not full yet hold zeros.
    counts : Tensor of shape (C,)
        int64 number of filled slots per class (at most Q).
    """

    def __init__(self, num_classes: int, capacity: int, dim: int, *, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        for name, value in (("num_classes", num_classes), ("capacity", capacity),
                            ("dim", dim)):
            check_int(name, value, 1)
        self.num_classes, self.capacity, self.dim = num_classes, capacity, dim
        self.banks = torch.zeros((num_classes, capacity, dim), device=device, dtype=dtype)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.banks.device)
        # Next slot to write per class: the oldest entry once the queue is full.
        self._head = torch.zeros(num_classes, dtype=torch.int64, device=self.banks.device)

    @property
    def ready(self) -> torch.Tensor:
        """(C,) bool: the class's queue is full."""
        return self.counts == self.capacity

    def all_ready(self) -> bool:
        """True when every class's queue is full."""
        return bool(self.ready.all())

    def push(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Append rows ``x`` (B, D) with labels ``y`` (B,) to their classes' queues, in order.

        Rows are detached and cast to the buffers' device and dtype. When a batch holds more
        than Q rows of one class, only its last Q count (as if pushed one by one).
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ParameterError(f"push expects x of shape (B, {self.dim}); got {tuple(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ParameterError(
                f"push expects y of shape ({x.shape[0]},); got {tuple(y.shape)}")
        if y.numel() == 0:
            return
        device = self.banks.device
        y = y.to(device=device, dtype=torch.int64)
        if bool((y < 0).any()) or bool((y >= self.num_classes).any()):
            raise ParameterError(
                f"push got labels outside [0, {self.num_classes}): "
                f"min {int(y.min())}, max {int(y.max())}")
        x = x.detach().to(device=device, dtype=self.banks.dtype)
        # Rank of each row among the rows of its class in this batch, in batch order.
        order = torch.argsort(y, stable=True)
        y_sorted = y[order]
        per_class = torch.bincount(y, minlength=self.num_classes)
        first = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(y.numel(), device=device) - first[y_sorted]
        # Of more than Q rows of one class only the last Q survive; writing only those
        # keeps every target slot distinct, so one indexed assignment is well defined.
        survive = rank >= per_class[y_sorted] - self.capacity
        rows, cls, rank = order[survive], y_sorted[survive], rank[survive]
        slot = (self._head[cls] + rank) % self.capacity
        self.banks[cls, slot] = x[rows]
        self._head = (self._head + per_class) % self.capacity
        self.counts = torch.clamp(self.counts + per_class, max=self.capacity)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contents and write positions, for resuming a run exactly (slot order decides which
        bank points seeded picks land on)."""
        return {"banks": self.banks, "counts": self.counts, "head": self._head}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        device = self.banks.device
        self.banks.copy_(state["banks"])
        self.counts = state["counts"].to(device)
        self._head = state["head"].to(device)

    def ordered(self, c: int) -> torch.Tensor:
        """Contents of class ``c``'s queue, oldest first: shape (counts[c], D)."""
        count = int(self.counts[c])
        start = (int(self._head[c]) - count) % self.capacity
        positions = (torch.arange(count, device=self.banks.device) + start) % self.capacity
        return self.banks[c, positions]

    def __repr__(self) -> str:
        return (f"ClassQueues(num_classes={self.num_classes}, capacity={self.capacity}, "
                f"dim={self.dim}, ready={int(self.ready.sum())}/{self.num_classes})")
