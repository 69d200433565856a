"""The engine end to end on the embedded model: admission, abort, seeds, n, prompt logprobs, chunked prefill."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.errors import InvalidArgumentError, RequestTooLongError

PROMPTS = ["Tell me a joke.", "Why is the sky blue?", "Count to five:", "The weather today is"]


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    """Tiny step budget and cache (12 float32 blocks): prompts are prefilled in chunks mixed with decodes, and
    preemption is common; the same weights and dtype as the session's `llm`, so their outputs compare exactly."""
    return LLM(
        dtype="float32", quantization="none", kv_cache_memory=12 * 737_280, max_num_batched_tokens=16, max_num_seqs=4
    )


def test_prompt_plus_max_tokens_over_context_is_rejected_with_numbers(llm: LLM) -> None:
    too_long = llm.engine.max_model_len
    with pytest.raises(RequestTooLongError, match=rf"context is {too_long} tokens.*prompt has 3"):
        llm.engine.add_request("long", [1, 2, 3], SamplingParams(max_tokens=too_long))
    assert not llm.engine.has_unfinished_requests()


def test_request_larger_than_the_whole_cache_is_rejected(small_llm: LLM) -> None:
    engine = small_llm.engine
    capacity = engine.num_blocks * engine.config.block_size
    needed = -(-(10 + capacity) // engine.config.block_size)
    with pytest.raises(
        RequestTooLongError, match=f"needs {needed} KV-cache blocks .* the cache has {engine.num_blocks}"
    ):
        small_llm.generate([[5] * 10], SamplingParams(max_tokens=capacity))


@pytest.mark.parametrize("prompt", [[], [-1], [10**9]])
def test_bad_prompt_ids_are_rejected(llm: LLM, prompt: list[int]) -> None:
    with pytest.raises(InvalidArgumentError):
        llm.engine.add_request("bad", prompt, SamplingParams())


def test_abort_frees_blocks_and_spares_the_others(small_llm: LLM) -> None:
    engine = small_llm.engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = {o.prompt: o.outputs[0].token_ids for o in small_llm.generate(PROMPTS, params)}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(6):
        engine.step()
    engine.abort_request("r1")
    assert all(seq.request.request_id != "r1" for seq in engine.scheduler.running + list(engine.scheduler.waiting))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(finished) == ["r0", "r2", "r3"]
    for output in finished.values():
        assert output.outputs[0].token_ids == expected[output.prompt]
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_chunked_prefill_with_preemption_matches_roomy_engine(llm: LLM, small_llm: LLM) -> None:
    prompts = [p * 3 for p in PROMPTS]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    before = small_llm.engine.scheduler.num_preemptions
    small = small_llm.generate(prompts, params)
    assert small_llm.engine.scheduler.num_preemptions > before
    roomy = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in small] == [o.outputs[0].token_ids for o in roomy]


def test_seeded_sampling_does_not_depend_on_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = llm.generate(["Write a story about a robot."], seeded)[0].outputs[0].text
    others = SamplingParams(max_tokens=30, temperature=1.0)
    crowded = llm.generate(["Write a story about a robot.", *PROMPTS], [seeded] + [others] * len(PROMPTS))
    assert crowded[0].outputs[0].text == alone
    different_seed = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=4321)
    assert llm.generate(["Write a story about a robot."], different_seed)[0].outputs[0].text != alone


def test_n_samples_share_the_prompt_and_match_separately_seeded_requests(llm: LLM) -> None:
    prompt = "Give me a name for a cat:"
    together = llm.generate([prompt], SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=7))[0]
    assert [c.index for c in together.outputs] == [0, 1, 2]
    separate = [
        llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=7 + i))[0].outputs[0].token_ids
        for i in range(3)
    ]
    assert [c.token_ids for c in together.outputs] == separate
    assert len({tuple(tokens) for tokens in separate}) > 1


def test_prompt_logprobs_match_transformers(small_llm: LLM, hf_model) -> None:
    prompt = "The quick brown fox jumps over the lazy dog, and then it runs into the forest."
    output = small_llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    token_ids = output.prompt_token_ids
    assert len(token_ids) > small_llm.engine.config.max_num_batched_tokens  # prefilled in several chunks
    with torch.inference_mode():
        reference = torch.log_softmax(hf_model(torch.tensor([token_ids])).logits[0].float(), dim=-1)
    assert output.prompt_logprobs[0] is None
    for position in range(1, len(token_ids)):
        entry = output.prompt_logprobs[position]
        target = token_ids[position]
        assert abs(entry[target] - reference[position - 1, target].item()) < 1e-3
        assert set(reference[position - 1].topk(2).indices.tolist()) <= set(entry)


def test_logprobs_are_reported_for_each_generated_token(llm: LLM) -> None:
    output = llm.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0].outputs[0]
    assert len(output.logprobs) == len(output.token_ids)
    for token, entry in zip(output.token_ids, output.logprobs):
        assert token in entry and len(entry) in (3, 4)
        assert entry[token] == max(entry.values())  # greedy draws the most likely token
    assert output.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(output.token_ids, output.logprobs)))


def test_load_reports_the_resident_memory_beside_the_weights_and_kv_cache(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pagedllm.engine.engine"):
        engine = LLM(kv_cache_memory=64 * 737_280).engine
    line = next(record.getMessage() for record in caplog.records if record.getMessage().startswith("resident memory"))
    resident_mib, ratio = (float(value) for value in re.findall(r"([\d.]+)(?: MiB,|x)", line))
    held = engine.weight_bytes + engine.kv_cache_bytes
    assert f"({engine.weight_bytes / 2**20:.1f} MiB)" in line and f"({engine.kv_cache_bytes / 2**20:.1f} MiB)" in line
    assert resident_mib * 2**20 > held  # the process holds its weights and pools, and the runtime besides
    assert ratio == pytest.approx(resident_mib * 2**20 / held, rel=0.01)
