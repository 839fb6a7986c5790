"""Multi-process runs under ``torchrun``: one process per device, rank 0 writes the artifacts.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them a stage runs as one process
and every helper here is a no-op. The privacy mechanisms stay global: every rank draws the same
Poisson batch from a shared seed (in secure mode rank 0 draws it from the OS and broadcasts it, see
:meth:`Distributed.broadcast_tensor`) and processes its share of it (see :meth:`Distributed.share`), so
sample rate, step count and noise are those of a single-process run with the same settings.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from common.errors import DPImgSynError
from common.runtime import resolve_device

# Ranks wait for each other at collectives; a long wait (rank 0 evaluating, an uneven last shard)
# must not be mistaken for a dead peer. torchrun stops every rank when one of them fails.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)

Item = TypeVar("Item")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run (``rank`` of ``world_size``); the default is a single process."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes artifacts, logs and progress bars."""
        return self.rank == 0

    def share(self, items: Sequence[Item] | torch.Tensor) -> Sequence[Item] | torch.Tensor:
        """This rank's part of a global batch: every ``world_size``-th item, starting at ``rank``."""
        return items[self.rank::self.world_size] if self.enabled else items

    def owns(self, index: int) -> bool:
        """Whether work item ``index`` (a release shard) is this rank's."""
        return index % self.world_size == self.rank

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place (every rank gets the total) and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (a seed drawn from OS entropy must be shared, not redrawn)."""
        if not self.enabled:
            return value
        holder = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.broadcast(holder, src=0)
        return int(holder.item())

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` (shape and values) on every rank, on the caller's device.

        Secure mode draws from the OS, which gives every rank different values: rank 0 draws the
        Poisson batch or the noise and the others take it. Other ranks pass any tensor of the same
        dtype and number of dimensions (its shape and values are ignored).
        """
        if not self.enabled:
            return tensor
        device = _collective_device()
        shape = torch.tensor(tensor.shape, dtype=torch.int64, device=device)
        if shape.numel():
            dist.broadcast(shape, src=0)
        size = tuple(int(extent) for extent in shape.tolist())
        holder = tensor.to(device) if self.is_main else torch.empty(size, dtype=tensor.dtype, device=device)
        if holder.numel():
            dist.broadcast(holder, src=0)
        return holder.to(tensor.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a download, a folder's settings file); the others then reuse it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str | None) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun prepared (once per process) and pick this rank's device.

    ``auto`` and ``cuda`` mean the GPU of this rank's ``LOCAL_RANK``; ``cpu`` keeps every rank on
    the CPU (gloo backend), which is how the tests run two processes on one machine.
    """
    if not launched_by_torchrun():
        return Distributed(), resolve_device(device_name)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is not None and device_name not in (None, "", "auto", "cuda"):
            raise DPImgSynError(f"--device {device_name} names one GPU, but torchrun gives each rank its own; "
                                "use --device cuda (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise DPImgSynError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                "start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Distributed(rank, world_size), device


def teardown() -> None:
    """Leave the process group, so that torch does not warn about it at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
