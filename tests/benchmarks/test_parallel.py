"""`bench parallel`'s flags and its table."""

from __future__ import annotations

import argparse
from pathlib import Path

from pagedllm.benchmarks import parallel, results
from pagedllm.benchmarks.parallel_report import parallel_table


def test_unknown_part_is_refused_before_anything_runs(capsys):
    parser = argparse.ArgumentParser()
    parallel.add_arguments(parser)
    assert parallel.run(parser.parse_args(["--parts", "tensor,sequence"])) == 2
    assert "not sequence" in capsys.readouterr().out


def test_pipeline_rows_compare_micro_batches_and_one_step_at_a_time_with_one_process(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    pipeline = {
        "single": {"output_tokens_per_s": 100.0},
        "micro_batches": {"output_tokens_per_s": 90.0},
        "one_at_a_time": {"output_tokens_per_s": 50.0},
        "throughput_ratio": 0.9,
        "one_at_a_time_ratio": 0.5,
    }
    settings = {"world_size": 2, "threads_per_rank": 1, "concurrency": 16}
    results.append_run(path, results.new_run("parallel", "pagedllm", settings, {"pipeline": pipeline}))
    header, rows = parallel_table(results.load_results(path))
    assert header[1:3] == ["1 process, 2 threads", "2 ranks of 1 thread"]
    assert rows == [
        ["PP=2, micro-batches: serving, concurrency 16 (output tok/s)", "100.0", "90.0", "0.90×"],
        ["PP=2, one step at a time: serving, concurrency 16 (output tok/s)", "100.0", "50.0", "0.50×"],
    ]
