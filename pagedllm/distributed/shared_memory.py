"""All-reduce and all-gather among the ranks of one host through one shared memory segment.

gloo moves every tensor through a TCP socket, tens of microseconds per call even on one host; a tensor-parallel
model all-reduces twice per layer. Here each rank owns two slots of a segment mapped by all of them, and the
collectives run in C++ (kernels/csrc/shared_memory.cpp, which states the protocol and its invariants): called from
here, or between the layers of the fused decode kernel, on the same segment and the same count of calls. Without the
CPU kernels the group falls back to torch.distributed.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import uuid

import numpy as np
import torch
import torch.distributed as dist

from pagedllm.kernels import cpu_kernels_available

# One cache line per rank: its flag, process id, count of peers sleeping on its flag and time spent waiting
# (shared_memory.cpp states the layout).
FLAG_LINE_BYTES = 64
PID_INDEX, WAITED_NS_INDEX = 1, 3
SLOTS_PER_RANK = 2
# Holds a hidden-size vector of every token of a 512-token float32 step of a 2,048-wide model in one call.
DEFAULT_SLOT_BYTES = 4 * 2**20


def shared_memory_supported() -> bool:
    """Whether the collectives' kernel is built here."""
    return cpu_kernels_available()


def _segment_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class PeerExitedError(RuntimeError):
    """A rank of the group exited (or stopped answering) in the middle of a collective."""


def _peer_exited(error: dist.DistBackendError) -> PeerExitedError:
    """The kernel's report of a rank that exited or did not answer (its first line, without the C++ trace)."""
    return PeerExitedError(str(error).split("\n", 1)[0])


class SharedMemoryCollectives:
    """Sum and gather over the ranks of one host; every rank of the group calls each collective in the same order."""

    def __init__(self, rank: int, world_size: int, path: str, slot_bytes: int, timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        size = world_size * (FLAG_LINE_BYTES + SLOTS_PER_RANK * slot_bytes)
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # Each rank's line: its flag (the kernel's count of calls), then its process id, which peers check.
        self._lines = np.ndarray((world_size, FLAG_LINE_BYTES // 8), dtype=np.int64, buffer=self._map)
        self._lines[rank, PID_INDEX] = os.getpid()
        self.segment = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def create(
        cls, group: dist.ProcessGroup | None = None, slot_bytes: int = DEFAULT_SLOT_BYTES, timeout_s: float = 600.0
    ) -> SharedMemoryCollectives:
        """Map one segment among the ranks of `group` (all on this host); its file is gone once all mapped it."""
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        slot_bytes = -(-slot_bytes // FLAG_LINE_BYTES) * FLAG_LINE_BYTES
        path = [""]
        if rank == 0:
            path[0] = os.path.join(_segment_dir(), f"pagedllm-collectives-{uuid.uuid4().hex}")
            size = world_size * (FLAG_LINE_BYTES + SLOTS_PER_RANK * slot_bytes)
            fd = os.open(path[0], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        try:
            collectives = cls(rank, world_size, path[0], slot_bytes, timeout_s)
            dist.barrier(group=group)
        finally:
            if rank == 0:
                os.unlink(path[0])  # the mappings stay; nothing is left behind if a rank dies
        return collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns x."""
        try:
            torch.ops.pagedllm.shared_memory_all_reduce_(x, self.segment, self.rank, self.world_size, self.timeout_s)
        except dist.DistBackendError as error:
            raise _peer_exited(error) from error
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked in rank order: [world_size, *x.shape]."""
        try:
            return torch.ops.pagedllm.shared_memory_all_gather(
                x, self.segment, self.rank, self.world_size, self.timeout_s
            )
        except dist.DistBackendError as error:
            raise _peer_exited(error) from error

    def waited_seconds(self) -> float:
        """How long this rank's collectives have waited for the other ranks so far (a profiling figure)."""
        return int(self._lines[self.rank, WAITED_NS_INDEX]) / 1e9

    def barrier(self) -> None:
        """Wait until every rank reaches this call."""
        self.all_gather(torch.empty(0))

    def close(self) -> None:
        """Unmap the segment; no collective may run afterwards."""
        del self.segment, self._lines
        self._map.close()
