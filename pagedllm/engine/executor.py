"""Executors hand each step to the ranks that hold the model, in other processes.

With `mp`, every rank is a worker process of its own, joined to the others by torch.distributed; the driver (the
engine's process) keeps the scheduler, block manager and sampler, sends each step's StepInput to every rank (pickled
once; on several nodes to rank 0, which broadcasts it) and receives the logits from the ranks that `logits_ranks`
names (on one node every rank of the last stage sends its own slice of the vocabulary, which the driver joins,
rather than the ranks gathering them first). Steps may be submitted before earlier ones are collected (pipeline
micro-batches): every rank runs them in the order sent, so their logits come back in that order. A worker that dies,
or raises, fails the step at once with WorkerError: the driver waits on every worker's process sentinel beside rank
0's answer, and the other ranks, left waiting in a collective, see their peer gone and exit.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import pickle
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn, Protocol

import numpy as np
import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.process_group import destroy_distributed, free_port, init_distributed
from pagedllm.distributed.step_broadcast import StepBroadcast, share_from_rank0
from pagedllm.engine.model_runner import StepInput
from pagedllm.engine.worker import (
    Worker,
    logits_ranks,
    pin_rank_threads,
    rank_cores,
    tensor_parallel_group,
    usable_cores,
)
from pagedllm.errors import ConfigError, EngineUnavailableError, PagedLLMError
from pagedllm.kernels import cpu_kernels_available

logger = logging.getLogger(__name__)

# How long the driver waits for workers to load the model and join the process group.
STARTUP_TIMEOUT_S = 600.0
# How long shutdown waits for a worker to exit before it is killed.
SHUTDOWN_TIMEOUT_S = 5.0


class WorkerError(EngineUnavailableError):
    """A worker process died or failed; the engine cannot run steps any more."""


class Executor(Protocol):
    """Runs each step's forward on the ranks holding the model: `submit` hands a step to them without waiting,
    `collect` waits for the logits of the oldest step submitted and not yet collected."""

    failure: str | None  # why the ranks stopped, once one failed: every later step fails at once

    def submit(self, step: StepInput) -> None: ...

    def collect(self) -> torch.Tensor: ...

    def shutdown(self) -> None: ...


def fail(executor: Executor, reason: str | PagedLLMError, process: str = "a model worker") -> NoReturn:
    """Record why one of `executor`'s child processes failed, stop them all, and raise: a pagedllm error (a
    setting a child refused) as it is, anything else as WorkerError."""
    executor.failure = f"{process} failed: {reason}"
    logger.error("%s; stopping the others", executor.failure)
    executor.shutdown()
    if isinstance(reason, PagedLLMError):
        raise reason
    raise WorkerError(executor.failure)


def stop_children(
    connections: list[Connection], processes: list[BaseProcess], send_stop: Callable[[Connection], None]
) -> None:
    """Send each child its stop message, kill those that have not exited within SHUTDOWN_TIMEOUT_S, and close the
    connections (a child whose pipe is already gone is only waited for)."""
    for connection in connections:
        try:
            send_stop(connection)
        except OSError:
            pass
    for process in processes:
        process.join(SHUTDOWN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
    for connection in connections:
        connection.close()


def start_child(
    context: multiprocessing.context.BaseContext,
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
    daemon: bool = True,
) -> tuple[Connection, BaseProcess]:
    """Start a process running target(*args, its end of a pipe); the driver's end and the process. A daemon unless
    it starts processes of its own (a replica whose model runs in ranks), which a daemon may not."""
    driver_end, child_end = context.Pipe()
    process = context.Process(target=target, args=(*args, child_end), name=name, daemon=daemon)
    process.start()
    child_end.close()  # the child holds its own copy: EOF reaches the driver once the child exits
    return driver_end, process


def report_failure(connection: Connection, process: str, error: BaseException) -> None:
    """End a child process that failed: log it, send the driver the error, and exit 1. The driver raises a pagedllm
    error (a setting the child refused) as it is, any other as a WorkerError naming `process`."""
    logger.exception("%s failed", process)
    report = error if isinstance(error, PagedLLMError) else f"{process}: {type(error).__name__}: {error}"
    try:
        connection.send(("error", report))
    except OSError:
        pass  # the driver is gone
    raise SystemExit(1) from error


def _worker_main(
    rank: int,
    world_size: int,
    init_method: str,
    config: EngineConfig,
    num_blocks: int,
    max_model_len: int,
    connection: Connection,
) -> None:
    """A worker process: join the group, load this rank's shard, then run the steps the driver sends until told
    to stop (an empty message) or until the driver is gone. On several nodes only rank 0 hears from the driver and
    hands each step on; the ranks of the other nodes take the engine's settings from rank 0 first."""
    device = torch.device(config.device)
    group = ParallelGroup()
    try:
        init_distributed(rank, world_size, init_method, device)
        steps = StepBroadcast() if config.nnodes > 1 else None
        if steps is not None:
            config, num_blocks, max_model_len = share_from_rank0((config, num_blocks, max_model_len))
        ranks_per_node = world_size // config.nnodes
        pin_rank_threads(rank % ranks_per_node, ranks_per_node, config.num_threads)
        group = tensor_parallel_group(config, rank, device)
        worker = Worker(config, num_blocks, max_model_len, group, rank)
        if config.nnodes == 1:
            worker.hand_logit_slices()
        connection.send(("ready", (worker.weight_bytes, worker.file_weight_bytes)))
        answers = rank in logits_ranks(config)
        while payload := _next_step(rank, connection, steps):
            logits = worker.execute(pickle.loads(payload))
            if answers:
                send_logits(connection, logits)
    except EOFError:
        logger.info("rank %d: the driver is gone", rank)
    except BaseException as error:
        report_failure(connection, f"rank {rank}", error)
    finally:
        group.close()
        destroy_distributed()


