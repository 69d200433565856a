"""Running a function on several ranks of this host, each a spawned process joined to one process group."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from pagedllm.distributed.process_group import destroy_distributed, free_port, init_distributed
from pagedllm.kernels import cpu_kernels_available

RankFn = Callable[..., None]


def _rank_main(rank: int, fn: RankFn, world_size: int, init_method: str, num_threads: int, args: tuple) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    init_distributed(rank, world_size, init_method, torch.device("cpu"))
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_distributed()


def spawn_ranks(fn: RankFn, world_size: int, args: tuple[Any, ...] = (), num_threads: int = 1, timeout_s: float = 300):
    """Run fn(rank, world_size, *args) in `world_size` processes joined by gloo; raises what a rank raised, or
    TimeoutError (every rank killed) when they have not all finished within `timeout_s`."""
    cpu_kernels_available()  # built here once, rather than by every rank, each waiting on the build's lock
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = torch_mp.start_processes(
        _rank_main,
        args=(fn, world_size, init_method, num_threads, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.01)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"ranks still running after {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
