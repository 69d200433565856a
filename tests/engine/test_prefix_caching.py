"""Automatic prefix caching: hits, chaining, eviction, collisions, and unchanged outputs under random traffic."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedllm import LLM, SamplingParams
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.prefix_cache import PrefixCache
from tests.reference import check_logprobs_close

BLOCK = 4


@dataclass
class FakeSeq:
    tokens: list[int]
    block_ids: list[int] = field(default_factory=list)
    group_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


def run_to_completion(bm: BlockManager, seq: FakeSeq) -> None:
    """Admit `seq` as the scheduler does and compute all its tokens."""
    prefix = bm.cached_prefix(seq)
    assert bm.can_admit(seq, prefix, seq.num_tokens - len(prefix) * BLOCK)
    bm.adopt_prefix(seq, prefix)
    bm.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)


def manager(num_blocks: int = 16) -> BlockManager:
    return BlockManager(num_blocks, BLOCK, PrefixCache(BLOCK, salt="test"))


def test_released_blocks_are_found_again_by_their_prefix() -> None:
    bm = manager()
    first = FakeSeq(list(range(14)))  # 3 full blocks and a partial one
    run_to_completion(bm, first)
    first_blocks = list(first.block_ids)
    bm.free(first)
    assert bm.num_free_blocks == 16
    second = FakeSeq(list(range(12)) + [99, 98, 97])
    assert bm.cached_prefix(second) == first_blocks[:3]
    run_to_completion(bm, second)
    assert second.block_ids[:3] == first_blocks[:3]
    assert all(bm.allocator.ref_counts[b] == 1 for b in second.block_ids)


def test_a_block_matches_only_after_the_same_prefix() -> None:
    bm = manager()
    run_to_completion(bm, FakeSeq(list(range(16))))
    changed_second_block = list(range(16))
    changed_second_block[5] = 1000
    assert len(bm.cached_prefix(FakeSeq(changed_second_block))) == 1
    same_tokens_elsewhere = [7, 7, 7, 7] + list(range(4, 16))  # block 1 tokens equal, parent differs
    assert bm.cached_prefix(FakeSeq(same_tokens_elsewhere)) == []


def test_at_least_one_token_is_left_to_compute() -> None:
    bm = manager()
    run_to_completion(bm, FakeSeq(list(range(8))))
    assert len(bm.cached_prefix(FakeSeq(list(range(8))))) == 1


def test_live_shared_blocks_gain_a_reference() -> None:
    bm = manager()
    holder = FakeSeq(list(range(9)))
    run_to_completion(bm, holder)
    other = FakeSeq(list(range(9)))
    run_to_completion(bm, other)
    assert other.block_ids[:2] == holder.block_ids[:2]
    assert [bm.allocator.ref_counts[b] for b in holder.block_ids[:2]] == [2, 2]
    assert other.block_ids[2] != holder.block_ids[2]  # the partial block is never shared through the cache


def test_least_recently_released_blocks_are_evicted_first_and_forgotten() -> None:
    bm = manager(num_blocks=6)
    old, recent = FakeSeq([1] * 8 + [2]), FakeSeq([3] * 8 + [4])
    run_to_completion(bm, old)
    bm.free(old)
    run_to_completion(bm, recent)
    bm.free(recent)
    filler = FakeSeq(list(range(100, 112)))  # needs 3 blocks: the 3 free ones released first
    run_to_completion(bm, filler)
    assert bm.cached_prefix(FakeSeq([1] * 8 + [2])) == []
    assert len(bm.cached_prefix(FakeSeq([3] * 8 + [4]))) == 2


def test_a_hash_collision_is_caught_by_the_token_check() -> None:
    bm = manager()
    seq = FakeSeq(list(range(9)))
    run_to_completion(bm, seq)
    cache = bm.prefix_cache
    cache.tokens_of[seq.block_ids[0]] = (42, 42, 42, 42)  # as if another block had the same hash
    assert cache.lookup(FakeSeq(list(range(9)))) == [[]]


PREFIXES = [list(range(500, 500 + n)) for n in (37, 53, 70)]


@st.composite
def traffic(draw: st.DrawFn) -> list[tuple[list[int], int, int | None]]:
    """Requests (prompt, max_tokens, step at which to abort or None) sharing a few long prefixes."""
    requests = []
    for _ in range(draw(st.integers(4, 10))):
        prefix = PREFIXES[draw(st.integers(0, len(PREFIXES) - 1))]
        suffix = draw(st.lists(st.integers(1000, 2000), min_size=1, max_size=12))
        abort_at = draw(st.one_of(st.none(), st.integers(0, 8)))
        requests.append((prefix + suffix, draw(st.integers(1, 30)), abort_at))
    return requests


@pytest.fixture(scope="module")
def cached_llm(tiny_llama_dir: Path) -> LLM:
    """Prefix caching on, 10 blocks of 16 tokens: shared prefixes, preemptions and evictions all happen."""
    return LLM(
        model=str(tiny_llama_dir),
        dtype="float32",
        kv_cache_memory=10 * 16 * 2 * 2 * 2 * 16 * 4,
        max_num_batched_tokens=48,
    )


@pytest.fixture(scope="module")
def uncached_llm(tiny_llama_dir: Path) -> LLM:
    return LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=2**24, enable_prefix_caching=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=traffic(), seed=st.integers(0, 2**16))
def test_random_traffic_gives_the_same_greedy_outputs_with_exact_block_accounting(
    cached_llm: LLM, uncached_llm: LLM, requests: list[tuple[list[int], int, int | None]], seed: int
) -> None:
    engine = cached_llm.engine
    assert engine.num_blocks == 10
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, logprobs=5) for _, m, _ in requests]
    expected = uncached_llm.generate([p for p, _, _ in requests], params)
    arrival = random.Random(seed)
    pending = list(enumerate(requests))
    finished, aborted, step = {}, set(), 0
    while pending or engine.has_unfinished_requests():
        while pending and arrival.random() < 0.5:
            index, (prompt, _, _) = pending.pop(0)
            engine.add_request(str(index), prompt, params[index])
        for index, (_, _, abort_at) in enumerate(requests):
            if abort_at == step and str(index) in engine.requests:
                engine.abort_request(str(index))
                aborted.add(index)
        finished.update({int(o.request_id): o for o in engine.step() if o.finished})
        assert_exact_block_accounting(engine)
        step += 1
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    for index, output in finished.items():
        ours = (output.outputs[0].token_ids, output.outputs[0].logprobs)
        theirs = (expected[index].outputs[0].token_ids, expected[index].outputs[0].logprobs)
        check_logprobs_close(ours, theirs, f"request {index}")
    assert set(finished) | aborted == set(range(len(requests)))


def assert_exact_block_accounting(engine) -> None:
    """Every block's reference count equals the number of live block tables holding it."""
    held = [0] * engine.num_blocks
    for seq in engine.scheduler.running:
        for block_id in seq.block_ids:
            held[block_id] += 1
    for seq in engine.scheduler.waiting:
        assert not seq.block_ids or seq.num_computed_tokens > 0
        for block_id in seq.block_ids:
            held[block_id] += 1
    assert held == engine.block_manager.allocator.ref_counts
    assert engine.block_manager.num_free_blocks == held.count(0)


