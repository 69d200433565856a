"""Where a tensor-parallel step's time goes on each rank: compute, waiting for the other rank at a collective
(imbalance), and the collective itself, for one prefill and batch-1 decode steps, beside one process.

Each rank runs its worker's forward (the step input built here, no driver) with its collectives timed: before each,
a barrier measures how long the rank waited for its peer; then the collective runs with both ranks there. Decode is
also timed through the fused decode kernel (collectives inside it, not split). The prefill also runs with its
collectives skipped, by each rank alone (the other waiting) and by both at once: what the ranks' compute costs
each other, apart from the collectives. Each figure is the least over --turns (the machine may be shared);
`thread CPU` beside wall time shows a rank that lost its core.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import SimpleQueue

import torch
import torch.multiprocessing as torch_mp

from pagedllm.config import EngineConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.launch import spawn_ranks
from pagedllm.engine.model_runner import ModelRunner, StepInput
from pagedllm.engine.worker import Worker, load_model, pin_rank_threads, tensor_parallel_group

NUM_BLOCKS = 64
BLOCK_SIZE = 16


def prefill_step(prompt_len: int) -> StepInput:
    tokens = torch.randint(100, 40000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = list(range(-(-prompt_len // BLOCK_SIZE)))
    return StepInput(
        tokens, list(range(prompt_len)), [prompt_len], [[prompt_len]], [list(range(prompt_len))], [[blocks]],
        [prompt_len - 1],
    )  # fmt: skip


def decode_step(context: int) -> StepInput:
    blocks = list(range(-(-context // BLOCK_SIZE)))
    return StepInput([1234], [context - 1], [1], [[context]], [[context - 1]], [[blocks]], [0])


@dataclass
class Timing:
    """Seconds per phase of one step, summed over its collectives."""

    wall: float = 0.0
    cpu: float = 0.0
    wait: float = 0.0
    collective: float = 0.0
    calls: int = 0
    by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class TimedGroup:
    """Wraps a ParallelGroup's collectives so that each is preceded by a timed barrier."""

    def __init__(self, group: ParallelGroup) -> None:
        self.group = group
        self.timing = Timing()
        self.all_reduce, self.all_gather = group.all_reduce, group.all_gather
        group.all_reduce = self._timed("all_reduce", self.all_reduce)  # type: ignore[method-assign]
        group.all_gather = self._timed("all_gather", self.all_gather)  # type: ignore[method-assign]

    def _timed(self, kind: str, collective: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def run(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            self.group.shared_memory.barrier()
            met = time.perf_counter()
            out = collective(x)
            end = time.perf_counter()
            self.timing.wait += met - start
            self.timing.collective += end - met
            self.timing.by_kind[kind] += end - met
            self.timing.calls += 1
            return out

        return run


class UnsummedCollectives:
    """Within it, the group's collectives return their input's shape without meeting the other ranks."""

    def __init__(self, group: ParallelGroup) -> None:
        self.group = group

    def __enter__(self) -> None:
        self.saved = self.group.all_reduce, self.group.all_gather
        world_size = self.group.world_size
        self.group.all_reduce = lambda x: x  # type: ignore[method-assign]
        self.group.all_gather = lambda x: x.unsqueeze(0).expand(world_size, *x.shape).contiguous()  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        self.group.all_reduce, self.group.all_gather = self.saved  # type: ignore[method-assign]


def time_step(execute: Callable[[StepInput], object], step: StepInput, calls: int, timed: TimedGroup | None) -> Timing:
    """`calls` runs of `step`, timed together."""
    if timed is not None:
        timed.timing = Timing()
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        execute(step)
    timing = timed.timing if timed is not None else Timing()
    timing.wall, timing.cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return timing


def best(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda t: t.wall)


def rank_main(rank: int, world_size: int, args: argparse.Namespace, queue: SimpleQueue) -> None:
    pin_rank_threads(rank, world_size, 1)
    config = EngineConfig(model=args.model, tensor_parallel_size=world_size, distributed_executor_backend="mp")
    group = tensor_parallel_group(config, rank, torch.device("cpu"))
    worker = Worker(config, NUM_BLOCKS, NUM_BLOCKS * BLOCK_SIZE, group, rank)
    worker.hand_logit_slices()  # as the mp executor's ranks do
    fused = worker.runner.fused_decode
    results = {}
    with torch.inference_mode():
        prefill, decode = prefill_step(args.prompt_len), decode_step(args.decode_context)
        for _ in range(2):
            worker.execute(prefill)
            worker.execute(decode)
        cases = {"prefill": (prefill, 1), "decode fused": (decode, args.decode_calls)}
        samples = defaultdict(list)
        for _ in range(args.turns):
            for name, (step, calls) in cases.items():
                group.shared_memory.barrier()
                samples[name].append(time_step(worker.execute, step, calls, None))
            worker.runner.fused_decode = None
            timed = TimedGroup(group)
            timed_cases = {"prefill timed": (prefill, 1), "decode timed": (decode, args.decode_calls)}
            for name, (step, calls) in timed_cases.items():
                group.shared_memory.barrier()
                samples[name].append(time_step(worker.execute, step, calls, timed))
            group.all_reduce, group.all_gather = timed.all_reduce, timed.all_gather
            worker.runner.fused_decode = fused
            barrier = group.shared_memory.barrier
            with UnsummedCollectives(group):
                for alone in range(world_size):
                    barrier()
                    if rank == alone:
                        samples["prefill alone"].append(time_step(worker.execute, prefill, 1, None))
                    barrier()
                barrier()
                samples["prefill together"].append(time_step(worker.execute, prefill, 1, None))
        for name, timings in samples.items():
            calls = args.decode_calls if name.startswith("decode") else 1
            t = best(timings)
            results[name] = {
                "wall_ms": 1e3 * t.wall / calls,
                "median_wall_ms": 1e3 * statistics.median(x.wall for x in timings) / calls,
                "cpu_ms": 1e3 * t.cpu / calls,
                "wait_ms": 1e3 * t.wait / calls,
                "collective_ms": 1e3 * t.collective / calls,
                "calls": t.calls // calls,
                "by_kind_ms": {k: 1e3 * v / calls for k, v in t.by_kind.items()},
            }
    queue.put((rank, results))


def single_process(args: argparse.Namespace, threads: int) -> dict:
    torch.set_num_threads(threads)
    config = EngineConfig(model=args.model, num_threads=threads)
    model = load_model(config, NUM_BLOCKS * BLOCK_SIZE).model
    runner = ModelRunner(model, config, NUM_BLOCKS, torch.device("cpu"), None)
    prefill, decode = prefill_step(args.prompt_len), decode_step(args.decode_context)

    def execute(step: StepInput) -> None:
        hidden, _ = runner.hidden_states(step)
        model.compute_logits(hidden[step.logit_rows])

    results = {}
    with torch.inference_mode():
        for _ in range(2):
            execute(prefill)
            execute(decode)
        for name, step, calls in (("prefill", prefill, 1), ("decode fused", decode, args.decode_calls)):
            timings = [time_step(execute, step, calls, None) for _ in range(args.turns)]
            t = best(timings)
            results[name] = {"wall_ms": 1e3 * t.wall / calls, "cpu_ms": 1e3 * t.cpu / calls}
    return results


def _shown(value: float | int | dict) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {v:.3f}" for k, v in value.items()) + "}"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-context", type=int, default=160)
    parser.add_argument("--decode-calls", type=int, default=20)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--single", action="store_true", help="also time one process on 2 threads")
    args = parser.parse_args()
    queue = torch_mp.get_context("spawn").SimpleQueue()
    spawn_ranks(rank_main, 2, (args, queue), num_threads=1)
    ranks = dict(queue.get() for _ in range(2))
    for rank in sorted(ranks):
        for name, r in ranks[rank].items():
            print(f"rank {rank} {name:14s} " + "  ".join(f"{k} {_shown(v)}" for k, v in r.items()))
    if args.single:
        for name, r in single_process(args, 2).items():
            print(f"single 2 threads {name:14s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
