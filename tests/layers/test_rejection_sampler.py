"""Rejection sampler: greedy verification, and emitted tokens distributed as the target (chi-square), for random
draft distributions and one-hot (n-gram) drafts, under the request's sampling settings and its own generator."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.rejection_sampler import DraftBatch, RejectionSampler
from pagedllm.layers.sampler import Sampler, process_logits
from tests.layers.test_sampler import make_batch

VOCAB = 6
K = 3
TRIALS = 12000
P_VALUE = 1e-3


def chi_square_p_value(tokens: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """P-value of Pearson's test that `tokens` were drawn from `expected_probs` (tokens of zero probability: 0)."""
    observed = torch.bincount(tokens, minlength=len(expected_probs)).double()
    if bool((observed[expected_probs == 0] > 0).any()):
        return 0.0
    support = expected_probs > 0
    expected = expected_probs[support].double() * len(tokens)
    statistic = ((observed[support] - expected) ** 2 / expected).sum()
    degrees = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2))


def verify_many(
    target_logits: torch.Tensor, draft_probs: torch.Tensor | None, one_hot_drafts: torch.Tensor | None, **settings
) -> list[list[int]]:
    """TRIALS sequences verifying K drafts each against the same target rows [K + 1, VOCAB]."""
    generator = torch.Generator().manual_seed(1)
    if draft_probs is not None:
        drafts = torch.multinomial(draft_probs, TRIALS, replacement=True, generator=generator).T  # [TRIALS, K]
    else:
        drafts = one_hot_drafts.expand(TRIALS, K)
    logits = target_logits.repeat(TRIALS, 1)
    rows = TRIALS * (K + 1)
    batch = make_batch(rows, **{name: [value] * rows for name, value in settings.items()})
    draft_batch = DraftBatch(
        [K] * TRIALS,
        drafts.reshape(-1).tolist(),
        draft_probs.repeat(TRIALS, 1) if draft_probs is not None else None,
    )
    sampler = RejectionSampler(Sampler(torch.Generator().manual_seed(2)))
    return sampler(logits, batch, draft_batch).token_ids


def target_probs(target_logits: torch.Tensor, **settings) -> torch.Tensor:
    rows = len(target_logits)
    batch = make_batch(rows, **{name: [value] * rows for name, value in settings.items()})
    return torch.softmax(process_logits(target_logits, batch).logits, dim=-1)


def emitted_at(outputs: list[list[int]], position: int) -> torch.Tensor:
    return torch.tensor([tokens[position] for tokens in outputs if len(tokens) > position])


CASES = {
    "plain": {},
    "temperature_top_k_top_p": {"temperature": 0.7, "top_k": 4, "top_p": 0.9},
}


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("drafts", ["random_distribution", "one_hot"])
def test_emitted_tokens_follow_the_target_distribution(settings: dict, drafts: str) -> None:
    generator = torch.Generator().manual_seed(0)
    target_logits = torch.randn(K + 1, VOCAB, generator=generator)
    expected = target_probs(target_logits, **settings)
    if drafts == "random_distribution":
        # Random, but near enough to the target that every position is reached often.
        noise = torch.randn(K, VOCAB, generator=generator)
        draft_probs = torch.softmax(target_logits[:K] + noise, dim=-1)
        outputs = verify_many(target_logits, draft_probs, None, **settings)
    else:
        # A fixed guess per position, as prompt lookup gives (accepted with probability p(guess)): the likeliest.
        outputs = verify_many(target_logits, None, expected[:K].argmax(dim=-1), **settings)
    for position in range(K + 1):
        tokens = emitted_at(outputs, position)
        assert len(tokens) > 400, f"too few tokens reached position {position}"
        assert chi_square_p_value(tokens, expected[position]) > P_VALUE, f"position {position}"


def test_the_chi_square_check_detects_a_sampler_that_keeps_every_draft() -> None:
    generator = torch.Generator().manual_seed(0)
    target_logits = torch.randn(K + 1, VOCAB, generator=generator) * 1.5
    draft_probs = torch.softmax(torch.randn(K, VOCAB, generator=generator) * 1.5, dim=-1)
    drafts = torch.multinomial(draft_probs, TRIALS, replacement=True, generator=generator).T
    assert chi_square_p_value(drafts[:, 0], target_probs(target_logits)[0]) < P_VALUE


