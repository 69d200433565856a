"""The `ray` executor: every rank a Ray actor, placed by one placement group over the nodes of a Ray cluster: its
own, or the one its caller runs in (a data-parallel replica's, which the replicas' driver made for its ranks).

The engine's process joins the cluster that `ray start --head` / `ray start --address=…` made (RAY_ADDRESS, or the
one running on this node), or starts a Ray instance of its own when there is none. Rank 0's node gives the
torch.distributed rendezvous address; ranks that share a host sum through shared memory, the others through gloo,
as under `mp`. A rank whose actor dies, or whose step raises, fails the step at once with WorkerError: the driver
waits on every rank's answer, not only rank 0's, so a rank 0 left waiting in a collective cannot hang it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any

import numpy as np
import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.process_group import free_port, init_distributed
from pagedllm.engine.executor import STARTUP_TIMEOUT_S, WorkerError, fail
from pagedllm.engine.model_runner import StepInput
from pagedllm.engine.worker import Worker, logits_rank, tensor_parallel_group
from pagedllm.errors import ConfigError, PagedLLMError
from pagedllm.kernels import cpu_kernels_available

logger = logging.getLogger(__name__)


class RayRank:
    """One rank inside a Ray actor: joins the group, loads its shard, runs the steps it is sent."""

    def __init__(self, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.answers = False
        self.group = ParallelGroup()
        self.worker: Worker | None = None

    def rendezvous_address(self) -> str:
        """tcp://this node's address:a port free on it, for the ranks to meet at (asked of rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()
        return f"tcp://{host}:{free_port(host)}"

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(
        self, rank: int, world_size: int, init_method: str, config: EngineConfig, num_blocks: int, max_model_len: int
    ) -> tuple[int, int]:
        """Join the group and load this rank's shard; its weight bytes and the checkpoint's."""
        device = torch.device(config.device)
        init_distributed(rank, world_size, init_method, device)
        self.group = tensor_parallel_group(config, rank, device)
        self.worker = Worker(config, num_blocks, max_model_len, self.group, rank)
        self.answers = rank == logits_rank(config)
        return self.worker.weight_bytes, self.worker.file_weight_bytes

    def execute(self, step: StepInput) -> np.ndarray | None:
        """The step's logits on the rank that hands them to the driver (logits_rank); None on the others."""
        assert self.worker is not None, "start() runs first"
        logits = self.worker.execute(step)
        return logits.numpy() if self.answers else None


def rank_placement_group(world_size: int, num_threads: int) -> Any:
    """A placement group of `world_size` bundles of `num_threads` CPUs, one per rank; PACK fills a node before the
    next, so ranks share a host (and its shared memory) where they fit."""
    from ray.util.placement_group import placement_group

    return placement_group([{"CPU": num_threads}] * world_size, strategy="PACK")


def connect_to_cluster() -> None:
    """Join RAY_ADDRESS's cluster, else the one running on this node, else start a Ray instance here."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address or "auto", logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError:
        if address:
            raise
        logger.info("no Ray cluster is running on this node: starting one for this engine")
        ray.init(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)


class RayExecutor:
    """`world_size` ranks, each a Ray actor with `num_threads` CPUs (1 where unset) of one placement group."""

    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int, world_size: int) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpu_kernels_available()  # built here once: the actors of this host load the same build
        connect_to_cluster()
        self._remove_placement_group = remove_placement_group
        self.failure: str | None = None
        threads = config.num_threads or 1
        given = get_current_placement_group()
        if given is not None and given.bundle_count < world_size:
            raise ConfigError(
                f"this engine runs in a Ray placement group of {given.bundle_count} bundles: its {world_size} ranks "
                "need one each",
                "tensor_parallel_size",
            )
        self.owns_placement_group = given is None  # a given one is its maker's to remove
        self.placement_group = given or rank_placement_group(world_size, threads)
        actor = ray.remote(RayRank)
        self.workers: list[Any] = []
        try:
            ray.get(self.placement_group.ready(), timeout=STARTUP_TIMEOUT_S)
            for rank in range(world_size):
                strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)
                # Named by their placement group too: each data-parallel replica starts ranks of its own.
                name = f"pagedllm-rank-{rank}-{self.placement_group.id.hex()[:8]}"
                options = {"num_cpus": threads, "scheduling_strategy": strategy, "name": name}
                self.workers.append(actor.options(**options).remote(threads))
            init_method = ray.get(self.workers[0].rendezvous_address.remote(), timeout=STARTUP_TIMEOUT_S)
            started = [
                worker.start.remote(rank, world_size, init_method, config, num_blocks, max_model_len)
                for rank, worker in enumerate(self.workers)
            ]
            loaded = self._get_all(started, STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self.weight_bytes = sum(weight_bytes for weight_bytes, _ in loaded)  # every rank's
        self.file_weight_bytes = loaded[0][1]
        self.logits_rank = logits_rank(config)
        self.in_flight: deque[list[Any]] = deque()  # each submitted step's answers, one per rank, oldest first

    def node_ids(self) -> list[str]:
        """The Ray node of each rank, in rank order."""
        import ray

        return ray.get([worker.node_id.remote() for worker in self.workers])

    def submit(self, step: StepInput) -> None:
        import ray

        if self.failure is not None:
            raise WorkerError(self.failure)
        step_ref = ray.put(step)  # serialized once, read by every rank
        # An actor runs the calls of one caller in the order made: each rank takes the steps in submission order.
        self.in_flight.append([worker.execute.remote(step_ref) for worker in self.workers])

    def collect(self) -> torch.Tensor:
        if self.failure is not None:
            raise WorkerError(self.failure)
        logits = self._get_all(self.in_flight.popleft(), None)[self.logits_rank]
        return torch.tensor(logits)  # a copy: Ray hands out its object store's read-only memory

    def _get_all(self, refs: list[Any], timeout_s: float | None) -> list[Any]:
        """Every rank's answer in rank order; WorkerError as soon as any one fails or its actor dies."""
        import ray

        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not ready:
                fail(self, f"{len(pending)} rank(s) did not answer within {timeout_s:.0f} s")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:
                cause = error.cause if isinstance(error.cause, BaseException) else error
                fail(self, cause if isinstance(cause, PagedLLMError) else f"rank {refs.index(ready[0])}: {cause}")
            except ray.exceptions.RayError as error:
                fail(self, f"rank {refs.index(ready[0])} is gone ({type(error).__name__}: {error})")
        return ray.get(refs)

    def shutdown(self) -> None:
        """Kill every rank's actor (a rank's shared memory leaves nothing behind) and give the placement group's CPUs
        back to the cluster."""
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self.placement_group is not None and self.owns_placement_group:
            self._remove_placement_group(self.placement_group)
        self.placement_group = None
