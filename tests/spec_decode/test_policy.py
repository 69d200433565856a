"""Adaptive speculation: shorter drafts as acceptance falls, pauses with backoff, none on large batches."""

from __future__ import annotations

from pagedllm.spec_decode.policy import SpeculationPolicy


def test_full_length_while_everything_is_accepted() -> None:
    policy = SpeculationPolicy(5, None, 0.1)
    for _ in range(5):
        assert policy.draft_length("a") == 5
        policy.record("a", 5, 5)


def test_drafts_shorten_as_acceptance_falls() -> None:
    policy = SpeculationPolicy(8, None, 0.1)
    lengths = []
    for _ in range(10):
        lengths.append(policy.draft_length("a"))
        policy.record("a", 2, 1)  # half accepted: the rate tends to 0.5
    assert lengths[0] == 8
    assert lengths[-1] == 3  # 0.5^3 >= 0.1 > 0.5^4 once the rate is near 0.5
    assert lengths == sorted(lengths, reverse=True)


def test_low_acceptance_pauses_with_growing_pauses_then_probes() -> None:
    policy = SpeculationPolicy(4, None, 0.3)
    policy.record("a", 4, 0)
    policy.record("a", 4, 0)  # rate 0.25 < 0.3: pause 1 step
    assert [policy.draft_length("a") for _ in range(2)] == [0, 1]
    policy.record("a", 1, 0)  # the probe fails: pause 2 steps
    assert [policy.draft_length("a") for _ in range(3)] == [0, 0, 1]
    policy.record("a", 1, 1)  # accepted: the rate recovers above the minimum
    assert policy.draft_length("a") >= 1
    assert policy.states["a"].pause_length == 1


def test_new_sequences_start_from_the_engine_rate_and_finished_ones_are_forgotten() -> None:
    policy = SpeculationPolicy(6, None, 0.1)
    for _ in range(100):
        policy.record("a", 6, 0)
    assert policy.engine_rate < 0.1
    assert policy.draft_length("b") == 1  # starts low: a probe, not a full draft
    policy.forget("a")
    assert "a" not in policy.states


def test_drafts_shorten_as_the_batch_grows_and_large_batches_do_not_speculate() -> None:
    policy = SpeculationPolicy(5, 8, 0.1)
    # A step stays within max(8, 5 + 1) rows: a lone sequence drafts 5, two 3 each, 3 or 4 one each.
    assert [policy.max_draft_length(n) for n in range(1, 10)] == [5, 3, 1, 1, 0, 0, 0, 0, 0]
    assert SpeculationPolicy(12, 8, 0.1).max_draft_length(1) == 12  # a lone sequence gets its full draft
    assert SpeculationPolicy(12, 8, 0.1).max_draft_length(8) == 0
    assert SpeculationPolicy(4, None, 0.1).max_draft_length(1000) == 4
