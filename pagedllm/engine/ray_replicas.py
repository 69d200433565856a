"""Data-parallel replicas as Ray actors: each runs `replica_loop` on a thread of its own, on whichever node of the
Ray cluster has its CPUs, linked to the driver by two queues.

The driver's commands carry a sequence number, because Ray runs a concurrent actor's calls in no set order; the
replica applies them in the order they were sent. Its messages reach the driver through one long-polling call at a
time per replica (`next_messages`), so a replica whose actor dies fails that call at once.
"""

from __future__ import annotations

import heapq
import queue
import threading
from dataclasses import replace
from typing import Any

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.executor import STARTUP_TIMEOUT_S
from pagedllm.engine.ray_executor import connect_to_cluster, rank_placement_group
from pagedllm.engine.replica import ReplicaLost, replica_config, replica_loop


class OrderedCommands:
    """The replica's end of its link: commands in the order the driver numbered them, messages queued for it."""

    def __init__(self) -> None:
        self.arrived: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.messages: queue.Queue[Any] = queue.Queue()
        self.early: list[tuple[int, int, Any]] = []  # (number, arrival, command) that came before their turn
        self.next_number = 0
        self.arrivals = 0

    def put(self, number: int, command: Any) -> None:
        self.arrived.put((number, command))

    def send(self, message: Any) -> None:
        self.messages.put(message)

    def poll(self) -> bool:
        self._take_arrived(block=False)
        return bool(self.early) and self.early[0][0] == self.next_number

    def recv(self) -> Any:
        while not (self.early and self.early[0][0] == self.next_number):
            self._take_arrived(block=True)
        _, _, command = heapq.heappop(self.early)
        self.next_number += 1
        return command

    def _take_arrived(self, block: bool) -> None:
        try:
            while True:
                number, command = self.arrived.get(block=block)
                heapq.heappush(self.early, (number, self.arrivals, command))
                self.arrivals += 1
                block = False
        except queue.Empty:
            pass


class RayReplica:
    """One replica inside a Ray actor: its engine loop on a thread, fed through `command`, read through
    `next_messages`."""

    def __init__(self, index: int, config: EngineConfig) -> None:
        torch.set_num_threads(config.num_threads if config.world_size == 1 else 1)  # its ranks compute
        self.link = OrderedCommands()
        self.loop = threading.Thread(target=replica_loop, args=(index, config, self.link), daemon=True)
        self.loop.start()

    def command(self, number: int, command: Any) -> None:
        self.link.put(number, command)

    def next_messages(self) -> list[Any]:
        """Every message the replica has sent since the last call, waiting for the first."""
        messages = [self.link.messages.get()]
        while not self.link.messages.empty():
            messages.append(self.link.messages.get_nowait())
        return messages

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RayReplicas:
    """`data_parallel_size` RayReplica actors of `num_threads` CPUs each (1 where unset), placed by Ray. A replica
    whose model runs in ranks (tensor or pipeline parallelism) gets a placement group of a bundle per rank, made
    here (so that here it is removed, with the ranks in it, when the replica is lost or stopped); the replica takes
    no CPU of its own, sits in its ranks' first bundle, and starts its ranks in the group (ray_executor.py)."""

    def __init__(self, config: EngineConfig) -> None:
        import ray

        connect_to_cluster()
        threads = config.num_threads or 1
        actor = ray.remote(RayReplica)
        settings = replica_config(config)
        self.placement_groups: list[Any] = []
        if config.world_size > 1:
            self.placement_groups = [
                rank_placement_group(config.world_size, threads) for _ in range(config.data_parallel_size)
            ]
            ray.get([group.ready() for group in self.placement_groups], timeout=STARTUP_TIMEOUT_S)
        else:
            settings = replace(settings, num_threads=threads)
        self.actors = [
            actor.options(**self._actor_options(index, threads), name=f"pagedllm-replica-{index}").remote(
                index, settings
            )
            for index in range(config.data_parallel_size)
        ]
        self.numbers = [0] * len(self.actors)
        self.polls: dict[Any, int] = {actor.next_messages.remote(): index for index, actor in enumerate(self.actors)}

    def _actor_options(self, index: int, threads: int) -> dict[str, Any]:
        # Two calls at once: `command` must reach a replica whose `next_messages` is waiting.
        if not self.placement_groups:
            return {"num_cpus": threads, "max_concurrency": 2}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.placement_groups[index], placement_group_bundle_index=0)
        return {"num_cpus": 0, "max_concurrency": 2, "scheduling_strategy": strategy}

    def node_ids(self) -> list[str]:
        """The Ray node of each replica."""
        import ray

        return ray.get([actor.node_id.remote() for actor in self.actors])

    def send(self, index: int, command: tuple[Any, ...]) -> None:
        self.actors[index].command.remote(self.numbers[index], command)
        self.numbers[index] += 1

    def receive(self, timeout_s: float | None) -> list[tuple[int, str, Any]]:
        import ray

        ready, _ = ray.wait(list(self.polls), num_returns=1, timeout=timeout_s)
        if not ready:
            raise ReplicaLost(f"no replica answered within {timeout_s:.0f} s")
        messages = []
        for ref in ready:
            index = self.polls.pop(ref)
            try:
                arrived = ray.get(ref)
            except ray.exceptions.RayError as error:
                raise ReplicaLost(f"replica {index} is gone ({type(error).__name__}: {error})", index) from error
            messages += [(index, kind, value) for kind, value in arrived]
            self.polls[self.actors[index].next_messages.remote()] = index
        return messages

    def remove(self, index: int) -> None:
        import ray

        ray.kill(self.actors[index])  # its poll, which failed, is no longer awaited
        self.polls = {ref: polled for ref, polled in self.polls.items() if polled != index}
        if self.placement_groups:
            ray.util.remove_placement_group(self.placement_groups[index])  # and the ranks in it

    def shutdown(self) -> None:
        """Kill every replica's actor and its ranks, giving their CPUs back to the cluster."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        for group in self.placement_groups:
            ray.util.remove_placement_group(group)
        self.actors, self.polls, self.placement_groups = [], {}, []
