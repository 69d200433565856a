"""The results file round trip and the report built from it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from pagedllm.benchmarks import results
from pagedllm.benchmarks.metrics import Distribution, ServingMetrics
from pagedllm.benchmarks.report import markdown_report, write_report
from pagedllm.benchmarks.throughput import DecodePoint, OfflineThroughput, PrefillPoint


def serving_metrics(throughput: float, ttft_ms: float, tpot_ms: float) -> dict:
    def dist(value: float) -> Distribution:
        return Distribution(value, value, value * 1.5, value * 2)

    return asdict(
        ServingMetrics(
            10, 0, 5.0, 100, 500, 500, 2.0, throughput, throughput + 20, dist(ttft_ms), dist(tpot_ms), dist(tpot_ms), dist(1000)
        )
    )


def serve_run(engine: str, concurrency: int, throughput: float, ttft_ms: float, tpot_ms: float) -> results.Run:
    settings = {
        "dataset": "sharegpt",
        "num_prompts": 10,
        "input_len": 128,
        "output_len": 128,
        "request_rate": "inf",
        "max_concurrency": concurrency,
    }
    return results.new_run(
        "serve", engine, settings, {"metrics": serving_metrics(throughput, ttft_ms, tpot_ms), "peak_rss_bytes": 300 * 2**20}
    )


def offline_run(engine: str, prefill: float, decode: float) -> results.Run:
    throughput = OfflineThroughput([PrefillPoint(512, prefill)], [DecodePoint(1, decode), DecodePoint(8, decode * 4)])
    return results.new_run("offline", engine, {}, asdict(throughput))


def write_results(path: Path) -> None:
    for run in [
        serve_run("llama.cpp", 1, 50.0, 100.0, 20.0),
        serve_run("pagedllm", 1, 40.0, 200.0, 25.0),
        serve_run("pagedllm", 4, 120.0, 300.0, 30.0),
        serve_run("llama.cpp", 4, 100.0, 150.0, 40.0),
        offline_run("transformers", 1000.0, 30.0),
        offline_run("pagedllm", 2000.0, 60.0),
    ]:
        results.append_run(path, run)


def test_runs_accumulate_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "r.json"
    write_results(path)
    document = results.load_results(path)
    assert [run.engine for run in document.runs][:3] == ["llama.cpp", "pagedllm", "pagedllm"]
    assert document.machine.cpu_count >= 1 and document.machine.cpu_model
    assert "torch" in document.runs[0].versions
    json.loads(path.read_text())  # strict JSON: no NaN or Infinity


def test_markdown_has_ratios_to_each_peer(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_results(path)
    text = markdown_report(results.load_results(path))
    assert "| tok/s | pagedllm | transformers | pagedllm ÷ transformers |" in text
    assert "| prefill 512 tok | 2000.0 | 1000.0 | 2.00× |" in text
    assert "| decode batch 8 | 240.0 | 120.0 | 2.00× |" in text
    # At concurrency 4: throughput 120 vs 100, TTFT 300 vs 150, TPOT 30 vs 40.
    row = next(line for line in text.splitlines() if line.startswith("| 4 | llama.cpp |"))
    assert row.endswith("| 1.20× | 2.00× | 0.75× |")
    assert "sharegpt, 10 prompts, rate inf" in text


def test_write_report_makes_markdown_and_png(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_results(path)
    written = write_report(path)
    assert [p.name for p in written] == ["r.md", "r-serve-0.png"]
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
