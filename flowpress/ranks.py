"""Data parallelism on torch.distributed (torchrun: gloo on CPU, nccl on GPU): who this process is,
which work units it runs, and the collectives that put the whole back together in unit order.

The unit is a batch of seeds (or a layer), fixed by the recipe and never by the world size, so a
run with N processes computes exactly the batches a one-process run computes, each whole; only
where they run changes.  A function that shards must be called by every rank (it gathers);
`alone()` runs a block on one rank as if it were the only one."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from flowpress.errors import FlowpressError

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_TIMEOUT_S = 7200  # a collective waits this long for a rank (FLOWPRESS_DIST_TIMEOUT_S): rank 0 builds a
# real-size model's engines alone, for many minutes, while the others wait


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_ALONE = threading.local()


def dist_info() -> Dist:
    """Rank and world size of the torch.distributed group (initialised by `init_distributed`);
    (0, 1) inside `alone()`."""
    if getattr(_ALONE, "depth", 0) == 0 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Dist()


@contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process works as a world of one: nothing it runs waits for the other
    ranks (the serial stages: export, engine builds, latency, writing the run)."""
    _ALONE.depth = getattr(_ALONE, "depth", 0) + 1
    try:
        yield
    finally:
        _ALONE.depth -= 1


class PeerStopped(FlowpressError):
    """This rank stopped because another rank failed or left (it said why, or its launcher did)."""


def _stop(signum: int, _frame: object) -> None:
    raise PeerStopped(
        f"rank {dist_info().rank} stopped ({signal.Signals(signum).name} from its launcher: another rank failed); "
        "the run directory was not written"
    )


def timeout_s() -> int:
    raw = os.environ.get("FLOWPRESS_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    if not raw.isdigit() or int(raw) < 1:
        raise FlowpressError(f"FLOWPRESS_DIST_TIMEOUT_S={raw!r}: give a whole number of seconds >= 1")
    return int(raw)


def init_distributed(cpu: bool = False) -> Dist:
    """Join the torchrun group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU; gloo whenever `cpu`:
    the work runs on the CPU), collectives timing out after FLOWPRESS_DIST_TIMEOUT_S; a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        gpu = torch.cuda.is_available() and not cpu
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if gpu and torch.cuda.device_count() < local:
            raise FlowpressError(
                f"torchrun started {local} processes on this host, which has {torch.cuda.device_count()} CUDA "
                f"GPU(s): nccl needs one GPU per process; use --nproc_per_node={torch.cuda.device_count()}, "
                "or CUDA_VISIBLE_DEVICES= to run on the CPU (gloo)"
            )
        backend = "nccl" if gpu else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
        signal.signal(signal.SIGTERM, _stop)  # torchrun stops the others when one fails: unwind, remove what was staged
    return dist_info()


def lost_peer(err: BaseException) -> PeerStopped | None:
    """A collective that failed because another rank is gone (closed connection, timeout), as one line."""
    if dist_info().world == 1 or not isinstance(err, (torch.distributed.DistError, RuntimeError)):
        return None
    text = str(err)
    if isinstance(err, torch.distributed.DistError) or "gloo" in text.lower() or "connection" in text.lower():
        reason = (text.strip().splitlines() or [type(err).__name__])[0][:200]
        return PeerStopped(
            f"rank {dist_info().rank} stopped: a collective with the other ranks failed ({reason}); another rank "
            f"failed or left, or waited over FLOWPRESS_DIST_TIMEOUT_S={timeout_s()} s"
        )
    return None


def runtime_threads() -> int:
    """Threads for a runtime's session (onnxruntime, OpenVINO): torch's thread count where the user
    or the launcher set one (OMP_NUM_THREADS; cores / ranks under --nproc-per-node); else 0, the
    runtime's own default (every physical core)."""
    return torch.get_num_threads() if dist_info().world > 1 or "OMP_NUM_THREADS" in os.environ else 0


def barrier() -> None:
    if dist_info().world > 1:
        torch.distributed.barrier()


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """(index, item) of the items this rank runs: every world-th one, from its rank."""
    d = dist_info()
    return [(i, item) for i, item in enumerate(items) if i % d.world == d.rank]


def gathered(mine: dict[int, R], total: int) -> list[R]:
    """Every rank's results by unit index, in index order, on every rank."""
    d = dist_info()
    if d.world > 1:
        parts: list[Any] = [None] * d.world
        torch.distributed.all_gather_object(parts, mine)
        mine = {i: value for part in parts for i, value in part.items()}
    return [mine[i] for i in range(total)]


def run_sharded(items: Sequence[T], work: Callable[[T], R], bar: Callable[[], None] = lambda: None) -> list[R]:
    """work(item) for every item, each rank running its share; the results of all, in item order,
    on every rank (bar() after each of this rank's items)."""
    mine = {}
    for i, item in shard(items):
        mine[i] = work(item)
        bar()
    return gathered(mine, len(items))


def reduce_max(tensors: Sequence[torch.Tensor]) -> None:
    """Each tensor becomes its element-wise maximum over the ranks, in place (exact)."""
    if dist_info().world == 1 or not tensors:
        return
    flat = torch.cat([t.detach().flatten().float() for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
    at = 0
    for t in tensors:
        t.copy_(flat[at : at + t.numel()].view_as(t).to(t.dtype))
        at += t.numel()


def broadcast(value: T) -> T:
    """Rank 0's `value`, on every rank."""
    if dist_info().world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def agree(facts: dict[str, str], fix: str) -> None:
    """Every rank must have been started on the same `facts` (name -> a value or hash): the first
    that differs from rank 0's is one line on every rank, before any work."""
    d = dist_info()
    if d.world == 1:
        return
    every: list[Any] = [None] * d.world
    torch.distributed.all_gather_object(every, facts)
    for rank, theirs in enumerate(every):
        for name, value in every[0].items():
            if theirs.get(name) != value:
                raise FlowpressError(
                    f"rank {rank} was started with another {name} than rank 0 ({str(theirs.get(name))[:16]} vs "
                    f"{str(value)[:16]}); {fix}"
                )
