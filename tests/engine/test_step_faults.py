"""A step that raises (here injected through PAGEDLLM_INJECT_STEP_FAULTS) fails the requests in flight with a
clear error within seconds, frees their KV blocks, and the engine serves the next request as before."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pagedllm.config import EngineConfig
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.faults import ENV, InjectedFault, StepFaults
from pagedllm.errors import ConfigError, EngineStepError
from pagedllm.sampling_params import SamplingParams

DEADLINE_S = 10.0


def test_fault_steps_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "2, 3")
    faults = StepFaults.from_environment()
    faults.check()
    with pytest.raises(InjectedFault, match="step 2"):
        faults.check()
    monkeypatch.setenv(ENV, "two")
    with pytest.raises(ConfigError, match=ENV):
        StepFaults.from_environment()
    monkeypatch.delenv(ENV)
    assert StepFaults.from_environment().steps == frozenset()


def test_a_failed_step_fails_its_requests_frees_their_blocks_and_the_engine_serves_on(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "3")
    config = EngineConfig(model=str(tiny_llama_dir), kv_cache_memory=2**22, block_size=4, max_num_batched_tokens=64)
    engine = LLMEngine(config)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def main() -> tuple[list[BaseException | None], float, list[int]]:
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        try:
            # Submitted together, so the engine thread admits all four between the same two steps, before the fault.
            streams = await asyncio.gather(
                *(
                    async_engine.add_request(f"doomed-{i}", [1, 2, 3 + i], SamplingParams(max_tokens=50))
                    for i in range(4)
                )
            )
            started = time.monotonic()
            errors: list[BaseException | None] = []
            for stream in streams:
                try:
                    async for _ in stream:
                        pass
                    errors.append(None)
                except EngineStepError as error:
                    errors.append(error)
            waited = time.monotonic() - started
            after = [o async for o in async_engine.generate([5, 6, 7], greedy, "after")][-1].outputs[0].token_ids
            deadline = time.monotonic() + DEADLINE_S
            while (stats := async_engine.stats()).num_running and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the engine thread publishes its stats after the step that finished
            assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
            return errors, waited, after
        finally:
            await async_engine.shutdown()

    errors, waited, after = asyncio.run(asyncio.wait_for(main(), 4 * DEADLINE_S))
    assert all(isinstance(error, EngineStepError) for error in errors), errors
    assert "InjectedFault" in str(errors[0])
    assert waited < DEADLINE_S
    monkeypatch.delenv(ENV)
    fresh = LLMEngine(config)
    fresh.add_request("alone", [5, 6, 7], greedy)
    while fresh.has_unfinished_requests():
        outputs = fresh.step()
    assert after == outputs[0].outputs[0].token_ids
