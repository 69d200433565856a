"""Data parallelism: engine replicas, each with its own model, scheduler and KV cache, behind the engine's
interface (add_request / step / abort_request), so the offline API and the async engine drive them as they drive
one engine. A request goes to the replica that has its prompt's prefix cached, unless that one is much busier than
the others, else to the replica with the fewest requests in flight (engine/router.py); it stays there.

A replica is a process of this host (`mp`) or a Ray actor on any node of a Ray cluster (`ray`); either way it runs
`replica_loop` over a link of the same messages. It steps while it has requests and sends each step's outputs
back; the driver's `step` returns what any replica sent. A replica that dies is taken out of the router: its
requests fail with ReplicaLostError (503) and the others go on serving; the last one's death, or a replica's failed
step, stops them all with WorkerError (503), as a dead rank does.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
from collections import defaultdict, deque
from dataclasses import fields, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn, Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.engine import EngineStats, LLMEngine, PrefixCacheStats
from pagedllm.engine.executor import STARTUP_TIMEOUT_S, WorkerError, fail, start_child, stop_children
from pagedllm.engine.host_memory import HeapTrimmer
from pagedllm.engine.output import RequestOutput
from pagedllm.engine.replica import ReplicaInfo, ReplicaLost, replica_config, replica_loop
from pagedllm.engine.router import PrefixAffinityRouter, RoutingPolicy
from pagedllm.engine.worker import pin_rank_threads
from pagedllm.errors import InvalidArgumentError, PagedLLMError, ReplicaLostError
from pagedllm.kernels import cpu_kernels_available
from pagedllm.model.loader import load_model_config
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.speculator import SpecDecodeStats
from pagedllm.structured_output.backend import GrammarBackend

logger = logging.getLogger(__name__)


class ReplicaLinks(Protocol):
    """The driver's ends of the links to every replica."""

    def send(self, index: int, command: tuple[Any, ...]) -> None:
        """Queue a command for replica `index`; ReplicaLost where it cannot be reached."""

    def receive(self, timeout_s: float | None) -> list[tuple[int, str, Any]]:
        """The (replica, kind, value) messages that have arrived, waiting up to `timeout_s` for one; ReplicaLost as
        soon as a replica dies, or once `timeout_s` passes."""

    def remove(self, index: int) -> None:
        """Stop replica `index` (if it still runs) and hear no more of it."""

    def shutdown(self) -> None: ...


def _process_main(index: int, num_replicas: int, config: EngineConfig, connection: Connection) -> None:
    """A replica process: this host's cores shared among the replicas, then the replica's loop. A replica whose
    model runs in ranks (tensor or pipeline parallelism) takes `num_threads` cores for each of them; its ranks
    inherit its cores and share them out in turn, `num_threads` each."""
    ranks = config.world_size
    threads = pin_rank_threads(index, num_replicas, config.num_threads * ranks)
    replica_loop(index, config if ranks > 1 else replace(config, num_threads=threads), connection)


class ProcessReplicas:
    """Each replica a process of this host, linked by a pipe; a replica whose process exits is lost. Replicas that
    start ranks of their own are not daemons, and multiprocessing joins such children when the interpreter exits:
    they are told to stop first, by a hook registered after multiprocessing's own (atexit runs hooks last-in first)."""

    def __init__(self, config: EngineConfig) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for index in range(config.data_parallel_size):
            args = (index, config.data_parallel_size, replica_config(config))
            name = f"pagedllm-replica-{index}"
            connection, process = start_child(context, _process_main, args, name, daemon=config.world_size == 1)
            self.connections.append(connection)
            self.processes.append(process)
        self.live = set(range(config.data_parallel_size))
        atexit.register(self.shutdown)

    def send(self, index: int, command: tuple[Any, ...]) -> None:
        try:
            self.connections[index].send(command)
        except OSError as error:
            raise ReplicaLost(f"could not reach replica {index} ({error})", index) from error

    def receive(self, timeout_s: float | None) -> list[tuple[int, str, Any]]:
        sentinels = {self.processes[index].sentinel: index for index in self.live}
        connections = [self.connections[index] for index in self.live]
        ready = multiprocessing.connection.wait([*connections, *sentinels], timeout_s)
        if not ready:
            raise ReplicaLost(f"no replica answered within {timeout_s:.0f} s")
        messages = []
        for handle in ready:
            if handle in sentinels:
                process = self.processes[sentinels[handle]]
                process.join()
                index = sentinels[handle]
                raise ReplicaLost(f"replica {index} (pid {process.pid}) exited with code {process.exitcode}", index)
            try:
                kind, value = handle.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                continue  # its process has exited: its sentinel says how
            messages.append((self.connections.index(handle), kind, value))  # type: ignore[arg-type]
        return messages

    def remove(self, index: int) -> None:
        self.live.discard(index)
        process = self.processes[index]
        if process.is_alive():
            process.kill()
        process.join()

    def shutdown(self) -> None:
        """Tell every replica to stop (None), and kill those that do not within SHUTDOWN_TIMEOUT_S."""
        atexit.unregister(self.shutdown)
        stop_children(self.connections, self.processes, lambda connection: connection.send(None))
        self.connections, self.processes = [], []


