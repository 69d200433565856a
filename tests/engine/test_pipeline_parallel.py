"""Pipeline parallelism through the engine: the layers split into stages of worker processes, against one process."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm import LLM
from pagedllm.distributed.pipeline import stage_layers
from pagedllm.serving.logprobs import TokenStrings
from tests.engine.dead_rank import check_server_answers_then_503_after
from tests.engine.served import served_greedy
from tests.logprobs_close import assert_greedy_close, assert_served_greedy_close, greedy

TINY_KV_BYTES = 2**24
SETTINGS = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


def test_stages_hold_consecutive_layers_that_cover_the_model_once() -> None:
    for num_layers in range(1, 12):
        for num_stages in range(1, num_layers + 1):
            stages = [stage_layers(num_layers, num_stages, s) for s in range(num_stages)]
            assert [layer for stage in stages for layer in stage] == list(range(num_layers))
            assert max(map(len, stages)) - min(map(len, stages)) <= 1


@pytest.fixture(scope="module")
def one(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), **SETTINGS)


@pytest.fixture(scope="module")
def tp2_pp2(tiny_llama_dir: Path) -> Iterator[LLM]:
    """The tiny Llama in 2 stages of 2 ranks: 4 worker processes."""
    split = LLM(str(tiny_llama_dir), **SETTINGS, tensor_parallel_size=2, pipeline_parallel_size=2)
    yield split
    split.engine.shutdown()


def test_pipeline_stages_equal_one_process(one: LLM, tiny_llama_dir: Path) -> None:
    split = LLM(str(tiny_llama_dir), **SETTINGS, pipeline_parallel_size=2)
    try:
        assert_greedy_close(greedy(one, PROMPTS, 24), greedy(split, PROMPTS, 24))
        assert split.engine.num_blocks == one.engine.num_blocks  # the stages' blocks together cost one model's
    finally:
        split.engine.shutdown()


def test_tensor_parallel_pipeline_stages_equal_one_process(one: LLM, tp2_pp2: LLM) -> None:
    assert_greedy_close(greedy(one, PROMPTS, 24), greedy(tp2_pp2, PROMPTS, 24))
    assert tp2_pp2.engine.num_blocks == one.engine.num_blocks


def test_the_server_over_tensor_parallel_stages_answers_concurrent_requests_as_one_process(
    one: LLM, tp2_pp2: LLM
) -> None:
    strings = TokenStrings(one.engine.tokenizer)
    assert_served_greedy_close(greedy(one, PROMPTS, 16), served_greedy(tp2_pp2, PROMPTS, 16), strings)


def test_the_server_over_stages_answers_as_the_engine_does_and_503_once_the_last_stage_dies(
    tiny_llama_dir: Path,
) -> None:
    split = LLM(str(tiny_llama_dir), **SETTINGS, pipeline_parallel_size=2)
    try:
        last_stage = split.engine.runner.executor.processes[1]
        check_server_answers_then_503_after(split, PROMPTS[1], lambda: os.kill(last_stage.pid, signal.SIGKILL))
    finally:
        split.engine.shutdown()
