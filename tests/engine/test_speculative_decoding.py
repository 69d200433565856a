"""Speculative decoding through the engine: greedy outputs are the same tokens as without it (ShareGPT chat and
input-grounded prompts), with preemption from a tiny KV cache, with prefix caching, n > 1, stop strings and
logprobs; the counters move. The model runs dense in float32 like the session's reference `llm` (and drafts for
itself quantized to int4 under draft_model).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import load_sharegpt_pairs, sharegpt_path
from pagedllm.benchmarks.speculative import build_requests
from pagedllm.model.registry import DEFAULT_MODEL

MAX_TOKENS = 32
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "suffix": {"method": "suffix", "num_speculative_tokens": 6},
    # int4 self-speculation: the same file quantized drafts for its float32 self.
    "draft_model": {
        "method": "draft_model",
        "model": DEFAULT_MODEL,
        "quantization": "int4",
        "num_speculative_tokens": 4,
    },
}
# About 20 blocks of 16 tokens for the embedded model in float32: a few prompts at once must preempt.
TINY_KV_BYTES = 15 * 2**20


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Steps of a few rows gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def speculating_llm(method: str, **settings) -> LLM:
    return LLM(dtype="float32", quantization="none", speculative_config=METHODS[method], **settings)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    """Three ShareGPT questions and three ShareGPT answers handed back to be repeated or edited, chat-templated."""
    with sharegpt_path() as path:
        pairs = load_sharegpt_pairs(path)
    chat = build_requests(pairs, "chat", 3, llm.tokenizer, seed=3, max_reply_tokens=64)
    grounded = build_requests(pairs, "grounded", 3, llm.tokenizer, seed=3, max_reply_tokens=64)
    return [r.prompt_token_ids for r in chat + grounded]


@pytest.fixture(scope="module")
def expected(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy outputs without speculation."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return [output.outputs[0].token_ids for output in llm.generate(prompts, params)]


# The embedded model's cases take long: n-gram's first one stays in the default run, and the tiny model's server test
# (tests/serving/test_speculative_server.py) keeps every method in it, through preemption and the prefix cache.
SLOW_BUT_NGRAM = [m if m == "ngram" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


@pytest.mark.parametrize("method", SLOW_BUT_NGRAM)
def test_greedy_outputs_are_those_without_speculation(method: str, prompts, expected) -> None:
    llm = speculating_llm(method, kv_cache_memory=2**28)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    one_at_a_time = [llm.generate([prompt], params)[0].outputs[0].token_ids for prompt in prompts]
    assert one_at_a_time == expected
    stats = llm.engine.stats().spec_decode
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens >= stats.num_accepted_tokens
    # Again, all at once: the prefix cache now serves every prompt, and the shared suffix trie knows the outputs.
    hits_before = llm.engine.stats().prefix_cache_hit_tokens
    together = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
    assert together == expected
    assert llm.engine.stats().prefix_cache_hit_tokens > hits_before
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks - _cached_blocks(llm)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_outputs_survive_preemption(method: str, prompts, expected) -> None:
    # A draft model's K/V takes a block of its own for every block id: as many blocks take twice the bytes.
    llm = speculating_llm(method, kv_cache_memory=TINY_KV_BYTES * (2 if method == "draft_model" else 1))
    assert llm.engine.num_blocks * llm.engine.config.block_size < sum(len(p) + MAX_TOKENS for p in prompts) / 2
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outputs = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
    assert llm.engine.stats().num_preemptions > 0
    assert outputs == expected
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


def _cached_blocks(llm: LLM) -> int:
    """Blocks still referenced once every request is done: none (cached ones sit in the free list)."""
    return sum(1 for count in llm.engine.block_manager.allocator.ref_counts if count > 0)


@pytest.fixture(scope="module")
def ngram_llm() -> LLM:
    return speculating_llm("ngram", kv_cache_memory=2**28)


def test_stop_strings_and_logprobs_match_without_speculation(llm: LLM, ngram_llm: LLM, prompts) -> None:
    grounded = prompts[3:]
    reference = llm.generate(grounded, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    # A stop string from the middle of each expected text: it ends the output inside an accepted run of drafts.
    stops = [output.outputs[0].text[20:26] for output in reference]
    for prompt, stop in zip(grounded, stops):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop=[stop], logprobs=2)
        plain = llm.generate([prompt], params)[0].outputs[0]
        fast = ngram_llm.generate([prompt], params)[0].outputs[0]
        assert (fast.text, fast.token_ids, fast.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)
        assert len(fast.logprobs) == len(fast.token_ids)
        for got, want in zip(fast.logprobs, plain.logprobs):
            assert got.keys() == want.keys()
            assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)


def test_seeded_samples_are_those_without_speculation(llm: LLM, ngram_llm: LLM, prompts) -> None:
    # Verification draws each position's token with the noise the sampler would use there: same seed, same text.
    params = SamplingParams(n=3, max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=11)
    plain = [c.token_ids for c in llm.generate([prompts[3]], params)[0].outputs]
    fast = [c.token_ids for c in ngram_llm.generate([prompts[3]], params)[0].outputs]
    assert fast == plain
    assert len({tuple(tokens) for tokens in fast}) > 1


def test_min_tokens_and_penalties_apply_to_every_verified_position(llm: LLM, ngram_llm: LLM, prompts) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.3, min_tokens=MAX_TOKENS)
    plain = llm.generate(prompts[3:], params)
    fast = ngram_llm.generate(prompts[3:], params)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in plain]
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in fast)


def test_default_path_verifies_with_the_logits_of_one_row_decodes_to_the_bit(prompts) -> None:
    """The default dtype and quantization (bfloat16 and int4 where the CPU multiplies bfloat16) on two threads, where
    decode attention splits contexts over threads: every verified row's logits, hence its logprobs, are bit for bit
    those of the one-row decode without speculation."""
    previous = torch.get_num_threads()
    try:
        plain = LLM(num_threads=2, kv_cache_memory=2**26)
        fast = LLM(num_threads=2, kv_cache_memory=2**26, speculative_config=METHODS["ngram"])
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1)
        for prompt in prompts[3:]:
            want = plain.generate([prompt], params)[0].outputs[0]
            got = fast.generate([prompt], params)[0].outputs[0]
            assert (got.token_ids, got.logprobs) == (want.token_ids, want.logprobs)
        assert fast.engine.stats().spec_decode.num_accepted_tokens > 0
    finally:
        torch.set_num_threads(previous)