def send_logits(connection: Connection, logits: torch.Tensor) -> None:
    """A ("logits", shape) message, then the float32 values as raw bytes (receive_logits reads them), which spares
    pickling a copy of them on either side."""
    values = logits.contiguous().numpy()
    connection.send(("logits", values.shape))
    if values.size:  # no bytes follow a step without logit rows (no view of zero values casts to bytes)
        connection.send_bytes(values)


def receive_logits(connection: Connection, shape: tuple[int, ...]) -> np.ndarray:
    """The values that follow a ("logits", shape) message from send_logits, in an array of their own."""
    values = np.empty(shape, dtype=np.float32)
    if values.size:
        connection.recv_bytes_into(values.reshape(-1))  # flat: the connection sizes its buffer by the first dimension
    return values


def _next_step(rank: int, connection: Connection, steps: StepBroadcast | None) -> bytes:
    """The next step's bytes: from the driver's pipe on one node; on several, rank 0 reads it and hands it on."""
    if steps is None:
        return connection.recv_bytes()
    if rank == 0:
        payload = connection.recv_bytes()
        steps.send(payload)
        return payload
    return steps.receive()


@functools.cache
def _sched_getcpu() -> Callable[[], int] | None:
    try:
        return ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return None


def current_cpu() -> int:
    """The core this thread runs on at the moment (it may move at any time); -1 where the C library cannot say."""
    getcpu = _sched_getcpu()
    return getcpu() if getcpu is not None else -1


def send_orders(
    connections: list[Connection], cores: list[list[int]], usable: list[int]
) -> dict[int, list[Connection]]:
    """For each core the driver may run on, the order to send a step to its ranks (`connections`, cores[i] the
    cores rank i is pinned to): the ranks pinned to that core last. A rank woken on the driver's core takes it at
    once and keeps it until its first collective, where it waits for every rank not yet sent the step; a rank woken
    on another core takes nothing from the driver."""

    def order(cpu: int) -> list[Connection]:
        return [connections[i] for i in sorted(range(len(connections)), key=lambda i: cpu in cores[i])]

    return {cpu: order(cpu) for cpu in usable}


def node_ranks(config: EngineConfig) -> range:
    """The ranks that run on this node: world_size / nnodes consecutive ones."""
    per_node = config.world_size // config.nnodes
    return range(config.node_rank * per_node, (config.node_rank + 1) * per_node)


def rendezvous_address(config: EngineConfig) -> str:
    """Where every rank meets: master_addr:master_port (a free port of this host where master_port is 0)."""
    return f"tcp://{config.master_addr}:{config.master_port or free_port(config.master_addr)}"


