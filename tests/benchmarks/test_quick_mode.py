"""`pagedllm bench serve` in quick mode against a live pagedllm server: a complete, self-consistent result."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from pagedllm.benchmarks.metrics import Distribution, ServingMetrics

NUM_PROMPTS = 8
OUTPUT_LEN = 16


def test_quick_serve_run_against_a_live_server(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    command = [
        sys.executable, "-m", "pagedllm.cli", "bench", "serve", "--launch", "pagedllm",
        "--dataset", "sharegpt", "--num-prompts", str(NUM_PROMPTS), "--sharegpt-output-len", str(OUTPUT_LEN),
        "--max-model-len", "1024", "--max-concurrency", "4", "--seed", "3", "--output-json", str(results_path),
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    document = json.loads(results_path.read_text())
    assert set(document["machine"]) >= {"name", "cpu_model", "cpu_count", "platform", "python"}
    (run,) = document["runs"]
    assert run["kind"] == "serve" and run["engine"] == "pagedllm"
    assert "bench serve" in run["command"] and run["versions"]["torch"]
    metrics = run["results"]["metrics"]
    assert set(metrics) == {f.name for f in fields(ServingMetrics)}
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert set(metrics[name]) == {f.name for f in fields(Distribution)}
        assert 0 < metrics[name]["median"] <= metrics[name]["p99"]

    requests = run["results"]["requests"]
    assert len(requests) == NUM_PROMPTS and metrics["completed"] == NUM_PROMPTS and metrics["failed"] == 0
    for request in requests:
        # ignore_eos: the server's usage count is exactly max_tokens, and every token arrived in some chunk.
        assert request["output_tokens"] == request["expected_output_len"] == OUTPUT_LEN
        assert 1 <= request["output_chunks"] <= request["output_tokens"]
        assert 0 < request["ttft_s"] <= request["latency_s"]
    assert metrics["total_output_tokens"] == sum(r["output_tokens"] for r in requests)
    assert metrics["total_input_tokens"] == sum(r["prompt_len"] for r in requests)
    duration = metrics["duration_s"]
    assert abs(metrics["output_throughput"] - metrics["total_output_tokens"] / duration) < 1e-6
    assert max(r["latency_s"] for r in requests) <= duration
    assert run["results"]["peak_rss_bytes"] > 0
    # The server's own figures: the weights and the KV cache, both inside its resident memory.
    budget = run["results"]["memory_budget"]
    assert budget["weight_bytes"] > 50 * 2**20 and budget["kv_cache_bytes"] > 0
    assert run["results"]["peak_rss_bytes"] > budget["weight_bytes"]
