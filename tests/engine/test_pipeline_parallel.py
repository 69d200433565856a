"""Pipeline parallelism through the engine: the layers split into stages of worker processes, against one process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pagedllm import LLM
from pagedllm.distributed.pipeline import stage_layers
from tests.engine.dead_rank import check_server_answers_then_503_after
from tests.logprobs_close import assert_greedy_close, greedy

TINY_KV_BYTES = 2**24
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 3, list(range(900, 1200, 7))]


def test_stages_hold_consecutive_layers_that_cover_the_model_once() -> None:
    for num_layers in range(1, 12):
        for num_stages in range(1, num_layers + 1):
            stages = [stage_layers(num_layers, num_stages, s) for s in range(num_stages)]
            assert [layer for stage in stages for layer in stage] == list(range(num_layers))
            assert max(map(len, stages)) - min(map(len, stages)) <= 1


@pytest.mark.parametrize(("tensor_parallel_size", "pipeline_parallel_size"), [(1, 2), (2, 2)])
def test_pipeline_stages_equal_one_process(
    tiny_llama_dir: Path, tensor_parallel_size: int, pipeline_parallel_size: int
) -> None:
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    one = LLM(str(tiny_llama_dir), **settings)
    split = LLM(
        str(tiny_llama_dir),
        **settings,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
    )
    try:
        assert_greedy_close(greedy(one, PROMPTS, 24), greedy(split, PROMPTS, 24))
        assert split.engine.num_blocks == one.engine.num_blocks  # the stages' blocks together cost one model's
    finally:
        split.engine.shutdown()


def test_the_server_over_stages_answers_as_the_engine_does_and_503_once_the_last_stage_dies(
    tiny_llama_dir: Path,
) -> None:
    settings = {"dtype": "float32", "quantization": "none", "kv_cache_memory": TINY_KV_BYTES}
    split = LLM(str(tiny_llama_dir), **settings, pipeline_parallel_size=2)
    try:
        last_stage = split.engine.runner.executor.processes[1]
        check_server_answers_then_503_after(split, PROMPTS[1], lambda: os.kill(last_stage.pid, signal.SIGKILL))
    finally:
        split.engine.shutdown()
