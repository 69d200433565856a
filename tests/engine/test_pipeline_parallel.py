"""Pipeline parallelism through the engine: the layers split into stages of worker processes, against one process."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.distributed.pipeline import stage_layers
from pagedllm.engine.engine import LLMEngine
from pagedllm.serving.logprobs import TokenStrings
from tests.engine.dead_rank import check_server_answers_then_503_after
from tests.engine.served import served_greedy
from tests.engine.test_tensor_parallel import sharegpt_prompts
from tests.logprobs_close import assert_greedy_close, assert_served_greedy_close, greedy

TINY_KV_BYTES = 2**24
# 16 blocks of 16 tokens for the tiny Llama: one ShareGPT prompt and its completion fit, several at once preempt.
PREEMPTING_KV_BYTES = 2**17
EMBEDDED_PREEMPTING_KV_BYTES = 15 * 2**20
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


class BatchesInFlight:
    """Counts the batches an engine submits while another of its batches is in flight."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.beside_another = 0
        self.submit = engine.runner.submit
        engine.runner.submit = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs):
        self.beside_another += bool(self.engine.batches)
        return self.submit(*args, **kwargs)


@pytest.fixture(scope="module")
def sharegpt_chats() -> list[str]:
    return sharegpt_prompts(8)


@pytest.fixture(scope="module")
def pp2_preempting(tiny_llama_dir: Path) -> Iterator[LLM]:
    """PP=2 with micro-batches over a cache too small for its prompts together, prefills in chunks of 64 tokens."""
    settings = {**SETTINGS, "kv_cache_memory": PREEMPTING_KV_BYTES, "max_num_batched_tokens": 64}
    split = LLM(str(tiny_llama_dir), **settings, pipeline_parallel_size=2)
    yield split
    split.engine.shutdown()


def test_micro_batches_on_sharegpt_equal_one_process_through_preemption_and_prefix_hits(
    one: LLM, pp2_preempting: LLM, sharegpt_chats: list[str]
) -> None:
    """Two batches in flight at a time, each of its share of the sequences; a prompt repeated hits the prefix
    cache."""
    engine = pp2_preempting.engine
    assert engine.max_concurrent_batches == 2
    spy = BatchesInFlight(engine)
    prompts = [*sharegpt_chats, sharegpt_chats[0]]
    assert_greedy_close(greedy(one, prompts, 24), greedy(pp2_preempting, prompts, 24))
    assert spy.beside_another > 0
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().prefix_cache_hit_tokens > 0
    assert not engine.batches and not engine.scheduler.in_flight and engine.block_manager.usage == 0


def test_micro_batches_keep_samples_stop_strings_and_aborts(one: LLM, pp2_preempting: LLM) -> None:
    """n=2 forked off the prompt, a stop string, and a request aborted while its batch is in flight."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    reference = one.generate(PROMPTS, params)
    stop = reference[1].outputs[0].text[4:9]
    varied = [
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, n=2),
        SamplingParams(**{"max_tokens": 16, "temperature": 0.0, "ignore_eos": True, "stop": [stop]}),
    ]
    expected = one.generate(PROMPTS[:2], varied)
    actual = pp2_preempting.generate(PROMPTS[:2], varied)
    assert [[c.text for c in r.outputs] for r in actual] == [[c.text for c in r.outputs] for r in expected]
    assert len(actual[0].outputs) == 2 and actual[1].outputs[0].finish_reason == "stop"

    engine = pp2_preempting.engine
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{index}", prompt, params)
    while not engine.scheduler.in_flight.intersection(engine.requests["abort-0"].sequences):
        engine.step()
    engine.abort_request("abort-0")
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id != "abort-0"
            if output.finished:
                finished[output.request_id] = output.outputs[0].text
    assert finished == {f"abort-{i}": reference[i].outputs[0].text for i in range(1, len(PROMPTS))}
    while engine.batches:  # the aborted request's batch, if still in flight, comes back and changes nothing
        engine.step()
    assert engine.block_manager.usage == 0


def test_speculation_and_beam_search_over_pipeline_stages_equal_one_process(one: LLM, tiny_llama_dir: Path) -> None:
    """ngram speculation runs one step at a time through the stages; beam search's requests take micro-batches."""
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    split = LLM(str(tiny_llama_dir), **SETTINGS, pipeline_parallel_size=2, speculative_config=ngram)
    try:
        assert split.engine.max_concurrent_batches == 1
        assert_greedy_close(greedy(one, PROMPTS, 24), greedy(split, PROMPTS, 24))
    finally:
        split.engine.shutdown()
    beams = SamplingParams(max_tokens=8, use_beam_search=True, beam_width=2, n=2, ignore_eos=True)
    split = LLM(str(tiny_llama_dir), **SETTINGS, pipeline_parallel_size=2)
    try:
        assert split.engine.max_concurrent_batches == 2
        expected, actual = one.generate(PROMPTS[:2], beams), split.generate(PROMPTS[:2], beams)
        assert [[c.token_ids for c in r.outputs] for r in actual] == [
            [c.token_ids for c in r.outputs] for r in expected
        ]
    finally:
        split.engine.shutdown()


@pytest.mark.slow
def test_micro_batches_on_the_embedded_model_equal_one_process_on_sharegpt_through_preemption(
    llm: LLM, sharegpt_chats: list[str]
) -> None:
    """float32, quantization=none, the 30 layers in 2 stages of 15; about 20 blocks of 16 tokens hold 2 or 3 of
    the 8 prompts at a time."""
    split = LLM(
        dtype="float32", quantization="none", kv_cache_memory=EMBEDDED_PREEMPTING_KV_BYTES, pipeline_parallel_size=2
    )
    try:
        spy = BatchesInFlight(split.engine)
        assert_greedy_close(greedy(llm, sharegpt_chats, 16), greedy(split, sharegpt_chats, 16))
        assert spy.beside_another > 0 and split.engine.scheduler.num_preemptions > 0
    finally:
        split.engine.shutdown()
