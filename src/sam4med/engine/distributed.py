"""Training on several processes with torch.distributed, as ``torchrun --nproc-per-node N`` starts them.

The one training loop (``engine.training.fit``) uses this module: each process takes its share of every
batch (items ``rank::world`` of the batch the one-process run would draw, from the same seed), the loss
goes through :class:`torch.nn.parallel.DistributedDataParallel`, which averages the gradients, so every
process applies the update of the whole batch; rank 0 alone validates, writes the history and the
checkpoints and shows progress. gloo on CPUs, NCCL on GPUs (each process on ``cuda:LOCAL_RANK``). Without
torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here does anything.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def processes() -> Processes:
    """This process's place in a torchrun job, joining the process group on first call."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        # left to the interpreter's shutdown, gloo's threads end the process with "terminate called" (SIGABRT)
        atexit.register(dist.destroy_process_group)
    return Processes(dist.get_rank(), dist.get_world_size())


def shard(batch: object, group: Processes) -> object:
    """This process's share of a batch: items ``rank::world`` of a list, of each tensor's first dimension
    (a dict or tuple of tensors is split field by field)."""
    if not group.active:
        return batch
    if isinstance(batch, list):
        return batch[group.rank :: group.world]
    if isinstance(batch, torch.Tensor):
        return batch[group.rank :: group.world]
    if isinstance(batch, tuple):
        return tuple(shard(value, group) for value in batch)
    if isinstance(batch, dict):
        return {key: shard(value, group) for key, value in batch.items()}
    raise TypeError(f"cannot split a batch of {type(batch).__name__} between processes")


def mean_over_processes(value: float, group: Processes) -> float:
    """A number averaged over the processes (every process gets the result)."""
    if not group.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item()) / group.world


def leaders_value(value: T, group: Processes) -> T:
    """Rank 0's ``value`` on every process (a decision made there: its validation, its clock)."""
    if not group.active:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def wrap(module: nn.Module, group: Processes, unused_parameters: bool = False) -> nn.Module:
    """``module`` as DistributedDataParallel when several processes train, else itself. ``unused_parameters``:
    a step may not reach every trained parameter (click training), which costs DDP a search each step."""
    if not group.active:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused_parameters)


def barrier(group: Processes) -> None:
    if group.active:
        dist.barrier()
