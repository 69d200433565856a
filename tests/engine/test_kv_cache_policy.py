"""The streaming KV-cache policy end to end: bounded blocks past max_model_len, the positions it gives, and its
agreement with full attention, across attention paths, with a quantized cache and under preemption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pagedllm import SamplingParams
from pagedllm.errors import ConfigError, InvalidArgumentError
from tests.checkpoints import write_checkpoint
from tests.engine.eviction import (
    GREEDY,
    H2O,
    H2O_BOUND,
    MAX_MODEL_LEN,
    STREAMING,
    STREAMING_BOUND,
    random_tokens,
    streamed_logprobs,
    streaming_kept,
    tiny,
    tiny_with_blocks,
)

BOUND = STREAMING_BOUND


def test_sequence_runs_four_contexts_long_in_bounded_blocks_that_others_reuse(tiny_llama_dir: Path) -> None:
    # Room for the streaming sequence and one short request at a time: far less than 4 contexts' worth of blocks.
    num_blocks = BOUND + 4
    llm = tiny_with_blocks(tiny_llama_dir, num_blocks, **STREAMING)
    engine = llm.engine
    assert engine.num_blocks == num_blocks
    engine.add_request("long", random_tokens(10, 0), SamplingParams(max_tokens=4 * MAX_MODEL_LEN, **GREEDY))
    seq = engine.requests["long"].sequences[0]
    released_by_long: set[int] = set()
    reused = finished_short = 0
    step = 0
    while "long" in engine.requests:
        held = set(seq.block_ids)
        engine.step()
        step += 1
        assert len(seq.block_ids) <= BOUND
        released_by_long |= held - set(seq.block_ids)
        others = [s for s in engine.scheduler.running if s is not seq]
        reused += any(released_by_long & set(s.block_ids) for s in others)
        if step % 16 == 0 and not others and not engine.scheduler.waiting:
            engine.add_request(f"short{step}", random_tokens(6, step), SamplingParams(max_tokens=6, **GREEDY))
        finished_short += sum(1 for s in others if s.finish_reason is not None)
    assert seq.num_tokens == 10 + 4 * MAX_MODEL_LEN and seq.finish_reason == "length"
    assert engine.block_manager.allocator.peak_num_used <= num_blocks
    assert reused > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == num_blocks


def test_window_longer_than_the_sequence_equals_full_attention(tiny_llama_dir: Path) -> None:
    prompts = [random_tokens(20, 1), random_tokens(45, 2), random_tokens(7, 3)]
    params = SamplingParams(max_tokens=40, **GREEDY)
    full = tiny(tiny_llama_dir, max_num_batched_tokens=16).generate(prompts, params)
    streaming = tiny(tiny_llama_dir, kv_cache_policy="streaming", kv_window=256, max_num_batched_tokens=16).generate(
        prompts, params
    )
    for expected, got in zip(full, streaming, strict=True):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids


def kept_contexts(token_ids: list[int]) -> list[list[int]]:
    """For each position p, the tokens the streaming cache holds when p is the query."""
    return [[token_ids[i] for i in kept] for kept in streaming_kept(len(token_ids))]


def test_one_layer_stream_scores_each_token_as_a_fresh_forward_over_the_kept_tokens(one_layer_dir: Path) -> None:
    """With one layer a token's K/V depends on the token and its position alone: after any number of evictions,
    each query must see exactly the K/V a fresh forward over the sinks and the window gives, at their new positions."""
    token_ids = random_tokens(3 * MAX_MODEL_LEN, 4)
    streamed = streamed_logprobs(tiny(one_layer_dir, **STREAMING, max_num_batched_tokens=1), token_ids)
    contexts = kept_contexts(token_ids)[:-1]
    assert max(len(context) for context in contexts) < MAX_MODEL_LEN < len(token_ids)
    fresh = tiny(one_layer_dir).generate(
        [context + [token] for context, token in zip(contexts, token_ids[1:])],
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
    )
    expected = [output.prompt_logprobs[-1][token] for output, token in zip(fresh, token_ids[1:], strict=True)]
    assert streamed == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("max_num_batched_tokens", [1, 8])
def test_reference_and_fast_attention_agree_across_evictions(tiny_llama_dir: Path, max_num_batched_tokens: int) -> None:
    """One token per step takes the decode kernels (the fused decode among them), eight the prefill ones."""
    token_ids = random_tokens(3 * MAX_MODEL_LEN, 5)
    logprobs = {
        impl: streamed_logprobs(
            tiny(tiny_llama_dir, **STREAMING, attention_impl=impl, max_num_batched_tokens=max_num_batched_tokens),
            token_ids,
        )
        for impl in ("reference", "fast")
    }
    assert logprobs["fast"] == pytest.approx(logprobs["reference"], abs=1e-4)


@pytest.mark.parametrize("policy", [STREAMING, H2O], ids=["streaming", "h2o"])
def test_quantized_cache_runs_close_to_the_unquantized_one(tiny_llama_dir: Path, policy: dict[str, Any]) -> None:
    token_ids = random_tokens(3 * MAX_MODEL_LEN, 6)
    plain = streamed_logprobs(tiny(tiny_llama_dir, **policy, max_num_batched_tokens=1), token_ids)
    int8 = streamed_logprobs(tiny(tiny_llama_dir, **policy, max_num_batched_tokens=1, kv_cache_dtype="int8"), token_ids)
    assert max(abs(a - b) for a, b in zip(plain, int8, strict=True)) < 0.1


@pytest.mark.parametrize(
    ("policy", "bound"), [(STREAMING, STREAMING_BOUND), (H2O, H2O_BOUND)], ids=["streaming", "h2o"]
)
def test_preempted_sequences_are_recomputed_and_finish(
    tiny_llama_dir: Path, policy: dict[str, Any], bound: int
) -> None:
    """Recomputation prefills a preempted sequence's tokens again under the policy: it finishes, in bounded blocks."""
    llm = tiny_with_blocks(tiny_llama_dir, 2 * bound, **policy)
    params = SamplingParams(max_tokens=2 * MAX_MODEL_LEN, **GREEDY)
    outputs = llm.generate([random_tokens(10, seed) for seed in range(4)], params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert all(len(output.outputs[0].token_ids) == 2 * MAX_MODEL_LEN for output in outputs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_settings_it_does_not_compose_with_are_refused(
    tiny_llama_dir: Path, tmp_path: Path, tokenizer_dir: Path
) -> None:
    with pytest.raises(ConfigError, match="exceeds max_model_len"):
        tiny(tiny_llama_dir, **{**STREAMING, "kv_window": MAX_MODEL_LEN})
    write_checkpoint("mistral-mqa", tmp_path, tokenizer_dir)  # sliding-window layers
    with pytest.raises(ConfigError, match="every layer of this model has a sliding window"):
        tiny(tmp_path, **STREAMING)
    llm = tiny(tiny_llama_dir, **STREAMING)
    for params in (SamplingParams(n=2), SamplingParams(best_of=2), SamplingParams(use_beam_search=True, beam_width=2)):
        with pytest.raises(InvalidArgumentError, match="one sample"):
            llm.engine.add_request("shared", [1, 2, 3], params)
    with pytest.raises(InvalidArgumentError, match="one sample"):
        llm.engine.add_request("kept", [1, 2, 3], SamplingParams(), keep_kv=True)
