"""Executors hand each step to the ranks that hold the model, in other processes.

With `mp`, every rank is a worker process of its own, joined to the others by torch.distributed; the driver (the
engine's process) keeps the scheduler, block manager and sampler, sends each step's StepInput to every rank
(pickled once) and receives the logits from rank 0. A worker that dies, or raises, fails the step at once with
WorkerError: the driver waits on every worker's process sentinel beside rank 0's answer, and the other ranks,
left waiting in a collective, see their peer gone and exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import pickle
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.distributed.process_group import destroy_distributed, free_port, init_distributed
from pagedllm.engine.model_runner import StepInput
from pagedllm.engine.worker import Worker, pin_rank_threads
from pagedllm.errors import EngineUnavailableError, PagedLLMError
from pagedllm.kernels import cpu_kernels_available

logger = logging.getLogger(__name__)

# How long the driver waits for workers to load the model and join the process group.
STARTUP_TIMEOUT_S = 600.0
# How long shutdown waits for a worker to exit before it is killed.
SHUTDOWN_TIMEOUT_S = 5.0


class WorkerError(EngineUnavailableError):
    """A worker process died or failed; the engine cannot run steps any more."""


class Executor(Protocol):
    """Runs each step's forward on the ranks holding the model and returns rank 0's logits."""

    def execute_model(self, step: StepInput) -> torch.Tensor: ...

    def shutdown(self) -> None: ...


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
    to stop (an empty message) or until the driver is gone."""
    device = torch.device(config.device)
    group = ParallelGroup()
    try:
        pin_rank_threads(rank, world_size, config.num_threads)
        init_distributed(rank, world_size, init_method, device)
        group = ParallelGroup.create(device=device)
        worker = Worker(config, num_blocks, max_model_len, group)
        connection.send(("ready", (worker.weight_bytes, worker.file_weight_bytes)))
        while payload := connection.recv_bytes():
            logits = worker.execute(pickle.loads(payload))
            if rank == 0:
                connection.send(("logits", logits.numpy()))
    except EOFError:
        logger.info("rank %d: the driver is gone", rank)
    except BaseException as error:
        report_failure(connection, f"rank {rank}", error)
    finally:
        group.close()
        destroy_distributed()


class MultiprocExecutor:
    """`world_size` ranks, each a worker process of this host."""

    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int, world_size: int) -> None:
        cpu_kernels_available()  # built here once, rather than by every rank, each waiting on the build's lock
        context = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.failure: str | None = None
        self.connections: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self.inboxes: list[deque[tuple[str, Any]]] = [deque() for _ in range(world_size)]
        for rank in range(world_size):
            driver_end, worker_end = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(rank, world_size, init_method, config, num_blocks, max_model_len, worker_end),
                name=f"pagedllm-rank-{rank}",
                daemon=True,
            )
            process.start()
            worker_end.close()
            self.connections.append(driver_end)
            self.processes.append(process)
        try:
            loaded = [self._receive(rank, "ready", STARTUP_TIMEOUT_S) for rank in range(world_size)]
        except BaseException:
            self.shutdown()
            raise
        self.weight_bytes = sum(weight_bytes for weight_bytes, _ in loaded)  # every rank's
        self.file_weight_bytes = loaded[0][1]

    def execute_model(self, step: StepInput) -> torch.Tensor:
        if self.failure is not None:
            raise WorkerError(self.failure)
        payload = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for connection in self.connections:
                connection.send_bytes(payload)
        except OSError as error:
            self._fail(f"could not send the step to a worker ({error})")
        return torch.from_numpy(self._receive(0, "logits", None))

    def _receive(self, rank: int, kind: str, timeout_s: float | None) -> Any:
        """Rank `rank`'s next message, which must be of `kind`; WorkerError as soon as any worker dies or reports an
        error. Other ranks' messages that arrive meanwhile wait in their inbox."""
        sentinels = {process.sentinel: r for r, process in enumerate(self.processes)}
        while not self.inboxes[rank]:
            ready = multiprocessing.connection.wait([*self.connections, *sentinels], timeout_s)
            if not ready:
                self._fail(f"rank {rank} did not answer within {timeout_s:.0f} s")
            for handle in ready:
                if handle in sentinels:
                    process = self.processes[sentinels[handle]]
                    process.join()
                    self._fail(f"rank {sentinels[handle]} (pid {process.pid}) exited with code {process.exitcode}")
                try:
                    message_kind, value = handle.recv()
                except (EOFError, OSError):
                    continue  # its process has exited: its sentinel says how
                if message_kind == "error":
                    self._fail(value)  # type: ignore[arg-type]
                self.inboxes[self.connections.index(handle)].append((message_kind, value))
        message_kind, value = self.inboxes[rank].popleft()
        if message_kind != kind:
            self._fail(f"rank {rank} sent {message_kind!r} where {kind!r} was due")
        return value

    def _fail(self, reason: str | PagedLLMError) -> None:
        self.failure = f"a model worker failed: {reason}"
        logger.error("%s; stopping the others", self.failure)
        self.shutdown()
        if isinstance(reason, PagedLLMError):
            raise reason
        raise WorkerError(self.failure)

    def shutdown(self) -> None:
        """Tell every worker to stop, and kill those that do not within SHUTDOWN_TIMEOUT_S."""
        for connection in self.connections:
            try:
                connection.send_bytes(b"")
            except OSError:
                pass
        for process in self.processes:
            process.join(SHUTDOWN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self.connections:
            connection.close()
        self.connections, self.processes = [], []
