"""Tensor parallelism through the engine: worker processes over gloo and shared memory against one process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from itertools import islice
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import first_exchange, iter_json_array_records, sharegpt_path
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.engine.executor import WorkerError
from pagedllm.engine.output import RequestOutput
from pagedllm.errors import EngineUnavailableError
from tests.conftest import ROOMY_KV_BYTES

NUM_LOGPROBS = 5
TINY_KV_BYTES = 2**24
DEAD_WORKER_DEADLINE_S = 10.0


def assert_greedy_close(expected: list[RequestOutput], actual: list[RequestOutput]) -> None:
    """vLLM's check_logprobs_close rule: greedy tokens equal until the first difference, where each side's token
    must be among the other's top logprobs (a near-tie the reduction order may flip); the rest is not compared."""
    for one, other in zip(expected, actual, strict=True):
        a, b = one.outputs[0], other.outputs[0]
        for position, (token_a, token_b) in enumerate(zip(a.token_ids, b.token_ids)):
            if token_a != token_b:
                assert token_a in b.logprobs[position] and token_b in a.logprobs[position], (one.prompt, position)
                break
        else:
            assert a.token_ids == b.token_ids


def _generate(llm: LLM, prompts: list[str] | list[list[int]], max_tokens: int) -> list[RequestOutput]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=NUM_LOGPROBS)
    return llm.generate(prompts, params)


@pytest.fixture(scope="module")
def tiny_tp2(tiny_llama_dir: Path):
    """The tiny random Llama (GQA) on 2 worker processes."""
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES, tensor_parallel_size=2
    )
    yield llm
    llm.engine.shutdown()


PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


def test_tp2_greedy_outputs_equal_one_process(tiny_tp2: LLM, tiny_llama_dir: Path) -> None:
    one = LLM(str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES)
    assert_greedy_close(_generate(one, PROMPTS, 24), _generate(tiny_tp2, PROMPTS, 24))
    assert tiny_tp2.engine.runner.executor.weight_bytes > 0


def test_a_killed_worker_fails_its_requests_within_seconds(tiny_llama_dir: Path) -> None:
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES, tensor_parallel_size=2
    )
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    workers = engine.runner.executor.processes
    os.kill(workers[1].pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) exited"):
        for _ in range(400):
            engine.step()
    assert time.monotonic() - started < DEAD_WORKER_DEADLINE_S
    assert not any(process.is_alive() for process in workers)  # rank 0 was stopped too
    with pytest.raises(WorkerError):  # and every later step fails at once
        engine.step()


def test_a_killed_worker_stops_the_async_engine(tiny_llama_dir: Path) -> None:
    """Streams in flight get the error, the engine stops running (the server's /health then answers 503)."""
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES, tensor_parallel_size=2
    )

    async def scenario() -> None:
        engine = AsyncLLMEngine(llm.engine)
        engine.start()
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        stream = await engine.add_request("a", PROMPTS[0], params)
        await stream.get()
        os.kill(llm.engine.runner.executor.processes[0].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineUnavailableError, match="rank 0"):
            async with asyncio.timeout(DEAD_WORKER_DEADLINE_S):
                while True:
                    await stream.get()
        assert time.monotonic() - started < DEAD_WORKER_DEADLINE_S
        await asyncio.to_thread(engine._thread.join, DEAD_WORKER_DEADLINE_S)
        assert not engine.is_running
        await engine.shutdown()

    asyncio.run(scenario())


def sharegpt_prompts(count: int) -> list[str]:
    """The first `count` ShareGPT conversations' opening prompts of at most 1,000 characters."""
    with sharegpt_path() as path:
        pairs = (first_exchange(record.get("conversations") or []) for record in iter_json_array_records(path))
        return list(islice((pair[0] for pair in pairs if pair is not None and len(pair[0]) <= 1000), count))


@pytest.mark.slow
def test_tp2_on_the_embedded_model_equals_one_process_on_sharegpt(llm: LLM) -> None:
    prompts = sharegpt_prompts(8)
    tp2 = LLM(dtype="float32", quantization="none", kv_cache_memory=ROOMY_KV_BYTES, tensor_parallel_size=2)
    try:
        assert_greedy_close(_generate(llm, prompts, 32), _generate(tp2, prompts, 32))
    finally:
        tp2.engine.shutdown()
