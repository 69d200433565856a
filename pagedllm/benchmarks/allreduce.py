"""`pagedllm bench allreduce`: all-reduce latency of hidden-size vectors on the ranks of this host, shared memory
against gloo."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from multiprocessing.queues import SimpleQueue
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from pagedllm.benchmarks import results
from pagedllm.benchmarks.throughput import int_tuple
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.launch import spawn_ranks

HIDDEN_SIZES = (576, 1024, 2048, 4096, 8192)
WARMUP_CALLS = 20


@dataclass
class AllReduceLatency:
    """Median and 90th-percentile microseconds of one all-reduce of `num_elements` values on rank 0."""

    num_elements: int
    shared_memory_median_us: float
    shared_memory_p90_us: float
    gloo_median_us: float
    gloo_p90_us: float


def _latencies_us(all_reduce, x: torch.Tensor, calls: int) -> list[float]:
    for _ in range(WARMUP_CALLS):
        all_reduce(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        all_reduce(x)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def _quantiles(times: list[float]) -> tuple[float, float]:
    deciles = statistics.quantiles(times, n=10)
    return statistics.median(times), deciles[-1]


def _measure(rank: int, world_size: int, sizes: tuple[int, ...], dtype: torch.dtype, calls: int, out: SimpleQueue):
    group = ParallelGroup.create()
    rows = []
    for size in sizes:
        x = torch.randn(size).to(dtype)
        shared = _quantiles(_latencies_us(group.all_reduce, x, calls))
        gloo = _quantiles(_latencies_us(dist.all_reduce, x, calls))
        rows.append(AllReduceLatency(size, *shared, *gloo))
    group.close()
    if rank == 0:
        out.put(rows)


def measure(sizes: tuple[int, ...], world_size: int, dtype: torch.dtype, calls: int) -> list[AllReduceLatency]:
    """Rank 0's latencies for each size, every rank with one thread."""
    out = torch_mp.get_context("spawn").SimpleQueue()
    spawn_ranks(_measure, world_size, (sizes, dtype, calls, out), num_threads=1, timeout_s=600)
    return out.get()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int_tuple, default=HIDDEN_SIZES, help="values per vector, comma-separated")
    parser.add_argument("--world-size", type=int, default=2, help="ranks, one process and one thread each")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--calls", type=int, default=500, help="timed calls per size and path")
    parser.add_argument("--output-json", type=Path, default=None, help="results file to append to")


def run(args: argparse.Namespace) -> int:
    rows = measure(args.sizes, args.world_size, getattr(torch, args.dtype), args.calls)
    print(f"all-reduce on {args.world_size} ranks of this host, {args.dtype}, rank 0's latency in microseconds")
    print(f"{'values':>8} {'shm median':>11} {'shm p90':>8} {'gloo median':>12} {'gloo p90':>9} {'speed-up':>9}")
    for row in rows:
        speedup = row.gloo_median_us / row.shared_memory_median_us
        print(
            f"{row.num_elements:>8} {row.shared_memory_median_us:>11.1f} {row.shared_memory_p90_us:>8.1f} "
            f"{row.gloo_median_us:>12.1f} {row.gloo_p90_us:>9.1f} {speedup:>8.1f}x"
        )
    if args.output_json is not None:
        settings = {"world_size": args.world_size, "dtype": args.dtype, "calls": args.calls}
        run_record = results.new_run("allreduce", "pagedllm", settings, {"latencies": [asdict(r) for r in rows]})
        results.append_run(args.output_json, run_record)
    return 0
