"""The model sizes suite: its tables, an unsupported model's cell, peak RSS of a tool, and the commands it runs."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from pagedllm.benchmarks import results
from pagedllm.benchmarks.memory import run_with_peak_rss
from pagedllm.benchmarks.report import latest_offline, markdown_report
from pagedllm.benchmarks.size_suite import bench_command, round_order, run_engine
from pagedllm.benchmarks.sizes import MODEL_FILE_KIND, sizes_memory_table, sizes_notes, sizes_speed_table
from pagedllm.benchmarks.throughput import DecodePoint, OfflineThroughput, PrefillPoint
from pagedllm.cli import build_parser

MIB = 2**20
GEMMA_ERROR = "unsupported GGUF architecture 'gemma3'"


def offline_run(engine: str, row: str, prefill: float, decode_1: float, memory: dict[str, int]) -> results.Run:
    throughput = OfflineThroughput([PrefillPoint(512, prefill)], [DecodePoint(1, decode_1)])
    return results.new_run("offline", engine, {"sizes_row": row}, {**asdict(throughput), "memory": memory})


def write_sizes(path: Path) -> None:
    main = OfflineThroughput([PrefillPoint(512, 900.0)], [DecodePoint(1, 30.0)])
    for run in [
        results.new_run("offline", "pagedllm", {}, asdict(main)),
        results.new_run(MODEL_FILE_KIND, "file", {"sizes_row": "Llama 1B"}, {"tensor_bytes": 600 * MIB}),
        offline_run("pagedllm", "Llama 1B", 300.0, 40.0, {"weight_bytes": 630 * MIB, "kv_cache_bytes": 64 * MIB,
                                                          "peak_rss_bytes": 1000 * MIB}),
        offline_run("llama.cpp", "Llama 1B", 100.0, 50.0, {"peak_rss_bytes": 800 * MIB}),
        results.new_run(MODEL_FILE_KIND, "file", {"sizes_row": "Gemma"}, {"tensor_bytes": 240 * MIB}),
        results.new_run("offline", "pagedllm", {"sizes_row": "Gemma"}, {"error": GEMMA_ERROR}),
        offline_run("llama.cpp", "Gemma", 547.0, 63.0, {"peak_rss_bytes": 400 * MIB}),
    ]:  # fmt: skip
        results.append_run(path, run)


def test_speed_table_gives_ratios_and_an_unsupported_cell(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_sizes(path)
    header, rows = sizes_speed_table(results.load_results(path))
    cells = {(row[0], row[1]): dict(zip(header, row, strict=True)) for row in rows}
    llama_prefill = cells[("Llama 1B", "prefill 512 tok")]
    assert (llama_prefill["pagedllm"], llama_prefill["llama.cpp"], llama_prefill["pagedllm ÷ llama.cpp"]) == (
        "300.0", "100.0", "3.00×",
    )  # fmt: skip
    assert llama_prefill["rounds"] == "1"
    assert cells[("Llama 1B", "decode batch 1")]["pagedllm ÷ llama.cpp"] == "0.80×"
    gemma = cells[("Gemma", "decode batch 1")]
    assert (gemma["pagedllm"], gemma["llama.cpp"], gemma["pagedllm ÷ llama.cpp"]) == ("unsupported", "63.0", "–")


def test_rounds_give_medians_and_the_median_of_their_own_ratios(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_sizes(path)  # an earlier `bench sizes` of "Llama 1B", which the next one replaces
    memory = {"weight_bytes": 630 * MIB, "kv_cache_bytes": 64 * MIB}
    rounds = [(300.0, 100.0, 900), (150.0, 60.0, 1100), (320.0, 110.0, 1000)]  # the host halves its speed in round 2
    runs = [results.new_run(MODEL_FILE_KIND, "file", {"sizes_row": "Llama 1B"}, {"tensor_bytes": 600 * MIB})]
    for turn, (ours, theirs, rss) in enumerate(rounds):
        pair = [
            offline_run("pagedllm", "Llama 1B", ours, 40.0, {**memory, "peak_rss_bytes": rss * MIB}),
            offline_run("llama.cpp", "Llama 1B", theirs, 50.0, {"peak_rss_bytes": 800 * MIB}),
        ]
        runs += pair if round_order(turn)[0] == "pagedllm" else pair[::-1]
    for run in runs:
        results.append_run(path, run)
    document = results.load_results(path)
    header, rows = sizes_speed_table(document)
    prefill = dict(zip(header, next(row for row in rows if row[:2] == ["Llama 1B", "prefill 512 tok"]), strict=True))
    # Medians 300 and 100; the rounds' ratios 3.00, 2.50, 2.91: their median, not 300 / 100.
    assert (prefill["pagedllm"], prefill["llama.cpp"]) == ("300.0", "100.0")
    assert prefill["pagedllm ÷ llama.cpp"] == "2.91× (2.50–3.00)" and prefill["rounds"] == "3"
    header, rows = sizes_memory_table(document)
    assert dict(zip(header, rows[0], strict=True))["pagedllm peak RSS MiB"] == "1,000"
    assert [round_order(turn) for turn in range(3)] == [
        ("pagedllm", "llama.cpp"), ("llama.cpp", "pagedllm"), ("pagedllm", "llama.cpp"),
    ]  # fmt: skip


def test_memory_table_and_notes(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_sizes(path)
    document = results.load_results(path)
    header, rows = sizes_memory_table(document)
    llama = dict(zip(header, rows[0], strict=True))
    assert llama["file tensors MiB"] == "600" and llama["pagedllm weights MiB"] == "630"
    assert llama["weights ÷ file"] == "1.05×" and llama["pagedllm KV cache MiB"] == "64"
    assert llama["peak RSS: pagedllm ÷ llama.cpp"] == "1.25×"
    assert llama["pagedllm peak ÷ (file + KV)"] == "1.51×"  # 1000 / (600 + 64)
    gemma = dict(zip(header, rows[1], strict=True))
    assert gemma["pagedllm weights MiB"] == "unsupported" and gemma["llama.cpp peak RSS MiB"] == "400"
    assert gemma["pagedllm peak ÷ (file + KV)"] == "–"
    assert sizes_notes(document) == ["pagedllm on Gemma: unsupported GGUF architecture 'gemma3'"]


def test_sizes_runs_leave_the_main_table_alone(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_sizes(path)
    document = results.load_results(path)
    assert latest_offline(document)["pagedllm"].prefill[0].tokens_per_s == 900.0
    report = markdown_report(document)
    assert "Model sizes: pagedllm and llama.cpp on the same files" in report and "gemma3" in report


def test_peak_rss_of_a_command_and_its_exit_status() -> None:
    script = "import sys; held = bytearray(300 * 2**20); print('done'); sys.exit(3)"
    completed, peak = run_with_peak_rss([sys.executable, "-c", script], timeout_s=60)
    assert completed.returncode == 3 and completed.stdout == "done\n"
    assert peak >= 300 * MIB


def test_commands_parse_and_file_under_the_row(tmp_path: Path) -> None:
    args = build_parser().parse_args(["bench", "sizes", "--batch-sizes", "1,8"])
    for engine, subcommand in (("pagedllm", "offline"), ("llama.cpp", "peers")):
        command = bench_command(engine, Path("m.gguf"), "Llama 1B", args, tmp_path / "r.json")
        assert command[:4] == [sys.executable, "-m", "pagedllm.cli", "bench"]
        parsed = build_parser().parse_args(command[3:])
        assert parsed.bench_command == subcommand and parsed.sizes_row == "Llama 1B"
        assert parsed.prompt_lens == (512,) and parsed.batch_sizes == (1, 8)
    assert parsed.peers == "llama.cpp"


def test_an_error_the_cli_reports_becomes_the_cell(tmp_path: Path) -> None:
    output = tmp_path / "r.json"
    message = "unsupported GGUF architecture 'gemma3': supported are llama, mistral, qwen2"
    failing = [
        sys.executable,
        "-c",
        f"import sys; print({'pagedllm: error: ' + message!r}, file=sys.stderr); sys.exit(2)",
    ]
    assert not run_engine(failing, "pagedllm", Path("g.gguf"), "Gemma", output)
    assert run_engine([sys.executable, "-c", "pass"], "pagedllm", Path("g.gguf"), "Gemma", output)
    [run] = results.load_results(output).runs
    assert run.results == {"error": message} and run.settings["sizes_row"] == "Gemma"
    with pytest.raises(RuntimeError, match="status 1"):
        run_engine([sys.executable, "-c", "raise SystemExit(1)"], "pagedllm", Path("g.gguf"), "Gemma", output)
