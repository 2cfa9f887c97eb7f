"""torchrun support for distillation: rank and world, the process group, devices, barriers."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flowpress.errors import FlowpressError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> Dist:
    """Rank and world size of the torch.distributed group (initialised by `init_distributed`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Dist()


def init_distributed() -> Dist:
    """Join the torchrun group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if torch.cuda.is_available() and torch.cuda.device_count() < local:
            raise FlowpressError(
                f"torchrun started {local} processes on this host, which has {torch.cuda.device_count()} CUDA "
                f"GPU(s): nccl needs one GPU per process; use --nproc_per_node={torch.cuda.device_count()}, "
                "or CUDA_VISIBLE_DEVICES= to train on the CPU (gloo)"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return dist_info()


def barrier() -> None:
    if dist_info().world > 1:
        torch.distributed.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def config_hash(*parts: Any) -> str:
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _why(error: Exception) -> str:
    """The first line of an exception's message (its type when the message is empty), at most 200 characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
