"""Serving metrics from client-side stream timestamps: TTFT, ITL, TPOT, latency, throughput."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTrace:
    """What the client saw of one streamed request; times are `time.perf_counter()` seconds."""

    prompt_len: int
    expected_output_len: int
    sent_at: float = 0.0
    # Arrival time of each stream chunk that carried generated text.
    chunk_times: list[float] = field(default_factory=list)
    finished_at: float = 0.0
    # The server's `usage.completion_tokens`, when it sent one.
    usage_output_tokens: int | None = None
    generated_text: str = ""
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        """Generated tokens: the server's own count when it gave one, else the number of text chunks."""
        return self.usage_output_tokens if self.usage_output_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float:
        """Time to first token: request sent → first text chunk."""
        return self.chunk_times[0] - self.sent_at

    @property
    def latency(self) -> float:
        """End-to-end latency: request sent → stream finished."""
        return self.finished_at - self.sent_at

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive text chunks."""
        return [later - earlier for earlier, later in pairwise(self.chunk_times)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None with fewer than two output tokens."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: list[float]) -> Distribution:
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(ms, PERCENTILES)
        return cls(float(ms.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class ServingMetrics:
    """Aggregate results of one load-generator run."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    total_output_chunks: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_latency_ms: Distribution


def summarize(traces: list[RequestTrace], duration_s: float) -> ServingMetrics:
    """Metrics over the successful requests of a run that took `duration_s` seconds of wall time."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    done = [trace for trace in traces if trace.success]
    input_tokens = sum(trace.prompt_len for trace in done)
    output_tokens = sum(trace.output_tokens for trace in done)
    tpots = [tpot for tpot in (trace.tpot for trace in done) if tpot is not None]
    return ServingMetrics(
        completed=len(done),
        failed=len(traces) - len(done),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        total_output_chunks=sum(len(trace.chunk_times) for trace in done),
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_ms=Distribution.of_seconds([trace.ttft for trace in done]),
        tpot_ms=Distribution.of_seconds(tpots),
        itl_ms=Distribution.of_seconds([itl for trace in done for itl in trace.itls]),
        e2e_latency_ms=Distribution.of_seconds([trace.latency for trace in done]),
    )