class DataParallelEngine:
    """`data_parallel_size` LLMEngine replicas (processes, or Ray actors under the ray backend), driven as one."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = resolve_model_path(config.model)
        model_config = load_model_config(path)
        self.tokenizer = Tokenizer.from_model_path(path, model_config.eos_token_ids)
        self.grammars = GrammarBackend(self.tokenizer, model_config.vocab_size)
        self.heap = HeapTrimmer()
        self.failure: str | None = None
        num_replicas = config.data_parallel_size
        # Per replica and kind of message: a step's outputs may arrive before the answer to an add.
        self.inboxes: list[defaultdict[str, deque[Any]]] = [defaultdict(deque) for _ in range(num_replicas)]
        self.placement: dict[str, int] = {}  # request id → replica, while in flight
        self.loads = [0] * num_replicas
        self.live = set(range(num_replicas))
        self.lost: dict[str, str] = {}  # requests of replicas that died, not yet reported by `step`: why
        cpu_kernels_available()  # built here once, rather than by every replica
        self.links: ReplicaLinks = _start_replicas(config)
        try:
            self.replicas: list[ReplicaInfo] = [
                self._receive(index, "ready", STARTUP_TIMEOUT_S) for index in range(num_replicas)
            ]
        except BaseException:
            self.shutdown()
            raise
        self.replica_stats = [_no_stats() for _ in range(num_replicas)]
        policy = (
            RoutingPolicy(config.prefix_affinity_min_tokens, config.prefix_affinity_max_load_gap)
            if config.enable_prefix_caching
            else None
        )
        # A replica's cache holds at most its num_blocks blocks: so does the record of what it was sent.
        self.router = PrefixAffinityRouter(num_replicas, config.block_size, self.num_blocks, policy)

    @property
    def model_name(self) -> str:
        return self.replicas[0].model_name

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def num_blocks(self) -> int:
        """Blocks of one replica's KV cache: the most one request can hold."""
        return self.replicas[0].num_blocks

    @property
    def weight_bytes(self) -> int:
        return sum(replica.weight_bytes for replica in self.replicas)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(replica.kv_cache_bytes for replica in self.replicas)

    @property
    def file_weight_bytes(self) -> int:
        return self.replicas[0].file_weight_bytes

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        keep_kv: bool = False,
    ) -> None:
        """Queue a request on the replica the router chooses; raises what that replica's engine raises."""
        if keep_kv:
            raise InvalidArgumentError("keep_kv needs one engine (data_parallel_size=1)", "keep_kv")
        if request_id in self.placement:
            raise InvalidArgumentError(f"request id {request_id!r} is already in use", "request_id")
        hashes = self._block_hashes(prompt)
        answer = None
        while answer is None:  # a replica that dies before it answers leaves the request to another
            index = self.router.choose(hashes, self.loads)
            self._send(index, ("add", request_id, prompt, params, arrival_time))
            answer = self._receive(index, "added", None)
        added_id, error = answer
        assert added_id == request_id
        if error is not None:
            raise error
        self.router.record(index, hashes)
        self.placement[request_id] = index
        self.loads[index] += 1

    def _block_hashes(self, prompt: str | list[int]) -> list[int]:
        """The prompt's full blocks as the router knows them (none where it routes by load alone)."""
        if self.router.policy is None:
            return []
        # The replica tokenizes a text prompt again: it is sent as text, which its outputs echo.
        return self.router.block_hashes(self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)

    def abort_request(self, request_id: str) -> None:
        self.lost.pop(request_id, None)
        index = self.placement.pop(request_id, None)
        if index is not None:
            self.loads[index] -= 1
            self._send(index, ("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.placement or self.lost)

    def step(self) -> list[RequestOutput]:
        """The outputs of the next step any replica finishes (waiting for one), those of requests still placed;
        ReplicaLostError naming the requests of a replica that died meanwhile."""
        if self.failure is not None:
            raise WorkerError(self.failure)
        index = self._first_ready() if self.placement else None
        if self.lost:
            lost, self.lost = self.lost, {}
            reasons = "; ".join(sorted(set(lost.values())))
            raise ReplicaLostError(f"the engine replica serving the request died ({reasons})", list(lost))
        if index is None:
            return []
        outputs, self.replica_stats[index] = self._receive(index, "outputs", None)
        current = [output for output in outputs if output.request_id in self.placement]
        for output in current:
            if output.finished:
                self.loads[self.placement.pop(output.request_id)] -= 1
        return current

    def stats(self) -> EngineStats:
        """Every replica's counters summed (as of its last step), KV-cache usage averaged, and each replica's
        prefix-cache counters."""
        total = {
            f.name: sum(getattr(s, f.name) for s in self.replica_stats)
            for f in fields(EngineStats)
            if f.name not in ("kv_cache_usage", "spec_decode", "replica_prefix_caches")
        }
        spec = SpecDecodeStats(
            **{f.name: sum(getattr(s.spec_decode, f.name) for s in self.replica_stats) for f in fields(SpecDecodeStats)}
        )
        usage = sum(s.kv_cache_usage for s in self.replica_stats) / len(self.replica_stats)
        caches = tuple(
            PrefixCacheStats(s.prefix_cache_queried_tokens, s.prefix_cache_hit_tokens) for s in self.replica_stats
        )
        return EngineStats(**total, kv_cache_usage=usage, spec_decode=spec, replica_prefix_caches=caches)

    def shutdown(self) -> None:
        """Stop every replica."""
        self.links.shutdown()

    def _send(self, index: int, command: tuple[Any, ...]) -> None:
        if self.failure is not None:
            raise WorkerError(self.failure)
        try:
            self.links.send(index, command)
        except ReplicaLost as lost:
            self._drop(lost)

    def _receive(self, index: int, kind: str, timeout_s: float | None) -> Any:
        """Replica `index`'s next message of `kind`; None once that replica is gone."""
        while not self.inboxes[index][kind]:
            if index not in self.live:
                return None
            self._wait(timeout_s)
        return self.inboxes[index][kind].popleft()

    def _first_ready(self) -> int | None:
        """The first replica with requests placed and a step's outputs waiting (waiting for one); None once a
        replica has died meanwhile."""
        while not self.lost:
            ready = [index for index, load in enumerate(self.loads) if load and self.inboxes[index]["outputs"]]
            if ready:
                return ready[0]
            self._wait(None)
        return None

    def _wait(self, timeout_s: float | None) -> None:
        """Move every message that has arrived to its replica's inbox, and take out a replica that died; WorkerError
        once the last one dies or any fails a step."""
        try:
            messages = self.links.receive(timeout_s)
        except ReplicaLost as lost:
            self._drop(lost)
            return
        for index, kind, value in messages:
            if kind == "error":
                self._fail(value)
            self.inboxes[index][kind].append(value)

    def _drop(self, lost: ReplicaLost) -> None:
        """Take a dead replica out of the router; its requests become `lost`, to fail at the next step. Where none
        would be left (or none answered in time), fail the engine."""
        index = lost.index
        if index is None or self.live == {index}:
            self._fail(str(lost))
        logger.error("%s; its %d request(s) fail, the other replicas go on", lost, self.loads[index])
        self.live.discard(index)
        self.router.remove(index)
        self.links.remove(index)
        self.inboxes[index].clear()
        self.loads[index] = 0
        for request_id, placed in list(self.placement.items()):
            if placed == index:
                del self.placement[request_id]
                self.lost[request_id] = str(lost)

    def _fail(self, reason: str | PagedLLMError) -> NoReturn:
        fail(self, reason, "an engine replica")


def _no_stats() -> EngineStats:
    return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)


def _start_replicas(config: EngineConfig) -> ReplicaLinks:
    if config.executor_backend == "ray":
        from pagedllm.engine.ray_replicas import RayReplicas

        return RayReplicas(config)
    return ProcessReplicas(config)


def create_engine(config: EngineConfig) -> LLMEngine | DataParallelEngine:
    """One engine, or with data_parallel_size > 1 that many replicas driven as one."""
    return DataParallelEngine(config) if config.data_parallel_size > 1 else LLMEngine(config)
