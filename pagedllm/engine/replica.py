"""One data-parallel replica: an engine that applies the driver's commands between its steps and sends back what
each step produced, over a link of either kind (a process's pipe, a Ray actor's queues)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.executor import report_failure
from pagedllm.errors import PagedLLMError

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


class ReplicaConnection(Protocol):
    """The replica's end of its link to the driver: a multiprocessing Connection, or a Ray actor's queues."""

    def send(self, message: Any) -> None: ...

    def recv(self) -> Any: ...

    def poll(self) -> bool: ...


class ReplicaLost(Exception):
    """A replica's process or actor is gone (the message says which, and how): replica `index`, or None where no
    replica answered in time."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def replica_loop(index: int, config: EngineConfig, connection: ReplicaConnection) -> None:
    """A replica: load the engine, then apply the driver's commands between steps until told to stop (None) or
    until the driver is gone."""
    engine = None
    try:
        engine = LLMEngine(config)
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
    finally:
        if engine is not None:
            engine.shutdown()  # its ranks, where its model runs in any


def replica_config(config: EngineConfig) -> EngineConfig:
    """One replica's settings: one engine, its model in this replica's own process, or in ranks of its own that
    the replica starts as the driver's backend would (processes of its host under mp, actors of the cluster under
    ray)."""
    backend = config.distributed_executor_backend if config.world_size > 1 else None
    return replace(config, data_parallel_size=1, distributed_executor_backend=backend)


def _apply_commands(engine: LLMEngine, connection: ReplicaConnection, block: bool) -> bool:
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
