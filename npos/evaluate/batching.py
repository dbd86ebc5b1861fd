"""Streaming a store through a scorer in chunk-aligned batches, optionally across processes.

Under ``torchrun`` (``WORLD_SIZE`` > 1) batch ``b`` belongs to rank ``b % WORLD_SIZE``, so ranks
read disjoint rows and — because a batch is a run of whole store chunks — write disjoint
output chunks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npos.store import FeatureStore
from npos.validation import check_int


@dataclass(frozen=True)
class Shard:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def batch_plan(store: FeatureStore, batch_rows: int) -> tuple[int, int]:
    """``(chunks_per_batch, n_batches)``: ``batch_rows`` rounded down to whole chunks (>= 1)."""
    check_int("batch_size", batch_rows, 1)
    per = max(1, int(batch_rows) // store.chunk_rows)
    return per, math.ceil(store.n_chunks / per)


#: The shard of a run without torchrun (Shard is frozen, so one instance serves all).
SINGLE_PROCESS = Shard()


def shard_batches(store: FeatureStore, batch_rows: int, names: Sequence[str] = ("embeddings",),
                  *, shard: Shard = SINGLE_PROCESS, dtype: str | None = "float32",
                  ) -> Iterator[dict[str, Any]]:
    """Yield this shard's batches of readable rows, like :meth:`FeatureStore.iter_batches`.

    Each dict maps every requested name to its readable rows, plus ``"row"`` (the rows'
    positions in the store) and ``"chunks"`` (the store chunks the batch covers). A batch
    whose rows are all unreadable is still yielded (with zero rows) so writers can fill its
    chunks.
    """
    per, n_batches = batch_plan(store, batch_rows)
    mask = store.readable_rows()
    arrays = {name: store.array(name) for name in names}
    for b in range(shard.rank, n_batches, shard.world):
        chunks = range(b * per, min((b + 1) * per, store.n_chunks))
        start = chunks.start * store.chunk_rows
        stop = min(chunks.stop * store.chunk_rows, store.n_rows)
        keep = mask[start:stop]
        batch: dict[str, Any] = {"row": np.arange(start, stop)[keep], "chunks": chunks}
        for name, arr in arrays.items():
            data = np.asarray(arr[start:stop])[keep]
            batch[name] = data.astype(dtype) if dtype and data.dtype.kind == "f" else data
        yield batch


def n_shard_batches(store: FeatureStore, batch_rows: int, shard: Shard) -> int:
    """How many batches :func:`shard_batches` yields for ``shard`` (for progress bars)."""
    _, n_batches = batch_plan(store, batch_rows)
    return len(range(shard.rank, n_batches, shard.world))


class Distributed:
    """Joins the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (context manager).

    Uses NCCL when the device is CUDA, else gloo; each rank's CUDA device is
    ``cuda:LOCAL_RANK``. Leaves a process group it did not create alone.
    """

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world > 1 and device.startswith("cuda") and ":" not in device:
            self.device = f"cuda:{self.local_rank}"
        self._created = False

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)

    def __enter__(self) -> Distributed:
        if self.world > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                cuda = self.device.startswith("cuda")
                if cuda:
                    # a plain "cuda" means this rank's local GPU (set_device needs an index)
                    index = torch.device(self.device).index
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0"))
                                          if index is None else index)
                dist.init_process_group("nccl" if cuda else "gloo")
                self._created = True
        return self

    def __exit__(self, *exc) -> None:
        if self._created:
            import torch.distributed as dist

            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); ``None`` elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out
