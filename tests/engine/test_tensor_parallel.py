"""Tensor parallelism through the engine: worker processes over shared memory against one process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import gguf
import numpy as np
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import first_exchange, iter_json_array_records, sharegpt_path
from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.distributed.group import ParallelGroup
from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.engine.distributed_runner import distributed_bytes_per_block, kv_heads_on_all_ranks
from pagedllm.engine.executor import WorkerError, current_cpu, send_orders
from pagedllm.engine.worker import load_model, rank_cores, usable_cores
from pagedllm.errors import ConfigError, EngineUnavailableError
from pagedllm.model import loader
from pagedllm.serving.logprobs import TokenStrings
from tests.engine.dead_rank import DEAD_WORKER_DEADLINE_S, check_server_answers_then_503_after
from tests.engine.served import served_greedy
from tests.logprobs_close import assert_greedy_close, assert_served_greedy_close, greedy
from tests.model.test_gemma3 import write_tiny_gemma3
from tests.model.test_gguf_native_loading import LAYER_TYPES, Q, write_mixed_gguf

TINY_KV_BYTES = 2**24
GEMMA3_WINDOW = 16  # the tiny Gemma 3's local layers see less than the longest prompts
EMBEDDED_KV_BYTES = 2**26
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


def sharegpt_prompts(count: int) -> list[str]:
    """The first `count` ShareGPT conversations' opening prompts of at most 500 characters."""
    with sharegpt_path() as path:
        pairs = (first_exchange(record.get("conversations") or []) for record in iter_json_array_records(path))
        return list(islice((pair[0] for pair in pairs if pair is not None and len(pair[0]) <= 500), count))


@pytest.fixture
def tiny_tp2(tiny_llama_dir: Path) -> Iterator[LLM]:
    """The tiny random Llama (GQA) on 2 worker processes."""
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES, tensor_parallel_size=2
    )
    yield llm
    llm.engine.shutdown()


def test_tp2_greedy_outputs_equal_one_process(tiny_tp2: LLM, tiny_llama_dir: Path) -> None:
    one = LLM(str(tiny_llama_dir), dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES)
    assert_greedy_close(greedy(one, PROMPTS, 24), greedy(tiny_tp2, PROMPTS, 24))
    assert tiny_tp2.engine.weight_bytes > 0
    assert tiny_tp2.engine.num_blocks == one.engine.num_blocks  # each rank holds the same blocks of its own heads


