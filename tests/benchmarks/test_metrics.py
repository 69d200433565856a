"""Metric arithmetic from a scripted stream with known timestamps."""

from __future__ import annotations

import json

import pytest

from pagedllm.benchmarks.metrics import Distribution, RequestTrace, summarize
from pagedllm.benchmarks.serve import parse_sse_line, record_event


def chunk(text: str, usage: int | None = None) -> str:
    event: dict = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
    if usage is not None:
        event["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": 3 + usage}
    return "data: " + json.dumps(event)


def replay(lines: list[tuple[float, str]], sent_at: float, finished_at: float, prompt_len: int = 3) -> RequestTrace:
    """Feed scripted (arrival time, SSE line) pairs through the load generator's stream parser."""
    trace = RequestTrace(prompt_len=prompt_len, expected_output_len=4, sent_at=sent_at)
    for arrived_at, line in lines:
        event = parse_sse_line(line)
        if event is not None:
            record_event(trace, event, arrived_at)
    trace.finished_at = finished_at
    return trace


SCRIPT = [
    (10.0, ": keep-alive comment"),
    (10.5, chunk("")),  # an empty delta is not a token the user sees
    (11.0, chunk("Hello")),
    (11.2, chunk(",")),
    (11.5, chunk(" world")),
    (12.0, chunk("!")),
    (12.1, chunk("", usage=4)),  # the final chunk: finish reason and usage, no text
    (12.2, "data: [DONE]"),
]


def test_scripted_stream_gives_exact_ttft_itl_tpot() -> None:
    trace = replay(SCRIPT, sent_at=10.0, finished_at=12.25)
    assert trace.success
    assert trace.generated_text == "Hello, world!"
    assert trace.ttft == pytest.approx(1.0)
    assert trace.itls == pytest.approx([0.2, 0.3, 0.5])
    assert trace.latency == pytest.approx(2.25)
    assert trace.output_tokens == 4
    # (latency − TTFT) / (tokens − 1)
    assert trace.tpot == pytest.approx((2.25 - 1.0) / 3)


def test_server_usage_wins_over_the_chunk_count() -> None:
    # Two chunks, but the server says it generated 5 tokens (some chunks carried several).
    trace = replay([(1.0, chunk("ab")), (2.0, chunk("cde", usage=5))], sent_at=0.0, finished_at=3.0)
    assert len(trace.chunk_times) == 2
    assert trace.output_tokens == 5
    assert trace.tpot == pytest.approx((3.0 - 1.0) / 4)


def test_chunk_count_is_used_without_usage() -> None:
    trace = replay([(1.0, chunk("a")), (1.5, chunk("b")), (2.5, chunk("c"))], sent_at=0.5, finished_at=2.5)
    assert trace.output_tokens == 3
    assert trace.tpot == pytest.approx((2.0 - 0.5) / 2)


def test_single_token_has_no_tpot() -> None:
    trace = replay([(1.0, chunk("a", usage=1))], sent_at=0.0, finished_at=1.0)
    assert trace.tpot is None
    assert trace.itls == []


def test_error_event_and_empty_stream_fail_the_request() -> None:
    errored = replay([(1.0, chunk("a")), (1.1, 'data: {"error": {"message": "boom"}}')], sent_at=0.0, finished_at=1.2)
    assert not errored.success
    assert "boom" in errored.error
    assert not replay([(1.0, "data: [DONE]")], sent_at=0.0, finished_at=1.0).success


def test_distribution_in_milliseconds() -> None:
    dist = Distribution.of_seconds([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert dist.mean == pytest.approx(50.5)
    assert dist.median == pytest.approx(50.5)
    assert dist.p90 == pytest.approx(90.1)  # linear interpolation between the 90th and 91st values
    assert dist.p99 == pytest.approx(99.01)
    assert Distribution.of_seconds([]) == Distribution(0.0, 0.0, 0.0, 0.0)


def test_summary_over_requests() -> None:
    first = replay(SCRIPT, sent_at=10.0, finished_at=12.25, prompt_len=3)  # TTFT 1.0, 4 tokens
    second = replay(
        [(0.5, chunk("x")), (1.5, chunk("y", usage=2))], sent_at=0.0, finished_at=2.0, prompt_len=7
    )  # TTFT 0.5
    failed = RequestTrace(prompt_len=100, expected_output_len=4, error="HTTP 500")
    metrics = summarize([first, second, failed], duration_s=4.0)
    assert (metrics.completed, metrics.failed) == (2, 1)
    assert metrics.total_input_tokens == 10  # the failed request's prompt is not counted
    assert metrics.total_output_tokens == 6
    assert metrics.total_output_chunks == 6
    assert metrics.request_throughput == pytest.approx(0.5)
    assert metrics.output_throughput == pytest.approx(1.5)
    assert metrics.total_token_throughput == pytest.approx(4.0)
    assert metrics.ttft_ms.mean == pytest.approx(750.0)
    assert metrics.ttft_ms.median == pytest.approx(750.0)
    # TPOTs: (2.25 − 1.0)/3 and (2.0 − 0.5)/1
    assert metrics.tpot_ms.mean == pytest.approx(1000 * ((1.25 / 3) + 1.5) / 2)
    # ITLs: 0.2, 0.3, 0.5 and 1.0
    assert metrics.itl_ms.mean == pytest.approx(500.0)
    assert metrics.e2e_latency_ms.mean == pytest.approx(1000 * (2.25 + 2.0) / 2)


def test_summary_rejects_a_zero_duration() -> None:
    with pytest.raises(ValueError):
        summarize([], duration_s=0.0)
