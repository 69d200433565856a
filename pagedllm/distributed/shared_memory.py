"""All-reduce and all-gather among the ranks of one host through one shared memory segment.

gloo moves every tensor through a TCP socket, tens of microseconds per call even on one host; a tensor-parallel
model all-reduces twice per layer. Here each rank owns two slots of a segment mapped by all of them. A collective
call (a chunk of a tensor that exceeds a slot takes one call per chunk) numbered g: the rank copies its data into
its slot g % 2, stores g in its flag, waits until every flag reaches g, then reads every rank's slot g % 2.

Invariant: a rank writes slot g % 2 again only in call g + 2, after every flag reached g + 1; a rank stores g + 1
only once it has finished reading call g. So one flag store per call is the only synchronization, and no rank
ever overwrites data another still reads. Every rank sums the slots in rank order, so all ranks hold the same bits.

The flag store must become visible after the data copy, and the data reads must follow the flag load: the x86
memory model gives both for plain stores and loads, so the segment is used on x86 only (other CPUs fall back to
torch.distributed).
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

# One cache line per rank for its flag and process id, so ranks never write the same line.
FLAG_LINE_BYTES = 64
SLOTS_PER_RANK = 2
# Holds a hidden-size vector of every token of a 512-token float32 step of a 2,048-wide model in one call.
DEFAULT_SLOT_BYTES = 4 * 2**20
# A waiting rank polls this many times before it yields its core to other threads between polls.
BUSY_POLLS = 64
# How often a waiting rank checks that the ranks it waits for still exist.
LIVENESS_CHECK_S = 0.1


def shared_memory_supported() -> bool:
    """Whether this CPU's memory model lets the segment's plain flag stores order its data (x86)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _segment_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class PeerExitedError(RuntimeError):
    """A rank of the group exited (or stopped answering) in the middle of a collective."""


class SharedMemoryCollectives:
    """Sum and gather over the ranks of one host; every rank of the group calls each collective in the same order."""

    def __init__(self, rank: int, world_size: int, path: str, slot_bytes: int, timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        self.generation = 0
        header = world_size * FLAG_LINE_BYTES
        size = header + world_size * SLOTS_PER_RANK * slot_bytes
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        lines = np.ndarray((world_size, FLAG_LINE_BYTES // 8), dtype=np.int64, buffer=self._map)
        self._flags = lines[:, 0]
        self._pids = lines[:, 1]
        self._pids[rank] = os.getpid()
        data = torch.frombuffer(self._map, dtype=torch.uint8, offset=header, count=size - header)
        self._slots = data.view(world_size, SLOTS_PER_RANK, slot_bytes)
        self._typed_slots: dict[torch.dtype, torch.Tensor] = {}

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
        flat = x.view(-1) if x.is_contiguous() else x.contiguous().view(-1)
        per_call = self.slot_bytes // x.element_size()
        for start in range(0, flat.numel(), per_call):
            chunk = flat[start : start + per_call]
            slot = self._exchange(chunk)
            parts = self._typed(x.dtype)[:, slot, : chunk.numel()].unbind(0)
            if self.world_size == 2:
                torch.add(parts[0], parts[1], out=chunk)
            else:
                chunk.copy_(parts[0])
                for part in parts[1:]:
                    chunk.add_(part)
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view(x.shape))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked in rank order: [world_size, *x.shape]."""
        flat = x.contiguous().view(-1)
        out = torch.empty(self.world_size, flat.numel(), dtype=x.dtype, device=x.device)
        per_call = self.slot_bytes // x.element_size()
        for start in range(0, flat.numel(), per_call):
            chunk = flat[start : start + per_call]
            slot = self._exchange(chunk)
            out[:, start : start + chunk.numel()] = self._typed(x.dtype)[:, slot, : chunk.numel()]
        return out.view(self.world_size, *x.shape)

    def barrier(self) -> None:
        """Wait until every rank reaches this call."""
        self._exchange(torch.empty(0))

    def _exchange(self, chunk: torch.Tensor) -> int:
        """Publish this rank's chunk as the next call's and wait for every rank's; returns the slot to read."""
        generation = self.generation + 1
        slot = generation % SLOTS_PER_RANK
        if chunk.numel():
            self._typed(chunk.dtype)[self.rank, slot, : chunk.numel()].copy_(chunk)
        self._flags[self.rank] = generation
        if self._flags.min() < generation:
            self._wait(generation)
        self.generation = generation
        return slot

    def _typed(self, dtype: torch.dtype) -> torch.Tensor:
        """The slots as [world_size, SLOTS_PER_RANK, elements] of `dtype`."""
        slots = self._typed_slots.get(dtype)
        if slots is None:
            slots = self._typed_slots[dtype] = self._slots.view(dtype)
        return slots

    def _wait(self, generation: int) -> None:
        polls = 0
        started = last_check = time.monotonic()
        while self._flags.min() < generation:
            polls += 1
            if polls < BUSY_POLLS:
                continue
            os.sched_yield()
            now = time.monotonic()
            if now - last_check >= LIVENESS_CHECK_S:
                last_check = now
                self._check_peers(generation, now - started)

    def _check_peers(self, generation: int, waited_s: float) -> None:
        for r in np.flatnonzero(self._flags < generation):
            if not _process_alive(int(self._pids[r])):
                raise PeerExitedError(f"rank {r} of the shared-memory group (pid {self._pids[r]}) exited")
        if waited_s > self.timeout_s:
            raise PeerExitedError(f"ranks {np.flatnonzero(self._flags < generation).tolist()} did not answer")

    def close(self) -> None:
        """Unmap the segment; no collective may run afterwards."""
        del self._slots, self._typed_slots, self._flags, self._pids
        self._map.close()
