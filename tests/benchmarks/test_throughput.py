"""Prefill and decode tok/s from a fake engine on a fake clock."""

from __future__ import annotations

import pytest

from pagedllm.benchmarks import throughput
from pagedllm.benchmarks.throughput import (
    DecodePoint,
    PrefillPoint,
    PromptSource,
    RequestThroughput,
    int_tuple,
    measure,
)

PREFILL_S_PER_TOKEN = 0.001
DECODE_S_PER_STEP = 0.02
DECODE_S_PER_SEQ = 0.005


class FakeEngine:
    """Advances a fake clock as a real engine would spend time: prefill per prompt token, decode per step."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[list[list[int]]] = []

    def clock(self) -> float:
        return self.now

    def generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        self.calls.append(prompts)
        self.now += PREFILL_S_PER_TOKEN * sum(map(len, prompts))  # the prefill also yields the first token
        self.now += (new_tokens - 1) * (DECODE_S_PER_STEP + DECODE_S_PER_SEQ * len(prompts))


def test_measure_recovers_the_engine_speeds(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    monkeypatch.setattr(throughput.time, "perf_counter", engine.clock)
    source = PromptSource(vocab_size=100, excluded_ids=frozenset({0}), seed=0)
    result = measure(
        engine.generate,
        source,
        prompt_lens=(16, 64),
        batch_sizes=(1, 4),
        repeats=2,
        decode_prompt_len=8,
        decode_new_tokens=11,
    )
    assert result.prefill == [PrefillPoint(16, pytest.approx(1000.0)), PrefillPoint(64, pytest.approx(1000.0))]
    assert result.decode == [
        DecodePoint(1, pytest.approx(1 / (DECODE_S_PER_STEP + DECODE_S_PER_SEQ))),
        DecodePoint(4, pytest.approx(4 / (DECODE_S_PER_STEP + 4 * DECODE_S_PER_SEQ))),
    ]
    # No two calls share a prompt, so a prefix cache cannot flatter the numbers.
    prompts = [tuple(prompt) for call in engine.calls for prompt in call]
    assert len(prompts) == len(set(prompts))


def test_decode_needs_two_tokens() -> None:
    with pytest.raises(ValueError):
        measure(FakeEngine().generate, PromptSource(10, frozenset(), 0), decode_new_tokens=1)


def test_int_tuple() -> None:
    assert int_tuple("128,512") == (128, 512)


def test_request_throughput_from_counts() -> None:
    result = RequestThroughput.from_counts(num_requests=10, prompt_tokens=3000, output_tokens=1000, seconds=4.0)
    assert (result.requests_per_s, result.output_tokens_per_s, result.total_tokens_per_s) == (2.5, 250.0, 1000.0)
    assert (result.num_requests, result.prompt_tokens, result.output_tokens, result.seconds) == (10, 3000, 1000, 4.0)
    with pytest.raises(ValueError):
        RequestThroughput.from_counts(1, 1, 1, 0.0)
