"""torchrun set-up in one place: NCCL on CUDA, gloo on CPU; one process is one rank."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str) -> DistContext:
    """Read torchrun's environment; start the process group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    owns = world > 1 and not dist.is_initialized()  # a caller's group is used and left running
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(device)
    if owns:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistContext(rank, world, local_rank, device, owns)


def all_reduce_max(flag: bool, context: DistContext) -> bool:
    """True on every rank if it is true on any (skip a batch, stop on a signal)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_reduce_mean(value: float, context: DistContext) -> float:
    if not context.distributed:
        return value
    tensor = torch.tensor([value], device=context.device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, context: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DistributedDataParallel does this at the start of every training forward; a forward outside
    it (validation on each rank's share) needs it too, or each rank would normalise with the
    statistics its own last batch left.
    """
    if context.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_objects(value: object, context: DistContext) -> list[object]:
    """Every rank's ``value``, in rank order (small Python objects: per-image scores)."""
    if not context.distributed:
        return [value]
    gathered: list[object] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown(context: DistContext) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()
