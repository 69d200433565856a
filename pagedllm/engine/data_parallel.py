"""Data parallelism: engine replicas, each a process with its own model, scheduler and KV cache, behind the
engine's interface (add_request / step / abort_request), so the offline API and the async engine drive them as
they drive one engine. A request goes to the replica with the fewest requests in flight, and stays there.

A replica steps while it has requests and sends each step's outputs back; the driver's `step` returns what any
replica sent. A replica that dies or fails a step stops them all with WorkerError (503), as a dead rank does.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
from collections import defaultdict, deque
from dataclasses import dataclass, fields, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn

from pagedllm.config import EngineConfig
from pagedllm.engine.engine import EngineStats, LLMEngine
from pagedllm.engine.executor import STARTUP_TIMEOUT_S, WorkerError, fail, report_failure, stop_children
from pagedllm.engine.host_memory import HeapTrimmer
from pagedllm.engine.output import RequestOutput
from pagedllm.engine.worker import pin_rank_threads
from pagedllm.errors import InvalidArgumentError, PagedLLMError
from pagedllm.kernels import cpu_kernels_available
from pagedllm.model.loader import load_model_config
from pagedllm.model.registry import resolve_model_path
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.speculator import SpecDecodeStats
from pagedllm.structured_output.backend import GrammarBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica reports once its model is loaded."""

    model_name: str
    max_model_len: int
    num_blocks: int
    weight_bytes: int
    kv_cache_bytes: int
    file_weight_bytes: int


def _replica_main(index: int, num_replicas: int, config: EngineConfig, connection: Connection) -> None:
    """A replica process: load the engine, then apply the driver's commands between steps until told to stop (None)
    or until the driver is gone."""
    try:
        threads = pin_rank_threads(index, num_replicas, config.num_threads)
        engine = LLMEngine(replace(config, num_threads=threads))
        connection.send(
            (
                "ready",
                ReplicaInfo(
                    engine.model_name,
                    engine.max_model_len,
                    engine.num_blocks,
                    engine.weight_bytes,
                    engine.kv_cache_bytes,
                    engine.file_weight_bytes,
                ),
            )
        )
        while _apply_commands(engine, connection, block=not engine.has_unfinished_requests()):
            if engine.has_unfinished_requests():
                connection.send(("outputs", (engine.step(), engine.stats())))
    except EOFError:
        logger.info("replica %d: the driver is gone", index)
    except BaseException as error:
        report_failure(connection, f"replica {index}", error)


def _apply_commands(engine: LLMEngine, connection: Connection, block: bool) -> bool:
    """Apply the driver's queued commands (waiting for one if `block`); False once told to stop."""
    while block or connection.poll():
        command = connection.recv()
        if command is None:
            return False
        kind, request_id, *args = command
        if kind == "add":
            try:
                engine.add_request(request_id, *args)
                connection.send(("added", (request_id, None)))
            except PagedLLMError as error:
                connection.send(("added", (request_id, error)))
        else:
            engine.abort_request(request_id)
        block = False
    return True