def test_greedy_accepts_while_drafts_equal_the_argmax_then_adds_the_targets_token() -> None:
    logits = torch.full((4 + 1 + 3, VOCAB), -1.0)
    argmaxes = [2, 4, 1, 5, 3, 0, 0, 1]
    for row, token in enumerate(argmaxes):
        logits[row, token] = 2.0
    # Sequence 0: drafts 2, 4, 3, 9 against argmaxes 2, 4, 1, 5 (bonus 3); sequence 1: drafts 0, 0 all right.
    drafts = DraftBatch([4, 2], [2, 4, 3, 5, 0, 0])
    batch = make_batch(len(logits), temperature=[0.0] * len(logits), num_logprobs=1)
    result = RejectionSampler(Sampler(torch.Generator()))(logits, batch, drafts)
    assert result.token_ids == [[2, 4, 1], [0, 0, 1]]
    assert result.num_accepted == [2, 2]
    raw = torch.log_softmax(logits, dim=-1)
    assert result.token_logprobs[0] == pytest.approx([raw[0, 2].item(), raw[1, 4].item(), raw[2, 1].item()])
    assert result.top_ids[1] == [[0], [0], [1]]


def test_greedy_verification_applies_the_requests_penalties() -> None:
    # Token 2 leads the raw logits, but a repetition penalty on it makes token 3 the target's choice.
    logits = torch.tensor([[0.0, 0.0, 3.0, 2.0, 0.0, 0.0]] * 2)
    seen = torch.zeros(2, VOCAB, dtype=torch.bool)
    seen[:, 2] = True
    batch = make_batch(2, temperature=[0.0] * 2, repetition_penalty=[2.0] * 2, seen_mask=seen)
    result = RejectionSampler(Sampler(torch.Generator()))(logits, batch, DraftBatch([1], [2]))
    assert result.token_ids == [[3]]


def test_seeded_requests_verify_reproducibly_and_differently_per_seed() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5 * (K + 1), VOCAB, generator=generator)
    drafts = DraftBatch([K] * 5, [0, 1, 2] * 5)

    def run(seed: int) -> list[list[int]]:
        generators = [torch.Generator().manual_seed(seed + i // (K + 1)) for i in range(len(logits))]
        # Rows of one sequence share its generator object.
        generators = [generators[(i // (K + 1)) * (K + 1)] for i in range(len(logits))]
        batch = make_batch(len(logits), generators=generators)
        return RejectionSampler(Sampler(torch.Generator().manual_seed(99)))(logits, batch, drafts).token_ids

    assert run(7) == run(7)
    assert any(run(7) != run(seed) for seed in (8, 9, 10))


def test_sequences_without_drafts_sample_one_token_as_the_sampler_does() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=generator)
    batch = make_batch(3, temperature=[0.0, 0.8, 0.0], generators=[torch.Generator().manual_seed(5), None, None])
    result = RejectionSampler(Sampler(torch.Generator().manual_seed(3)))(logits, batch, DraftBatch([0, 0, 0], []))
    batch_again = make_batch(3, temperature=[0.0, 0.8, 0.0], generators=[torch.Generator().manual_seed(5), None, None])
    plain = Sampler(torch.Generator().manual_seed(3))(logits, batch_again)
    assert result.token_ids == [[token] for token in plain.token_ids]


def test_seeded_one_hot_verification_emits_what_the_sampler_draws_one_token_at_a_time() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(K + 1, VOCAB, generator=generator)
    probs = torch.softmax(logits, dim=-1)
    sequential_generator = torch.Generator().manual_seed(42)
    sampler = Sampler(torch.Generator())
    sampled = [int(sampler.draw(probs[j : j + 1], [sequential_generator])[0]) for j in range(K + 1)]
    for num_right in range(K + 1):
        # The first num_right drafts are the sampled tokens, the next one is not.
        drafts = sampled[:num_right] + [(t + 1) % VOCAB for t in sampled[num_right:K]]
        seeded = torch.Generator().manual_seed(42)
        batch = make_batch(K + 1, generators=[seeded] * (K + 1))
        result = RejectionSampler(sampler)(logits, batch, DraftBatch([K], drafts))
        assert result.token_ids == [sampled[: num_right + 1]]
