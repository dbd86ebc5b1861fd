"""This process's place under ``torchrun``: the process group of a sharded extraction
(see :mod:`npos.extract.extraction`)."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch

#: Process-group timeout: ranks wait at barriers for the slowest one (e.g. rank 0 embedding
#: 18 000 prompts, or a rank with more chunks left after a resume).
DIST_TIMEOUT = _dt.timedelta(hours=24)


class _Processes:
    """This process's place under torchrun (a single process without it)."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self._owns_group = False
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        if device.type == "cuda":
            if device.index is None:  # a plain "cuda" means this rank's local GPU
                self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=DIST_TIMEOUT)
            self._owns_group = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