class DataParallelEngine:
    """`data_parallel_size` LLMEngine replicas in processes of their own, driven as one engine."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = resolve_model_path(config.model)
        model_config = load_model_config(path)
        self.tokenizer = Tokenizer.from_model_path(path, model_config.eos_token_ids)
        self.grammars = GrammarBackend(self.tokenizer, model_config.vocab_size)
        self.heap = HeapTrimmer()
        self.failure: str | None = None
        num_replicas = config.data_parallel_size
        self.connections: list[Connection] = []
        self.processes: list[BaseProcess] = []
        # Per replica and kind of message: a step's outputs may arrive before the answer to an add.
        self.inboxes: list[defaultdict[str, deque[Any]]] = [defaultdict(deque) for _ in range(num_replicas)]
        self.placement: dict[str, int] = {}  # request id → replica, while in flight
        self.loads = [0] * num_replicas
        replica_config = replace(config, data_parallel_size=1)
        cpu_kernels_available()  # built here once, rather than by every replica
        context = multiprocessing.get_context("spawn")
        for index in range(num_replicas):
            driver_end, replica_end = context.Pipe()
            process = context.Process(
                target=_replica_main,
                args=(index, num_replicas, replica_config, replica_end),
                name=f"pagedllm-replica-{index}",
                daemon=True,
            )
            process.start()
            replica_end.close()
            self.connections.append(driver_end)
            self.processes.append(process)
        try:
            self.replicas: list[ReplicaInfo] = [
                self._receive(index, "ready", STARTUP_TIMEOUT_S) for index in range(num_replicas)
            ]
        except BaseException:
            self.shutdown()
            raise
        self.replica_stats = [_no_stats() for _ in range(num_replicas)]

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
        """Queue a request on the replica with the fewest in flight; raises what that replica's engine raises."""
        if keep_kv:
            raise InvalidArgumentError("keep_kv needs one engine (data_parallel_size=1)", "keep_kv")
        if request_id in self.placement:
            raise InvalidArgumentError(f"request id {request_id!r} is already in use", "request_id")
        index = min(range(len(self.loads)), key=self.loads.__getitem__)
        self._send(index, ("add", request_id, prompt, params, arrival_time))
        added_id, error = self._receive(index, "added", None)
        assert added_id == request_id
        if error is not None:
            raise error
        self.placement[request_id] = index
        self.loads[index] += 1

    def abort_request(self, request_id: str) -> None:
        index = self.placement.pop(request_id, None)
        if index is not None:
            self.loads[index] -= 1
            self._send(index, ("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.placement)

    def step(self) -> list[RequestOutput]:
        """The outputs of the next step any replica finishes (waiting for one), those of requests still placed."""
        if self.failure is not None:
            raise WorkerError(self.failure)
        if not self.placement:
            return []
        index = self._first_ready([index for index, load in enumerate(self.loads) if load])
        outputs, self.replica_stats[index] = self._receive(index, "outputs", None)
        current = [output for output in outputs if output.request_id in self.placement]
        for output in current:
            if output.finished:
                self.loads[self.placement.pop(output.request_id)] -= 1
        return current

    def stats(self) -> EngineStats:
        """Every replica's counters summed (as of its last step), KV-cache usage averaged."""
        total = {
            f.name: sum(getattr(s, f.name) for s in self.replica_stats)
            for f in fields(EngineStats)
            if f.name not in ("kv_cache_usage", "spec_decode")
        }
        spec = SpecDecodeStats(
            **{f.name: sum(getattr(s.spec_decode, f.name) for s in self.replica_stats) for f in fields(SpecDecodeStats)}
        )
        usage = sum(s.kv_cache_usage for s in self.replica_stats) / len(self.replica_stats)
        return EngineStats(**total, kv_cache_usage=usage, spec_decode=spec)

    def shutdown(self) -> None:
        """Tell every replica to stop (None), and kill those that do not within SHUTDOWN_TIMEOUT_S."""
        stop_children(self.connections, self.processes, lambda connection: connection.send(None))
        self.connections, self.processes = [], []

    def _send(self, index: int, command: tuple[Any, ...]) -> None:
        if self.failure is not None:
            raise WorkerError(self.failure)
        try:
            self.connections[index].send(command)
        except OSError as error:
            self._fail(f"could not reach replica {index} ({error})")

    def _receive(self, index: int, kind: str, timeout_s: float | None) -> Any:
        """Replica `index`'s next message of `kind`."""
        while not self.inboxes[index][kind]:
            self._wait(timeout_s)
        return self.inboxes[index][kind].popleft()

    def _first_ready(self, indices: list[int]) -> int:
        """The first of replicas `indices` with a step's outputs waiting (waiting for one)."""
        while not any(self.inboxes[index]["outputs"] for index in indices):
            self._wait(None)
        return next(index for index in indices if self.inboxes[index]["outputs"])

    def _wait(self, timeout_s: float | None) -> None:
        """Move every message that has arrived to its replica's inbox; WorkerError once a replica dies or fails."""
        sentinels = {process.sentinel: index for index, process in enumerate(self.processes)}
        ready = multiprocessing.connection.wait([*self.connections, *sentinels], timeout_s)
        if not ready:
            self._fail(f"no replica answered within {timeout_s:.0f} s")
        for handle in ready:
            if handle in sentinels:
                process = self.processes[sentinels[handle]]
                process.join()
                self._fail(f"replica {sentinels[handle]} (pid {process.pid}) exited with code {process.exitcode}")
            try:
                message_kind, value = handle.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):
                continue  # its process has exited: its sentinel says how
            if message_kind == "error":
                self._fail(value)
            self.inboxes[self.connections.index(handle)][message_kind].append(value)  # type: ignore[arg-type]

    def _fail(self, reason: str | PagedLLMError) -> NoReturn:
        fail(self, reason, "an engine replica")


def _no_stats() -> EngineStats:
    return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)


def create_engine(config: EngineConfig) -> LLMEngine | DataParallelEngine:
    """One engine, or with data_parallel_size > 1 that many replicas driven as one."""
    return DataParallelEngine(config) if config.data_parallel_size > 1 else LLMEngine(config)
