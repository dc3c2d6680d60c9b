"""One process or many: read torchrun's environment, wrap models in DDP, split global batches.

Every rank draws the same global batch (same seed, same step) and keeps its contiguous slice, and DDP
averages the gradients, so N processes take the same optimizer steps as one process on the whole
batch, up to floating-point summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fxpress.errors import FxpressError


@dataclass
class Distributed:
    """Where this process sits: its rank, the world size and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> Distributed:
        """Join the process group torchrun describes (gloo on CPU, NCCL on GPU), or run alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(rank, world, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """Return `model` on this device, inside DistributedDataParallel when there are several ranks."""
        model = model.to(self.device)
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return this rank's contiguous slice of a global batch (its size must divide by the world)."""
        if tensor.shape[0] % self.world:
            raise FxpressError(f"global batch {tensor.shape[0]} does not split evenly over {self.world} processes")
        size = tensor.shape[0] // self.world
        return tensor[self.rank * size:(self.rank + 1) * size].to(self.device)

    def mean(self, value: float) -> float:
        """Return the mean of a scalar over all ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the mean of `tensor` over all ranks (a new tensor; `tensor` itself when alone)."""
        if self.world == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over every process (the value itself outside torchrun); where every rank holds
    an equal share of the batch, this is the whole batch's mean."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    return Distributed(dist.get_rank(), dist.get_world_size(), value.device).mean(float(value))