def test_tp2_gemma3_greedy_outputs_equal_one_process(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Gemma 3's local and global layers (prompts past the window), QK-norms, post-norms of the ranks' sums and its
    one K/V head on both ranks; its lm_head's logits soft-capped after the vocabulary gather."""
    write_tiny_gemma3(tmp_path, tokenizer_dir, sliding_window=GEMMA3_WINDOW)
    settings = dict(dtype="float32", quantization="none", kv_cache_memory=TINY_KV_BYTES)
    one = LLM(str(tmp_path), **settings)
    tp2 = LLM(str(tmp_path), **settings, tensor_parallel_size=2)
    try:
        assert max(map(len, PROMPTS)) > GEMMA3_WINDOW
        assert_greedy_close(greedy(one, PROMPTS, 24), greedy(tp2, PROMPTS, 24))
    finally:
        tp2.engine.shutdown()
    with pytest.raises(ConfigError, match="pipeline parallelism runs Llama-family models"):
        load_model(EngineConfig(model=str(tmp_path), pipeline_parallel_size=2), 256)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reads_each_tensor_of_a_gguf_file_once(
    rank: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split of the MLP's channels comes from the down_projs' GGUF types and shapes, not from their data: each
    rank's load reads every tensor once (Q6_K and Q5_K down_projs: runs of 256 channels)."""
    path = tmp_path / "mixed.gguf"
    # Every o_proj in blocks of 32 values, which a split between heads keeps whole.
    write_mixed_gguf(path, (LAYER_TYPES[0], {**LAYER_TYPES[1], "attn_output": Q.Q8_0}))
    reads: list[str] = []
    read_tensor_data = loader.read_tensor_data

    def counted(tensor: gguf.ReaderTensor) -> np.ndarray:
        reads.append(tensor.name)
        return read_tensor_data(tensor)

    monkeypatch.setattr(loader, "read_tensor_data", counted)
    config = EngineConfig(model=str(path), tensor_parallel_size=2, distributed_executor_backend="mp")
    model = load_model(config, 256, ParallelGroup(rank, 2), rank).model
    assert [name for name, count in Counter(reads).items() if count > 1] == []
    assert "blk.0.ffn_down.weight" in reads
    assert model.layers[0].mlp.down_proj.columns == range(256 * rank, 256 * (rank + 1))


def test_kv_cache_counts_a_kv_head_once_on_every_rank_that_holds_it() -> None:
    """SmolLM2's 9 query heads over 3 K/V heads split 4 and 5: the middle K/V head is cached on both ranks, 4 heads
    in all; K/V heads that split evenly are cached once; an MQA model's one head on every rank."""
    smollm2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 8192, 1e-5, 1e5)
    assert kv_heads_on_all_ranks(smollm2, 1) == 3 and kv_heads_on_all_ranks(smollm2, 2) == 4
    assert kv_heads_on_all_ranks(smollm2, 3) == 3
    assert kv_heads_on_all_ranks(dataclasses.replace(smollm2, num_heads=32, num_kv_heads=8), 2) == 8
    assert kv_heads_on_all_ranks(dataclasses.replace(smollm2, num_heads=4, num_kv_heads=1), 2) == 2
    config = EngineConfig(tensor_parallel_size=2, block_size=16, dtype="float32")
    assert distributed_bytes_per_block(smollm2, config) == 2 * 30 * 16 * 4 * 64 * 4


def test_ranks_are_pinned_to_cores_of_their_own_only_where_every_rank_gets_its_threads() -> None:
    cores = [0, 1, 2, 3]
    assert [rank_cores(r, 2, 0, cores) for r in range(2)] == [[0, 1], [2, 3]]
    assert [rank_cores(r, 4, 1, cores) for r in range(4)] == [[0], [1], [2], [3]]
    assert rank_cores(0, 4, 2, cores) == [] and rank_cores(0, 1, 1, cores) == []


def test_the_driver_sends_a_step_last_to_the_ranks_on_its_own_core() -> None:
    """A rank woken on the driver's core takes it before the driver's next write (see send_orders)."""
    connections = ["rank 0", "rank 1", "rank 2"]
    orders = send_orders(connections, [[0], [1], [2, 3]], [0, 1, 2, 3, 4])  # type: ignore[arg-type]
    assert orders[0] == ["rank 1", "rank 2", "rank 0"]
    assert orders[1] == ["rank 0", "rank 2", "rank 1"]
    assert orders[2] == orders[3] == ["rank 0", "rank 1", "rank 2"]  # rank 2 is last anyway
    assert orders[4] == connections  # a core no rank is pinned to
    assert send_orders(connections, [[], [], []], [0])[0] == connections  # type: ignore[arg-type]


def test_the_driver_knows_the_core_it_runs_on() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity here")
    assert current_cpu() in usable_cores()


def test_a_killed_worker_fails_its_requests_within_seconds(tiny_tp2: LLM) -> None:
    engine = tiny_tp2.engine
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


def test_a_killed_worker_stops_the_async_engine(tiny_tp2: LLM) -> None:
    """Streams in flight get the error (503), the engine stops running (the server's /health then answers 503)."""

    async def scenario() -> None:
        engine = AsyncLLMEngine(tiny_tp2.engine)
        engine.start()
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        stream = await engine.add_request("a", PROMPTS[0], params)
        await stream.get()
        os.kill(tiny_tp2.engine.runner.executor.processes[0].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineUnavailableError, match="rank 0") as raised:
            async with asyncio.timeout(DEAD_WORKER_DEADLINE_S):
                while True:
                    await stream.get()
        assert raised.value.http_status == 503
        assert time.monotonic() - started < DEAD_WORKER_DEADLINE_S
        await asyncio.to_thread(engine._thread.join, DEAD_WORKER_DEADLINE_S)
        assert not engine.is_running
        with pytest.raises(EngineUnavailableError):
            await engine.add_request("b", PROMPTS[0], params)
        await engine.shutdown()

    asyncio.run(scenario())


def test_the_server_answers_as_the_engine_does_and_503_once_a_worker_dies(tiny_tp2: LLM) -> None:
    worker = tiny_tp2.engine.runner.executor.processes[1]
    check_server_answers_then_503_after(tiny_tp2, PROMPTS[1], lambda: os.kill(worker.pid, signal.SIGKILL))


def test_settings_tensor_parallelism_cannot_take_are_refused_by_name(tiny_llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match="distributed_executor_backend mp or ray"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, distributed_executor_backend="uni")


@pytest.fixture(scope="module")
def sharegpt_chats() -> list[str]:
    return sharegpt_prompts(8)


@pytest.mark.slow
@pytest.mark.parametrize(("tensor_parallel_size", "pipeline_parallel_size"), [(2, 1), (1, 2), (2, 2)])
def test_tp2_on_the_embedded_model_equals_one_process_on_sharegpt(
    llm: LLM, sharegpt_chats: list[str], tensor_parallel_size: int, pipeline_parallel_size: int
) -> None:
    """float32, quantization=none: the tied embedding split by vocabulary, heads split 1 and 2 K/V heads a rank;
    the 30 layers in 2 stages of 15."""
    tp2 = LLM(
        dtype="float32",
        quantization="none",
        kv_cache_memory=EMBEDDED_KV_BYTES,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
    )
    try:
        assert_greedy_close(greedy(llm, sharegpt_chats, 16), greedy(tp2, sharegpt_chats, 16))
    finally:
        tp2.engine.shutdown()


@pytest.mark.slow
def test_the_server_over_tp2_pp2_on_the_embedded_model_answers_sharegpt_as_one_process(
    llm: LLM, sharegpt_chats: list[str]
) -> None:
    """The 8 prompts sent at once to the server over 2 stages of 2 ranks, float32, quantization=none."""
    split = LLM(
        dtype="float32",
        quantization="none",
        kv_cache_memory=EMBEDDED_KV_BYTES,
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
    )
    served = served_greedy(split, sharegpt_chats, 16)  # the server shuts the ranks down as it stops
    assert_served_greedy_close(greedy(llm, sharegpt_chats, 16), served, TokenStrings(llm.engine.tokenizer))


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int4", "auto"])
def test_quantized_tp2_on_the_embedded_model_equals_one_process(quantization: str, sharegpt_chats: list[str]) -> None:
    """int4 sliced along whole groups; auto keeps the file's Q4_1 weights as int4 and its tied Q8_0 table as blocks,
    split by whole rows of blocks."""
    settings = {"dtype": "float32", "quantization": quantization, "kv_cache_memory": EMBEDDED_KV_BYTES}
    prompts = sharegpt_chats[:4]
    expected = greedy(LLM(**settings), prompts, 16)
    tp2 = LLM(**settings, tensor_parallel_size=2)
    try:
        assert_greedy_close(expected, greedy(tp2, prompts, 16))
    finally:
        tp2.engine.shutdown()