class MultiprocExecutor:
    """This node's ranks (every rank, on one node), each a worker process; on several nodes the others' ranks run
    under their `pagedllm serve --headless` and meet these at master_addr:master_port."""

    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int, world_size: int) -> None:
        cpu_kernels_available()  # built here once, rather than by every rank, each waiting on the build's lock
        context = multiprocessing.get_context("spawn")
        init_method = rendezvous_address(config)
        self.ranks = node_ranks(config)
        self.failure: str | None = None
        self.connections: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self.inboxes: list[deque[tuple[str, Any]]] = [deque() for _ in self.ranks]
        for rank in self.ranks:
            args = (rank, world_size, init_method, config, num_blocks, max_model_len)
            connection, process = start_child(context, _worker_main, args, f"pagedllm-rank-{rank}")
            self.connections.append(connection)
            self.processes.append(process)
        # On several nodes rank 0 hands every step on to the others.
        self.step_connections = self.connections if config.nnodes == 1 else self.connections[:1]
        usable = usable_cores()  # the ranks' affinity, inherited, which pin_rank_threads splits among them
        pinned = [rank_cores(i, len(self.ranks), config.num_threads, usable) for i in range(len(self.step_connections))]
        self.send_orders = send_orders(self.step_connections, pinned, usable)
        try:
            loaded = [self._receive(index, "ready", STARTUP_TIMEOUT_S) for index in range(len(self.ranks))]
        except BaseException:
            self.shutdown()
            raise
        self.weight_bytes = sum(weight_bytes for weight_bytes, _ in loaded)  # every rank's of this node
        self.file_weight_bytes = loaded[0][1]
        self.logits_indices = [rank - self.ranks.start for rank in logits_ranks(config)]

    def submit(self, step: StepInput) -> None:
        if self.failure is not None:
            raise WorkerError(self.failure)
        payload = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for connection in self.send_orders.get(current_cpu(), self.step_connections):
                connection.send_bytes(payload)
        except OSError as error:
            fail(self, f"could not send the step to a worker ({error})")

    def collect(self) -> torch.Tensor:
        if self.failure is not None:
            raise WorkerError(self.failure)
        slices = [self._receive(index, "logits", None) for index in self.logits_indices]
        return torch.from_numpy(slices[0] if len(slices) == 1 else np.concatenate(slices, axis=-1))

    def wait(self) -> int:
        """Wait until every rank of this node has exited (a headless node's ranks end when node 0's engine stops
        or fails); 0 where all ended cleanly."""
        for process in self.processes:
            process.join()
        return 0 if all(process.exitcode == 0 for process in self.processes) else 1

    def _receive(self, index: int, kind: str, timeout_s: float | None) -> Any:
        """The next message of this node's rank number `index`, which must be of `kind`; WorkerError as soon as any
        worker dies or reports an error. Other ranks' messages that arrive meanwhile wait in their inbox."""
        sentinels = {process.sentinel: i for i, process in enumerate(self.processes)}
        while not self.inboxes[index]:
            ready = multiprocessing.connection.wait([*self.connections, *sentinels], timeout_s)
            if not ready:
                fail(self, f"rank {self.ranks[index]} did not answer within {timeout_s:.0f} s")
            for handle in ready:
                if handle in sentinels:
                    i = sentinels[handle]
                    process = self.processes[i]
                    process.join()
                    fail(self, f"rank {self.ranks[i]} (pid {process.pid}) exited with code {process.exitcode}")
                try:
                    message_kind, value = handle.recv()
                    if message_kind == "logits":
                        value = receive_logits(handle, value)
                except (EOFError, OSError):
                    continue  # its process has exited: its sentinel says how
                if message_kind == "error":
                    fail(self, value)  # type: ignore[arg-type]
                self.inboxes[self.connections.index(handle)].append((message_kind, value))
        message_kind, value = self.inboxes[index].popleft()
        if message_kind != kind:
            fail(self, f"rank {self.ranks[index]} sent {message_kind!r} where {kind!r} was due")
        return value

    def shutdown(self) -> None:
        """Tell every worker to stop (an empty message), and kill those that do not within SHUTDOWN_TIMEOUT_S."""
        stop_children(self.connections, self.processes, lambda connection: connection.send_bytes(b""))
        self.connections, self.processes, self.step_connections, self.send_orders = [], [], [], {}


def run_headless(config: EngineConfig) -> int:
    """This node's ranks of an engine that spans `nnodes` machines, until node 0's engine stops them (0) or one
    fails (1); their settings and cache size come from rank 0."""
    if config.nnodes == 1 or config.node_rank == 0:
        raise ConfigError("--headless runs the ranks of a node other than node 0 (nnodes > 1, node_rank > 0)", "nnodes")
    executor = MultiprocExecutor(config, 0, 0, config.world_size)
    logger.info("node %d: ranks %s joined node 0's engine", config.node_rank, list(executor.ranks))
    return executor.wait()
