"""Data-parallel routing: the longest recorded prefix wins unless its replica is too busy; records stay bounded."""

from __future__ import annotations

import pytest

from pagedllm.engine.router import PrefixAffinityRouter, PrefixRecord, RoutingPolicy, block_hashes

BLOCK_SIZE = 4
SYSTEM = list(range(1000, 1016))  # 4 blocks
POLICY = RoutingPolicy(prefix_affinity_min_tokens=8, prefix_affinity_max_load_gap=2)


def router(
    num_replicas: int = 3, record_blocks: int = 64, policy: RoutingPolicy | None = POLICY
) -> PrefixAffinityRouter:
    return PrefixAffinityRouter(num_replicas, BLOCK_SIZE, record_blocks, policy)


def test_block_hashes_cover_full_blocks_and_name_a_block_by_its_whole_prefix() -> None:
    assert len(block_hashes(list(range(11)), BLOCK_SIZE)) == 2  # the partial last block is not cached
    assert block_hashes([], BLOCK_SIZE) == []
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BLOCK_SIZE)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BLOCK_SIZE)
    assert a[0] != b[0] and a[1] != b[1]  # the same second block after another first one is another prefix
    assert a == block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BLOCK_SIZE)[:2]


def test_a_prompt_goes_where_its_longest_prefix_was_sent() -> None:
    chooser = router()
    short = block_hashes(SYSTEM[:8] + [1] * 8, BLOCK_SIZE)  # shares 2 blocks with SYSTEM
    whole = block_hashes(SYSTEM + [2] * 4, BLOCK_SIZE)  # shares all 4
    chooser.record(1, short)
    chooser.record(2, whole)
    assert chooser.choose(block_hashes(SYSTEM + [3] * 8, BLOCK_SIZE), [0, 2, 1]) == 2
    assert chooser.choose(block_hashes(SYSTEM[:8] + [1] * 4, BLOCK_SIZE), [0, 2, 0]) == 1  # its 3 blocks are at 1
    # Equal matches: the less loaded of them.
    chooser.record(1, whole)
    assert chooser.choose(block_hashes(SYSTEM, BLOCK_SIZE), [0, 2, 1]) == 2
    assert chooser.choose(block_hashes(SYSTEM, BLOCK_SIZE), [0, 1, 2]) == 1


def test_a_prefix_shorter_than_the_minimum_or_no_prefix_goes_to_the_least_loaded() -> None:
    chooser = router()
    chooser.record(2, block_hashes(SYSTEM, BLOCK_SIZE))
    assert chooser.choose(block_hashes(SYSTEM[:4] + [5] * 12, BLOCK_SIZE), [1, 0, 0]) == 1  # 4 tokens < 8
    assert chooser.choose(block_hashes(SYSTEM[:8] + [5] * 12, BLOCK_SIZE), [1, 0, 0]) == 2  # 8 tokens: enough
    assert chooser.choose(block_hashes([5] * 16, BLOCK_SIZE), [3, 2, 2]) == 1  # nothing cached: least loaded, first
    assert chooser.choose([], [3, 2, 1]) == 2  # shorter than a block


def test_a_replica_busier_than_the_load_gap_allows_loses_its_prefix_to_load() -> None:
    chooser = router()
    hashes = block_hashes(SYSTEM, BLOCK_SIZE)
    chooser.record(0, hashes)
    assert chooser.choose(hashes, [2, 0, 1]) == 0  # 2 more than the least loaded: within the gap
    assert chooser.choose(hashes, [3, 0, 1]) == 1  # 3 more: the least loaded
    chooser.record(2, hashes[:2])
    assert chooser.choose(hashes, [3, 0, 1]) == 2  # the longest prefix among the replicas within the gap


def test_routing_by_load_alone_without_a_policy() -> None:
    chooser = router(policy=None)
    chooser.record(0, block_hashes(SYSTEM, BLOCK_SIZE))
    assert chooser.choose(block_hashes(SYSTEM, BLOCK_SIZE), [1, 0, 0]) == 1


def test_a_record_holds_at_most_its_capacity_and_forgets_the_least_recently_routed_first() -> None:
    record = PrefixRecord(capacity=6)
    old = block_hashes(list(range(16)), BLOCK_SIZE)
    new = block_hashes(list(range(100, 116)), BLOCK_SIZE)
    record.insert(old)
    record.insert(new)
    assert len(record) == 6
    assert record.match(new) == 4
    assert record.match(old) == 2  # its last blocks went first: its prefix still matches
    record.insert(old[:1])  # routed again: now the most recent
    record.insert(block_hashes(list(range(200, 216)), BLOCK_SIZE))
    assert len(record) == 6
    assert record.match(old) == 1 and record.match(new) == 1
    for start in range(0, 4000, 16):  # many prompts later, still bounded
        record.insert(block_hashes(list(range(start, start + 16)), BLOCK_SIZE))
    assert len(record) == 6
    with pytest.raises(ValueError, match="capacity"):
        PrefixRecord(capacity=0)


def test_a_removed_replica_gets_no_prompt_even_with_its_prefix_and_the_least_load() -> None:
    chooser = router(num_replicas=3)
    hashes = block_hashes(SYSTEM, BLOCK_SIZE)
    chooser.record(1, hashes)
    assert chooser.choose(hashes, [0, 0, 0]) == 1
    chooser.remove(1)
    assert chooser.choose(hashes, [1, 0, 1]) == 0  # neither its prefix nor its load draws a prompt there
    assert chooser.choose([], [2, 0, 1]) == 2
