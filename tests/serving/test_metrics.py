"""/metrics exports the engine's gauges and counters and the per-request latency histograms."""

from __future__ import annotations

import httpx
import openai
from prometheus_client import generate_latest

from pagedllm.engine.engine import EngineStats, PrefixCacheStats
from pagedllm.serving.metrics import ServingMetrics

from .conftest import Server

GAUGES = ["pagedllm_num_requests_running", "pagedllm_num_requests_waiting", "pagedllm_kv_cache_usage_ratio"]
COUNTERS = [
    "pagedllm_num_preemptions_total",
    "pagedllm_prompt_tokens_total",
    "pagedllm_generation_tokens_total",
    "pagedllm_prefix_cache_queries_total",
    "pagedllm_prefix_cache_hits_total",
]
HISTOGRAMS = [
    "pagedllm_time_to_first_token_seconds",
    "pagedllm_inter_token_latency_seconds",
    "pagedllm_e2e_request_latency_seconds",
]


def test_metrics_count_a_request(server: Server, client: openai.OpenAI, model_name: str) -> None:
    before = server.metrics()
    client.completions.create(model=model_name, prompt="Hello there", max_tokens=4, extra_body={"ignore_eos": True})
    after = server.metrics()
    for name in GAUGES + COUNTERS:
        assert name in after, name
    assert 0 <= after["pagedllm_kv_cache_usage_ratio"] <= 1
    assert after["pagedllm_prompt_tokens_total"] - before["pagedllm_prompt_tokens_total"] == 2
    assert after["pagedllm_generation_tokens_total"] - before["pagedllm_generation_tokens_total"] == 4
    for name in HISTOGRAMS:
        assert after[f"{name}_count"] > before.get(f"{name}_count", 0), name
        assert after[f"{name}_sum"] > 0, name
    assert after[f"{HISTOGRAMS[1]}_count"] - before.get(f"{HISTOGRAMS[1]}_count", 0) == 3  # 4 tokens, 3 gaps
    finished = "pagedllm_requests_finished_total{finish_reason=length}"
    assert after[finished] - before.get(finished, 0) == 1


def test_metrics_are_prometheus_text_and_open(server: Server) -> None:
    response = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE pagedllm_time_to_first_token_seconds histogram" in response.text


def test_each_replicas_prefix_cache_hit_rate_is_exported_by_its_index() -> None:
    replicas = (PrefixCacheStats(queried_tokens=200, hit_tokens=50), PrefixCacheStats(queried_tokens=0, hit_tokens=0))
    stats = EngineStats(1, 0, 0.5, 0, 200, 8, 200, 50, replica_prefix_caches=replicas)
    metrics = ServingMetrics("m")
    metrics.watch(lambda: stats)
    text = generate_latest(metrics.registry).decode()
    assert 'pagedllm_replica_prefix_cache_hit_rate{model_name="m",replica="0"} 0.25' in text
    assert 'pagedllm_replica_prefix_cache_hit_rate{model_name="m",replica="1"} 0.0' in text
    assert 'pagedllm_replica_prefix_cache_hits_total{model_name="m",replica="0"} 50.0' in text
    assert 'pagedllm_replica_prefix_cache_queries_total{model_name="m",replica="0"} 200.0' in text
    metrics = ServingMetrics("m")
    metrics.watch(lambda: EngineStats(1, 0, 0.5, 0, 200, 8, 200, 50))  # one engine: no replica families
    assert "replica" not in generate_latest(metrics.registry).decode()
