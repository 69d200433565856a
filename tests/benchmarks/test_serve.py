"""The load generator against an in-process scripted OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from collections.abc import AsyncIterator

import httpx
import pytest

from pagedllm.benchmarks.datasets import BenchmarkRequest
from pagedllm.benchmarks.serve import (
    BACKENDS,
    LoadSettings,
    arrival_delays,
    completion_payload,
    parse_concurrencies,
    run_load,
)


class ScriptedServer:
    """Streams `max_tokens` one-token chunks per request and reports usage; records the load it saw."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak_in_flight = 0
        self.payloads: list[dict] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        self.payloads.append(payload)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.events(payload))

    async def events(self, payload: dict) -> AsyncIterator[bytes]:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            for index in range(payload["max_tokens"]):
                await asyncio.sleep(0)  # let other requests interleave
                event = {"choices": [{"index": 0, "text": f"t{index} ", "finish_reason": None}]}
                yield f"data: {json.dumps(event)}\n\n".encode()
            usage = {
                "prompt_tokens": 1,
                "completion_tokens": payload["max_tokens"],
                "total_tokens": 1 + payload["max_tokens"],
            }
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


def settings(backend: str = "pagedllm", concurrency: int | None = 2, rate: float = math.inf) -> LoadSettings:
    return LoadSettings("http://bench.test", "m", BACKENDS[backend], rate, concurrency, seed=0, request_timeout_s=10.0)


REQUESTS = [BenchmarkRequest(f"prompt {i}", 2, 3 + i % 4) for i in range(12)]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_load_respects_the_concurrency_cap_and_counts_every_token(concurrency: int) -> None:
    server = ScriptedServer()
    result = asyncio.run(run_load(REQUESTS, settings(concurrency=concurrency), transport=server.transport()))
    assert server.peak_in_flight == concurrency
    assert [trace.error for trace in result.traces] == [None] * len(REQUESTS)
    assert [trace.output_tokens for trace in result.traces] == [request.output_len for request in REQUESTS]
    assert [len(trace.chunk_times) for trace in result.traces] == [request.output_len for request in REQUESTS]
    assert result.duration_s > 0
    # The first payload is the unmeasured probe.
    assert len(server.payloads) == len(REQUESTS) + 1
    assert [p["max_tokens"] for p in server.payloads[1:]] == [r.output_len for r in REQUESTS]


def test_payload_asks_for_usage_and_ignore_eos_only_where_supported() -> None:
    request = BenchmarkRequest([5, 6, 7], 3, 9)
    payload = completion_payload(request, settings("llama.cpp"))
    assert payload["prompt"] == [5, 6, 7]
    assert payload["max_tokens"] == 9
    assert payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert payload["ignore_eos"] is True
    assert "ignore_eos" not in completion_payload(request, settings("openai"))


def test_server_errors_are_recorded_not_raised() -> None:
    calls = []

    async def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:  # the probe succeeds
            return httpx.Response(200, text='data: {"choices": [{"text": "ok"}]}\n\ndata: [DONE]\n\n')
        return httpx.Response(503, text="overloaded")

    result = asyncio.run(run_load(REQUESTS[:2], settings(), transport=httpx.MockTransport(handle)))
    assert [trace.error for trace in result.traces] == ["HTTP 503: overloaded"] * 2


def test_failed_probe_stops_the_run() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(404, text="no such route"))
    with pytest.raises(RuntimeError, match="probe"):
        asyncio.run(run_load(REQUESTS[:1], settings(), transport=transport))


def test_poisson_arrivals_are_seeded_with_the_requested_mean() -> None:
    delays = arrival_delays(4000, request_rate=4.0, seed=1)
    assert delays == arrival_delays(4000, request_rate=4.0, seed=1)
    assert delays != arrival_delays(4000, request_rate=4.0, seed=2)
    assert statistics.mean(delays) == pytest.approx(0.25, rel=0.05)
    assert arrival_delays(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_delays(3, 0.0, seed=0)


def test_concurrency_lists() -> None:
    assert parse_concurrencies("1,4, 16") == [1, 4, 16]
    assert parse_concurrencies("inf") == [None]