def test_caching_saves_prefill_on_the_embedded_model(llm: LLM) -> None:
    system = "You are a careful assistant who answers in one short sentence. " * 12
    first = llm.generate([system + "Name a fruit."], SamplingParams(max_tokens=4, temperature=0))[0]
    before = llm.engine.stats().prompt_tokens
    second = llm.generate([system + "Name a color."], SamplingParams(max_tokens=4, temperature=0))[0]
    computed = llm.engine.stats().prompt_tokens - before
    assert second.num_cached_tokens >= len(first.prompt_token_ids) - 2 * llm.engine.config.block_size
    assert computed == len(second.prompt_token_ids) - second.num_cached_tokens


def test_prompt_logprobs_are_whole_when_the_prompt_is_cached(cached_llm: LLM, uncached_llm: LLM) -> None:
    prompt = list(range(5, 5 + 3 * 16 + 5))  # three full blocks: cached after the first request
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    cached_llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    hits_before = cached_llm.engine.stats().prefix_cache_hit_tokens
    with_cache = cached_llm.generate([prompt], params)[0].prompt_logprobs
    without = uncached_llm.generate([prompt], params)[0].prompt_logprobs
    assert cached_llm.engine.stats().prefix_cache_hit_tokens == hits_before  # the cached blocks were not used
    assert len(with_cache) == len(prompt) and with_cache[0] is None
    for ours, theirs, token in zip(with_cache[1:], without[1:], prompt[1:]):
        assert ours[token] == pytest.approx(theirs[token], abs=1e-5)
