"""AsyncLLMEngine against a fake engine: hand-over, errors, aborts, the queue bound and shutdown."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.errors import EngineOverloadedError, EngineStepError, EngineUnavailableError, InvalidArgumentError
from pagedllm.sampling_params import SamplingParams

from .fake_engine import BAD_PROMPT, BROKEN_PROMPT, GONE_PROMPT, FakeEngine

T = TypeVar("T")
DEADLINE_S = 10.0
ENDLESS = SamplingParams(max_tokens=10**9)


def run_with_engine(scenario: Callable[[AsyncLLMEngine, FakeEngine], Awaitable[T]], max_queued: int = 8) -> T:
    """Run `scenario` with a started engine over a fake, shutting it down after."""

    async def main() -> T:
        fake = FakeEngine()
        engine = AsyncLLMEngine(fake, max_queued_sequences=max_queued)  # type: ignore[arg-type]
        engine.start()
        try:
            return await asyncio.wait_for(scenario(engine, fake), DEADLINE_S)
        finally:
            fake.steps_allowed.set()
            await engine.shutdown()

    return asyncio.run(main())


async def wait_for_abort(fake: FakeEngine, request_id: str) -> None:
    await asyncio.to_thread(fake.abort_seen.wait, DEADLINE_S)
    assert request_id in fake.aborted


def test_generate_yields_cumulative_outputs_until_finished() -> None:
    async def scenario(engine: AsyncLLMEngine, fake: FakeEngine) -> list[list[int]]:
        return [out.outputs[0].token_ids async for out in engine.generate("hi", SamplingParams(max_tokens=4), "r1")]

    seen = run_with_engine(scenario)
    assert seen[-1] == [0, 1, 2, 3]
    assert all(earlier == later[: len(earlier)] for earlier, later in itertools.pairwise(seen))


def test_add_errors_reach_the_caller_and_the_loop_goes_on() -> None:
    async def scenario(engine: AsyncLLMEngine, fake: FakeEngine) -> str:
        with pytest.raises(InvalidArgumentError) as refused:
            await engine.add_request("bad", BAD_PROMPT, SamplingParams())
        assert refused.value.param == "prompt"
        with pytest.raises(EngineStepError):
            await engine.add_request("broken", BROKEN_PROMPT, SamplingParams())
        outputs = [out async for out in engine.generate("fine", SamplingParams(max_tokens=2), "ok")]
        assert engine.num_queued == 0
        return outputs[-1].outputs[0].finish_reason

    assert run_with_engine(scenario) == "length"


def test_an_engine_found_gone_while_adding_fails_what_is_in_flight_and_stops_running() -> None:
    async def scenario(engine: AsyncLLMEngine, fake: FakeEngine) -> None:
        stream = await engine.add_request("running", "x", ENDLESS)
        await stream.get()
        with pytest.raises(EngineUnavailableError, match="replica 1 is gone") as refused:
            await engine.add_request("late", GONE_PROMPT, SamplingParams())
        assert refused.value.http_status == 503
        assert not engine.is_running  # /health answers 503 from here on
        with pytest.raises(EngineUnavailableError, match="replica 1 is gone"):
            async for _ in stream:
                pass
        with pytest.raises(EngineUnavailableError):
            await engine.add_request("after", "x", SamplingParams())

    run_with_engine(scenario)


def test_a_failed_step_fails_the_requests_in_flight_and_the_engine_recovers() -> None:
    async def scenario(engine: AsyncLLMEngine, fake: FakeEngine) -> bool:
        stream = await engine.add_request("doomed", "x", ENDLESS)
        await stream.get()
        fake.fail_next_step = True
        with pytest.raises(EngineStepError) as failed:
            async for _ in stream:
                pass
        assert failed.value.http_status == 500
        assert "doomed" in fake.aborted
        outputs = [out async for out in engine.generate("after", SamplingParams(max_tokens=3), "next")]
        return outputs[-1].finished and engine.is_running

    assert run_with_engine(scenario)


def test_closing_the_iterator_aborts_the_request() -> None:
    async def scenario(engine: AsyncLLMEngine, fake: FakeEngine) -> None:
        outputs = engine.generate("x", ENDLESS, "left")
        for _ in range(3):
            await anext(outputs)
        await outputs.aclose()
        await wait_for_abort(fake, "left")
        assert not fake.requests

    run_with_engine(scenario)


def test_cancelling_the_consumer_aborts_the_request() -> None:
    async def scenario(engine: AsyncLLMEngine, fake: FakeEngine) -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate("x", ENDLESS, "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for_abort(fake, "cancelled")

    run_with_engine(scenario)


def test_a_full_queue_refuses_with_503_until_requests_start() -> None:
    async def scenario(engine: AsyncLLMEngine, fake: FakeEngine) -> None:
        fake.steps_allowed.clear()  # nothing gets a first token while the gate is shut
        first = asyncio.create_task(engine.add_request("a", "x", SamplingParams(max_tokens=2)))
        await asyncio.sleep(0)
        second = asyncio.create_task(engine.add_request("b", "x", SamplingParams(max_tokens=2)))
        await asyncio.sleep(0)
        assert engine.num_queued == 2
        with pytest.raises(EngineOverloadedError) as overloaded:
            await engine.add_request("c", "x", SamplingParams())
        assert overloaded.value.http_status == 503
        fake.steps_allowed.set()
        for task in (first, second):
            stream = await task
            async for _ in stream:
                pass
        assert engine.num_queued == 0
        async for _ in engine.generate("x", SamplingParams(max_tokens=1), "c"):
            pass

    run_with_engine(scenario, max_queued=2)


def test_shutdown_fails_what_is_in_flight_and_refuses_new_requests() -> None:
    async def main() -> None:
        fake = FakeEngine()
        engine = AsyncLLMEngine(fake, max_queued_sequences=4)  # type: ignore[arg-type]
        engine.start()
        stream = await engine.add_request("running", "x", ENDLESS)
        await stream.get()
        await engine.shutdown()
        with pytest.raises(EngineUnavailableError):
            async for _ in stream:
                pass
        assert "running" in fake.aborted
        with pytest.raises(EngineUnavailableError):
            await engine.add_request("late", "x", SamplingParams())
        assert not engine.is_running

    asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
