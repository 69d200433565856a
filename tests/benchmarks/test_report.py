"""The results file round trip and the report built from it."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest

from pagedllm.benchmarks import results
from pagedllm.benchmarks.metrics import Distribution, ServingMetrics
from pagedllm.benchmarks.report import markdown_report, update_readme, write_report
from pagedllm.benchmarks.speculative import SpecPoint, point_record
from pagedllm.benchmarks.throughput import DecodePoint, OfflineThroughput, PrefillPoint, RequestThroughput


def serving_metrics(throughput: float, ttft_ms: float, tpot_ms: float) -> dict:
    def dist(value: float) -> Distribution:
        return Distribution(value, value, value * 1.5, value * 2)

    return asdict(
        ServingMetrics(
            10,
            0,
            5.0,
            100,
            500,
            500,
            2.0,
            throughput,
            throughput + 20,
            dist(ttft_ms),
            dist(tpot_ms),
            dist(tpot_ms),
            dist(1000),
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
        "serve",
        engine,
        settings,
        {"metrics": serving_metrics(throughput, ttft_ms, tpot_ms), "peak_rss_bytes": 300 * 2**20},
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


def test_machine_names_tell_apart_cpus_of_one_model_name(tmp_path: Path) -> None:
    assert results.machine_name("AMD EPYC", "Zen 4", 2) == "amd-epyc-zen-4-2cpu"
    assert results.machine_name("AMD EPYC", "Zen 5", 2) == "amd-epyc-zen-5-2cpu"
    assert results.machine_name("AMD EPYC 9R14 Zen 4 (SMT off)", "Zen 4", 8) == "amd-epyc-9r14-zen-4-8cpu"
    assert results.machine_name("Intel Xeon Processor (Sapphire Rapids)", "AMX", 2) == "intel-xeon-processor-amx-2cpu"
    # Files written before the core design was recorded still load, and say what they know.
    path = tmp_path / "old.json"
    write_results(path)
    document = json.loads(path.read_text())
    del document["machine"]["core_design"]
    document["machine"]["cpu_model"], document["machine"]["cpu_count"] = "AMD EPYC", 2
    path.write_text(json.dumps(document))
    assert results.load_results(path).machine.description == "AMD EPYC (2 CPUs)"
    assert results.Machine("n", "AMD EPYC", 2, "Linux", "3.11", "Zen 4").description == "AMD EPYC (Zen 4, 2 CPUs)"


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


def sharegpt_run(engine: str, seconds: float) -> results.Run:
    throughput = OfflineThroughput([PrefillPoint(512, 100.0)], [DecodePoint(1, 10.0)])
    record = {**asdict(throughput), "sharegpt": asdict(RequestThroughput.from_counts(200, 30000, 10000, seconds))}
    return results.new_run("offline", engine, {"sharegpt_output_len": 50}, record)


def test_sharegpt_table_has_ratios_to_each_peer(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    for run in [sharegpt_run("transformers", 200.0), sharegpt_run("pagedllm", 50.0)]:
        results.append_run(path, run)
    text = markdown_report(results.load_results(path))
    assert "## Offline throughput (ShareGPT, 200 requests, output 50 tok, all at once; higher is better)" in text
    assert "|  | pagedllm | transformers | pagedllm ÷ transformers |" in text
    assert "| req/s | 4.00 | 1.00 | 4.00× |" in text
    assert "| output tok/s | 200.0 | 50.0 | 4.00× |" in text
    assert "| total tok/s | 800.0 | 200.0 | 4.00× |" in text


README = (
    "# pagedllm\n\nIntro.\n\n## Results\n\n<!-- bench-results:start -->\nold numbers\n<!-- bench-results:end -->"
    "\n\nMore.\n"
)


def test_report_rewrites_the_readme_section(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks" / "results" / "r.json"
    write_results(path)
    results.append_run(path, sharegpt_run("pagedllm", 50.0))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    written = write_report(path, readme=readme)
    assert written[-1] == readme
    text = readme.read_text()
    assert text.startswith("# pagedllm\n\nIntro.\n\n## Results\n\n<!-- bench-results:start -->\n")
    assert text.endswith("<!-- bench-results:end -->\n\nMore.\n")
    assert "old numbers" not in text
    assert "[`r.json`](benchmarks/results/r.json)" in text
    assert "![r-serve-0](benchmarks/results/r-serve-0.png)" in text
    assert "### Offline throughput (ShareGPT, 200 requests" in text and "| decode batch 8 |" in text
    # Running it again replaces the section rather than nesting a second one.
    write_report(path, readme=readme)
    assert readme.read_text() == text


def test_a_file_of_one_benchmark_rewrites_only_its_own_readme_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README + "\n<!-- sizes-results:start -->\nold sizes\n<!-- sizes-results:end -->\n")
    sizes = tmp_path / "sizes.json"
    results.append_run(sizes, results.new_run("model-file", "file", {"sizes_row": "Llama 1B"}, {"tensor_bytes": 2**20}))
    for engine, prefill in (("pagedllm", 300.0), ("llama.cpp", 100.0)):
        throughput = OfflineThroughput([PrefillPoint(512, prefill)], [DecodePoint(1, 40.0)])
        record = {**asdict(throughput), "memory": {"peak_rss_bytes": 2**30}}
        results.append_run(sizes, results.new_run("offline", engine, {"sizes_row": "Llama 1B"}, record))
    assert write_report(sizes, readme=readme)[-1] == readme
    text = readme.read_text()
    assert "old numbers" in text and "old sizes" not in text
    assert "| Llama 1B | prefill 512 tok | 300.0 | 100.0 | 3.00× | 1 |" in text
    assert "by `pagedllm bench sizes`" in text and "[`sizes.json`](sizes.json)" in text
    # A file of the main benchmarks leaves the sizes section as it is, and its main section has no sizes tables.
    main = tmp_path / "main.json"
    write_results(main)
    write_report(main, readme=readme)
    text = readme.read_text()
    assert "old numbers" not in text and text.count("Model sizes: pagedllm and llama.cpp") == 1
    assert "| Llama 1B | prefill 512 tok | 300.0 | 100.0 | 3.00× | 1 |" in text


def test_readme_without_markers_is_left_alone_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "r.json"
    write_results(path)
    readme = tmp_path / "README.md"
    readme.write_text("# pagedllm\n")
    with caplog.at_level(logging.WARNING):
        written = write_report(path, readme=readme)
    assert readme not in written and readme.read_text() == "# pagedllm\n"
    assert "bench-results:start" in caplog.text


def test_readme_with_one_marker_is_an_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-results:end -->\n<!-- bench-results:start -->\n")
    with pytest.raises(ValueError, match="bench-results:start"):
        update_readme(readme, "tables\n")


def test_prefix_sharing_section_shows_both_modes(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    record = {
        "prefill_tokens_drop": 0.9,
        "ttft_first_over_median_later": 8.0,
        "cached_summary": {"computed_prefill_tokens": 100, "first_ttft_s": 0.8, "median_later_ttft_s": 0.1},
        "uncached_summary": {"computed_prefill_tokens": 1000, "first_ttft_s": 0.9, "median_later_ttft_s": 0.85},
    }
    results.append_run(
        path, results.new_run("prefix", "pagedllm", {"system_prompt_tokens": 1500, "num_requests": 16}, record)
    )
    text = markdown_report(results.load_results(path))
    assert "| on | 100 | 800 | 100 |" in text and "| off | 1000 | 900 | 850 |" in text
    assert "drop by 90.0%" in text and "8.0× lower" in text


def test_speculative_section_pairs_off_and_on_and_compares_with_llama_cpp(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    points = [
        SpecPoint("grounded", "off", 2, 102, 10.0, 5.0),  # 100 decode tokens in 5 s: 20 tok/s
        SpecPoint("grounded", "ngram", 2, 102, 5.0, 2.0, 80, 60, 0.75, 3.0, 2),  # 50 tok/s
        SpecPoint("grounded", "off", 16, 800, 10.0, 0.0, concurrency=16),  # 80 output tok/s
        SpecPoint("grounded", "ngram", 16, 800, 12.5, 0.0, 40, 10, 0.25, 1.5, 16, concurrency=16),  # 64
    ]
    record = {"points": [point_record(p) for p in points], "llama_cpp": {"decode_tokens_per_second": 25.0}}
    settings = {"speculative_config": {"method": "ngram"}}
    results.append_run(path, results.new_run("speculative", "pagedllm", settings, record))
    text = markdown_report(results.load_results(path))
    assert '## Speculative decoding on smollm2-135m-instruct ({"method": "ngram"})' in text
    assert "| grounded | 1 | 20.0 | 50.0 | 2.50× | 75% | 3.00 | 2/2 |" in text
    assert "| grounded | 16 | 80.0 | 64.0 | 0.80× | 25% | 1.50 | 16/16 |" in text
    assert "25.0 tok/s" in text and "2.00× that" in text


def test_speculative_sections_show_the_last_run_of_each_model(tmp_path: Path) -> None:
    path = tmp_path / "r.json"

    def run(model_name: str | None, on_decode_seconds: float, prompt_format: str | None) -> results.Run:
        points = [SpecPoint("chat", "off", 1, 41, 4.0, 4.0), SpecPoint("chat", "ngram", 1, 41, 2.0, on_decode_seconds)]
        settings = {"speculative_config": {"method": "ngram"}, "engine": {"model": None}}
        if model_name:  # runs before the model's name was recorded have none
            settings |= {"model_name": model_name, "prompt_format": prompt_format}
        record = {"points": [point_record(p) for p in points], "llama_cpp": None}
        return results.new_run("speculative", "pagedllm", settings, record)

    for model_name, on_decode_seconds, prompt_format in [
        (None, 1.0, None),
        ("Gemma 3 270M Q4_K_M", 2.0, "completion"),
        ("smollm2-135m-instruct", 0.5, "chat"),
        ("Gemma 3 270M Q4_K_M", 1.6, "completion"),
    ]:
        results.append_run(path, run(model_name, on_decode_seconds, prompt_format))
    text = markdown_report(results.load_results(path))
    smollm = text.index("## Speculative decoding on smollm2-135m-instruct")
    gemma = text.index("## Speculative decoding on Gemma 3 270M Q4_K_M")
    assert text.count("## Speculative decoding on") == 2 and smollm < gemma
    # 40 decode tokens: off 10 tok/s; on 80 tok/s for SmolLM2's last run, 25 for Gemma's.
    assert "| chat | 1 | 10.0 | 80.0 | 8.00× |" in text[smollm:gemma]
    assert "| chat | 1 | 10.0 | 25.0 | 2.50× |" in text[gemma:]
    assert "plain completion text" in text[gemma:] and "plain completion text" not in text[smollm:gemma]
