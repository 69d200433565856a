"""Joining the ranks of a job: the default process group on torch.distributed, rank and world queries."""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

# Long enough for a rank that loads a large checkpoint before it joins; a rank that never comes fails the rest.
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


def default_backend(device: torch.device) -> str:
    """gloo for CPU tensors; on CUDA, NCCL for device tensors beside gloo for host ones (step descriptions)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Join the job's default process group as `rank` of `world_size` (init_method: tcp://host:port or file://)."""
    dist.init_process_group(
        backend=default_backend(device),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=RENDEZVOUS_TIMEOUT,
    )


def destroy_distributed() -> None:
    """Leave the default process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank in the default group; 0 where there is none."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Ranks in the default group; 1 where there is none."""
    return dist.get_world_size() if dist.is_initialized() else 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a rendezvous address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def host_identity() -> str:
    """Which machine (and container) this process runs on: ranks that share it can share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            return f"{socket.gethostname()}:{boot_id.read().strip()}"
    except OSError:
        return socket.gethostname()
