"""The engine behind an event loop: one thread runs the step loop, coroutines submit requests and await outputs.

The LLMEngine is not thread-safe, so only the engine thread touches it. Coroutines hand it commands (add,
abort, stop) through a thread-safe queue, applied between steps; the thread hands outputs back with
`loop.call_soon_threadsafe`. Outputs are cumulative, so each request keeps only its latest one: a slow reader
gets bigger deltas and never holds up the batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pagedllm.engine.engine import EngineStats, LLMEngine
from pagedllm.engine.output import RequestOutput
from pagedllm.errors import (
    EngineOverloadedError,
    EngineStepError,
    EngineUnavailableError,
    InvalidArgumentError,
    PagedLLMError,
    ReplicaLostError,
)
from pagedllm.model.tokenizer import Tokenizer
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OutputObserver(Protocol):
    """Told about every step's outputs and every abort, on the engine thread (metrics)."""

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...

    def on_abort(self, request_id: str) -> None: ...


class RequestStream:
    """The outputs of one request as they reach the event loop; iterate it until the request finishes."""

    def __init__(self, request_id: str, num_sequences: int = 1) -> None:
        self.request_id = request_id
        self.num_sequences = num_sequences
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = False
        self.queued = True  # its sequences count against max_queued_sequences until its first output
        self._latest: RequestOutput | None = None
        self._error: PagedLLMError | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self._latest = output
        self._ready.set()

    def fail(self, error: PagedLLMError) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # retrieved here: nobody may be awaiting a cancelled submission
        self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The newest output not seen yet; raises the error that ended the request."""
        await self._ready.wait()
        self._ready.clear()
        if self._latest is not None and self._latest.finished:
            self.finished = True
            return self._latest
        if self._error is not None:
            self.finished = True
            raise self._error
        assert self._latest is not None
        return self._latest

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    stream: RequestStream


@dataclass(frozen=True)
class _Abort:
    request_id: str


class _Stop:
    """Ends the step loop."""


class AsyncLLMEngine:
    """Runs an LLMEngine's step loop in one background thread and serves it to asyncio coroutines."""

    def __init__(
        self, engine: LLMEngine, max_queued_sequences: int = 256, observer: OutputObserver | None = None
    ) -> None:
        self.engine = engine
        self.max_queued_sequences = max_queued_sequences
        self.num_rejected = 0  # requests refused because the queue was full; event loop only
        self.observer = observer
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._stats = engine.stats()
        self._num_queued = 0  # event loop only
        self._accepting = False
        self._lifecycle = threading.Lock()  # orders "still accepting? then queue it" against the loop's end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) one request may have: the context window or the whole KV cache."""
        return min(self.engine.max_model_len, self.engine.num_blocks * self.engine.config.block_size)

    @property
    def is_running(self) -> bool:
        return self._accepting and self._thread.is_alive()

    @property
    def num_queued(self) -> int:
        """Sequences of accepted requests still waiting for their first output."""
        return self._num_queued

    def check_room(self, num_sequences: int) -> None:
        """Raise unless `num_sequences` more fit the queue now: 400 if they never can, 503 if not yet."""
        if num_sequences > self.max_queued_sequences:
            raise InvalidArgumentError(
                f"the request asks for {num_sequences} sequences, more than the server ever queues "
                f"(max_queued_sequences={self.max_queued_sequences})",
                "n",
            )
        if self._num_queued + num_sequences > self.max_queued_sequences:
            self.num_rejected += 1
            raise EngineOverloadedError(
                f"the server has {self._num_queued} sequences waiting (max_queued_sequences="
                f"{self.max_queued_sequences}); retry in a moment"
            )

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step."""
        return self._stats

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will await the outputs."""
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread.start()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, fail what is still in flight, and stop the thread."""
        with self._lifecycle:
            self._accepting = False
        if self._thread.is_alive():
            self._commands.put(_Stop())
            await asyncio.to_thread(self._thread.join, timeout_s)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.0f s", timeout_s)
                return
        self.engine.shutdown()

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Submit a request and wait until the engine has taken it; raises the engine's error if it refuses."""
        num_sequences = params.beam_width if params.use_beam_search and params.beam_width else params.num_samples
        self.check_room(num_sequences)
        stream = RequestStream(request_id, num_sequences)
        with self._lifecycle:
            if not self._accepting:
                raise EngineUnavailableError("the engine is not running (shutting down or stopped)")
            self._commands.put(_Add(request_id, prompt, params, time.monotonic(), stream))
        self._num_queued += num_sequences
        try:
            await asyncio.shield(stream.accepted)
        except asyncio.CancelledError:
            self.release(stream)
            raise
        return stream

    def release(self, stream: RequestStream) -> None:
        """The caller is done with `stream`: abort the request if it has not finished (frees its blocks)."""
        self._dequeue(stream)
        if not stream.finished:
            stream.finished = True
            self._commands.put(_Abort(stream.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs; closing the iterator early aborts the request."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            self.release(stream)

    def _dequeue(self, stream: RequestStream) -> None:
        if stream.queued:
            stream.queued = False
            self._num_queued -= stream.num_sequences

    # Event-loop side of the hand-over.

    def _deliver(self, batch: list[tuple[RequestStream, RequestOutput]]) -> None:
        for stream, output in batch:
            self._dequeue(stream)
            stream.put(output)

    def _accept(self, stream: RequestStream) -> None:
        if not stream.accepted.done():
            stream.accepted.set_result(None)

    def _fail(self, stream: RequestStream, error: PagedLLMError) -> None:
        self._dequeue(stream)
        stream.fail(error)

    def _notify(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            logger.debug("event loop closed; dropped a hand-over")

    # Engine thread.

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
                    if not self.engine.has_unfinished_requests():
                        self.engine.heap.release()  # idle now: the steps' freed activations go back to the OS
                self._stats = self.engine.stats()
        except Exception:
            logger.exception("the engine loop died")
        finally:
            with self._lifecycle:
                self._accepting = False
            stopped = EngineUnavailableError("the engine stopped before the request finished")
            self._fail_unapplied(stopped)
            self._fail_all(stopped)

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one if `block`); False once told to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._abort(command.request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except EngineUnavailableError as error:  # e.g. a replica died: no later request can run
            self._stop_running(error)
            self._notify(self._fail, command.stream, error)
            raise
        except PagedLLMError as error:
            self._notify(self._fail, command.stream, error)
            return
        except Exception as error:
            logger.exception("add_request failed for %s", command.request_id)
            self._notify(
                self._fail, command.stream, EngineStepError(f"could not add the request: {type(error).__name__}")
            )
            return
        self._streams[command.request_id] = command.stream
        self._notify(self._accept, command.stream)

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        if self._streams.pop(request_id, None) is not None and self.observer is not None:
            self._observe(self.observer.on_abort, request_id)

    def _observe(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("the output observer failed")

    def _stop_running(self, error: EngineUnavailableError) -> None:
        """The engine cannot run any more: stop accepting, then fail every request in flight with `error`."""
        logger.error("the engine cannot run any more: %s", error.message)
        with self._lifecycle:
            self._accepting = False  # before any waiter hears of it: /health answers 503 by then
        self._fail_all(error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except ReplicaLostError as error:  # one data-parallel replica died: its requests fail, the others go on
            self._fail_requests(error.request_ids, error)
            return
        except EngineUnavailableError as error:  # e.g. a model worker died: no later step can run
            self._stop_running(error)
            raise
        except Exception as error:
            logger.exception("engine step failed; dropping the %d requests in flight", len(self._streams))
            self._fail_all(
                EngineStepError(f"the engine failed while generating ({type(error).__name__}); request dropped")
            )
            return
        if self.observer is not None:
            self._observe(self.observer.on_outputs, outputs, time.monotonic())
        batch: list[tuple[RequestStream, RequestOutput]] = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            batch.append((stream, output))
        if batch:
            self._notify(self._deliver, batch)

    def _fail_requests(self, request_ids: list[str], error: PagedLLMError) -> None:
        """Tell the waiters of requests the engine has already dropped why."""
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._notify(self._fail, stream, error)

    def _fail_all(self, error: PagedLLMError) -> None:
        """Abort every request in flight and tell its waiter why."""
        for request_id, stream in list(self._streams.items()):
            try:
                self._abort(request_id)
            except Exception:
                logger.exception("could not abort %s", request_id)
            self._notify(self._fail, stream, error)
        self._streams.clear()

    def _fail_unapplied(self, error: PagedLLMError) -> None:
        """Refuse the requests still queued when the loop ends."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._notify(self._fail, command.stream, error)
