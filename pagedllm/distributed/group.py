"""A group of ranks that splits a model between them, and the collectives its layers call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagedllm.distributed.process_group import host_identity
from pagedllm.distributed.shared_memory import SharedMemoryCollectives, shared_memory_supported


@dataclass
class ParallelGroup:
    """This process's place in a group of ranks, and the group's sum and gather.

    On one host and CPU tensors the collectives go through shared memory; otherwise (ranks on several hosts, CUDA
    tensors, no CPU kernels) through torch.distributed. A group of one rank has no process group and its
    collectives return their input.
    """

    rank: int = 0
    world_size: int = 1
    process_group: dist.ProcessGroup | None = None
    shared_memory: SharedMemoryCollectives | None = None

    @classmethod
    def create(
        cls, ranks: list[int] | None = None, device: torch.device | None = None, use_shared_memory: bool = True
    ) -> ParallelGroup:
        """The group of `ranks` (default: every rank) of the default process group; every rank must call this."""
        ranks = list(range(dist.get_world_size())) if ranks is None else ranks
        process_group = dist.new_group(ranks) if len(ranks) < dist.get_world_size() else dist.group.WORLD
        if dist.get_rank() not in ranks:
            return cls()
        rank, world_size = dist.get_rank(process_group), len(ranks)
        hosts: list[str | None] = [None] * world_size
        dist.all_gather_object(hosts, host_identity(), group=process_group)
        on_cpu = device is None or device.type == "cpu"
        local = use_shared_memory and on_cpu and len(set(hosts)) == 1 and shared_memory_supported()
        shared_memory = SharedMemoryCollectives.create(process_group) if local and world_size > 1 else None
        return cls(rank, world_size, process_group, shared_memory)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group's ranks, in place; returns x."""
        if self.world_size == 1:
            return x
        if self.shared_memory is not None:
            return self.shared_memory.all_reduce(x)
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked in rank order: [world_size, *x.shape]."""
        if self.world_size == 1:
            return x.unsqueeze(0)
        if self.shared_memory is not None:
            return self.shared_memory.all_gather(x)
        out = torch.empty(self.world_size * x.numel(), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=self.process_group)
        return out.view(self.world_size, *x.shape)

    def close(self) -> None:
        """Release the shared memory segment (the process group is left with the default one)."""
        if self.shared_memory is not None:
            self.shared_memory.close()
            self.shared_memory = None
