"""A graceful stop: on SIGTERM the server refuses new work and says so on /health, lets the requests in flight finish
for a while, then ends the rest with an error (streams get an error event and `data: [DONE]`) before it exits."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.errors import EngineUnavailableError
from pagedllm.serving.error_responses import exception_response

logger = logging.getLogger(__name__)

TRACKED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
POLL_S = 0.05
# Once the engine has failed what was left, the handlers need only write their last event.
FLUSH_TIMEOUT_S = 5.0


class Drain:
    """Counts the API requests in flight and runs the stop: refuse, wait, then end what is left."""

    def __init__(self, engine: AsyncLLMEngine, timeout_s: float) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.draining = False
        self.in_flight = 0

    async def run(self) -> None:
        """Refuse new requests, wait up to timeout_s for those in flight, then fail the rest and stop the engine."""
        self.draining = True
        logger.info("draining: %d requests in flight, up to %.0f s", self.in_flight, self.timeout_s)
        if not await self._wait_idle(self.timeout_s):
            logger.warning("%d requests still in flight after %.0f s; ending them", self.in_flight, self.timeout_s)
        await self.engine.shutdown()
        await self._wait_idle(FLUSH_TIMEOUT_S)

    async def _wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        return not self.in_flight


class DrainMiddleware:
    """Counts the API requests in flight for the drain, and refuses new ones with 503 once it has begun."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(TRACKED_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            response = exception_response(EngineUnavailableError("the server is shutting down"))
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """Uvicorn's server whose first SIGTERM or SIGINT drains before it exits; a second one exits at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self.drain.draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        logger.info("%s: draining before exit", signal.Signals(sig).name)
        self._captured_signals.append(sig)
        self.drain.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True
