"""The engine's speculation hooks: which sequences draft and how many tokens, the counters, finishing."""

from __future__ import annotations

from pagedllm.spec_decode.config import SpeculativeConfig
from pagedllm.spec_decode.speculator import Speculator
from tests.engine.test_scheduler import make_request

REPEATING_PROMPT = [5, 6, 7, 8] * 4


def decoding_sequence(request_no: int, max_tokens: int, outputs: int = 1):
    _, seq = make_request(request_no, 1, max_tokens)
    seq.request.prompt_token_ids[:] = REPEATING_PROMPT
    seq.output_token_ids += REPEATING_PROMPT[:outputs]
    seq.num_computed_tokens = seq.num_tokens - 1
    return seq


def test_decoding_sequences_draft_within_max_tokens_and_the_context() -> None:
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=None), 100)
    roomy = decoding_sequence(0, max_tokens=50)
    near_the_end = decoding_sequence(1, max_tokens=3)  # 1 output; this step's token leaves room for 1 draft
    at_the_end = decoding_sequence(2, max_tokens=2)
    prefilling = decoding_sequence(3, max_tokens=50)
    prefilling.num_computed_tokens = 0
    speculator.propose([roomy, near_the_end, at_the_end, prefilling])
    assert roomy.draft_token_ids == [6, 7, 8, 5]
    assert near_the_end.draft_token_ids == [6]
    assert at_the_end.draft_token_ids == [] and prefilling.draft_token_ids == []

    short_context = Speculator(SpeculativeConfig(num_speculative_tokens=4), len(REPEATING_PROMPT) + 3)
    roomy.draft_token_ids = []
    short_context.propose([roomy])
    assert roomy.draft_token_ids == [6, 7]  # 17 tokens, context 19: positions 17 and 18 are left


def test_large_batches_draft_nothing() -> None:
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=2), 100)
    sequences = [decoding_sequence(i, max_tokens=50) for i in range(2)]
    speculator.propose(sequences)
    assert all(seq.draft_token_ids == [] for seq in sequences)
    speculator.propose(sequences[:1])
    assert sequences[0].draft_token_ids == [6, 7, 8, 5]

    shortening = Speculator(SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=6), 100)
    sequences = [decoding_sequence(i, max_tokens=50) for i in range(3)]
    shortening.propose(sequences)  # three sequences within 6 rows: one draft each
    assert all(seq.draft_token_ids == [6] for seq in sequences)


def test_counters_and_finishing() -> None:
    speculator = Speculator(SpeculativeConfig(method="suffix"), 100)
    seq = decoding_sequence(0, max_tokens=50)
    speculator.propose([seq])
    speculator.verified(seq, 4, 3)
    speculator.verified(seq, 2, 0)
    speculator.verified(seq, 0, 0)  # no drafts: not a verification
    stats = speculator.stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 6, 3)
    assert stats.acceptance_rate == 0.5 and stats.mean_accepted_length == 2.5
    speculator.finished(seq)
    assert seq not in speculator.policy.states and seq not in speculator.proposer.sequences
    assert speculator.proposer.cached_outputs[-1] == seq.output_token_ids
